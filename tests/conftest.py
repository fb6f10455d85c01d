"""Fixtures on real parts: the local RabbitMQ and a real ``tc-events server`` process.

A test that cannot reach the broker fails (the ``amqp`` fixture raises); nothing skips.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import pytest
from helpers import AMQP_URL, EventsServer

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture(scope="module")
def server() -> Iterator[EventsServer]:
    """A real server process (hypercorn) on a free port, with its own queue namespace."""
    with EventsServer.running() as running:
        yield running
