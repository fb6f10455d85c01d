"""Fixtures on real parts: the local RabbitMQ and a real ``tc-events server`` process.

A test that cannot reach the broker fails (the ``amqp`` fixture raises); nothing skips.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import aio_pika
import helpers
import pytest
from helpers import AMQP_URL, EventsServer, declare_exchange, delete_exchange

ROOT = Path(__file__).resolve().parent.parent
LOG_LINES = 150  # of each server's log, in the report of a failing test


@pytest.fixture(scope="session", autouse=True)
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Server logs live in pytest's temporary directory (kept for the last few runs)."""
    helpers.LOG_DIRECTORY = tmp_path_factory.mktemp("server-logs")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test shows the log of each server it started or that still runs."""
    report = yield
    if call.when == "setup":
        item.stash[FIRST_SERVER] = len(helpers.STARTED)
    if report.failed:
        first = item.stash.get(FIRST_SERVER, len(helpers.STARTED))
        for index, server in enumerate(helpers.STARTED):
            if index >= first or server.process.poll() is None:
                lines = server.output().splitlines()[-LOG_LINES:]
                report.sections.append(
                    (f"server log (port {server.port}, {server.log_path})", "\n".join(lines))
                )
    return report


FIRST_SERVER = pytest.StashKey[int]()


@pytest.fixture
async def amqp(request: pytest.FixtureRequest) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel on the real broker, for publishing and declaring exchanges."""
    connection = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": f"test:{request.node.name}"}
    )
    try:
        yield await connection.channel()
    finally:
        await connection.close()


@pytest.fixture
async def exchange(
    amqp: aio_pika.abc.AbstractChannel,
) -> AsyncIterator[aio_pika.abc.AbstractExchange]:
    """A fresh topic exchange, deleted afterwards."""
    declared = await amqp.declare_exchange(
        f"exchange/test/{uuid.uuid4().hex[:12]}", aio_pika.ExchangeType.TOPIC, auto_delete=False
    )
    try:
        yield declared
    finally:
        await declared.delete()


@pytest.fixture
async def exchange_name() -> AsyncIterator[str]:
    """A fresh topic exchange, by name only (for what only needs its name)."""
    name = f"exchange/test/{uuid.uuid4().hex[:12]}"
    await declare_exchange(name)
    try:
        yield name
    finally:
        await delete_exchange(name)


@pytest.fixture
def history_namespace() -> Iterator[str]:
    """A namespace of its own for servers that keep history; its history (durable
    queues) deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    prefix = f"queue/{name}/events/history"
    asyncio.run(helpers.delete_queues(prefix, prefix + "-feed"))


@pytest.fixture(scope="module")
def server() -> Iterator[EventsServer]:
    """A real server process (hypercorn) on a free port, with its own queue namespace."""
    with EventsServer.running() as running:
        yield running


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for localhost signed by it: (ca, cert, key)."""
    where = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (where / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    return where / "ca.pem", where / "server.pem", where / "server.key"
