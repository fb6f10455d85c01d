"""Several worker processes on one port (`--workers N`), with the real broker.

Connections spread over the workers (each has its own queue on the broker), a
message reaches streams on every worker, SIGTERM ends every stream with the
reconnect frame, a killed worker comes back, and a killed parent leaves no worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aio_pika
import psutil
import pytest
from helpers import EventsServer, SSEReader, publish, queues_of, rabbitmqctl, wait_until
from tcp_proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@contextmanager
def workers(count: int, env: dict[str, str] | None = None) -> Iterator[EventsServer]:
    server = EventsServer.start(env, args=["--workers", str(count)])
    try:
        yield server
    finally:
        server.stop()


def children(server: EventsServer) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


def queues_with_bindings(server: EventsServer, exchange: str) -> set[str]:
    """The worker queues that hold a binding to ``exchange``."""
    out = rabbitmqctl("list_bindings", "source_name", "destination_name")
    prefix = f"queue/{server.namespace}/"
    return {
        line.split("\t")[1]
        for line in out.splitlines()
        if line.startswith(f"{exchange}\t") and line.split("\t")[1].startswith(prefix)
    }


@pytest.mark.parametrize("count", [2, 4])
async def test_streams_spread_over_every_worker_and_each_gets_the_messages(
    count: int, exchange: aio_pika.abc.AbstractExchange
) -> None:
    with workers(count) as server:
        await wait_until(lambda: len(queues_of(server.namespace)) == count, 20, 0.5)
        readers = [
            SSEReader(server.url([{"exchange": exchange.name, "routingKeyPattern": f"s{n}.#"}]))
            for n in range(10 * count)
        ]
        try:
            for reader in readers:
                await reader.__aenter__()
            for reader in readers:
                await reader.wait_for("ready")
            # Every worker holds streams: its queue carries bindings.
            assert len(queues_with_bindings(server, exchange.name)) == count
            for n in range(len(readers)):
                await publish(exchange, f"s{n}.x", b'{"n": %d}' % n)
            for n, reader in enumerate(readers):
                await reader.wait_for("message")
                assert reader.data("message")[0]["payload"] == {"n": n}
        finally:
            for reader in readers:
                await reader.close()
        pids = [child.pid for child in children(server)]
        assert len(pids) == count
        code = await asyncio.to_thread(server.stop)
        assert code == 0
        assert not queues_of(server.namespace)
        assert not any(psutil.pid_exists(pid) for pid in pids)


async def read_to_end(server: EventsServer, url: str, ready: asyncio.Event) -> bytes:
    """The whole raw body of one stream, until the server ends it."""
    import httpx

    body = b""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
        async with client.stream("GET", url) as response:
            async for chunk in response.aiter_raw():
                body += chunk
                if b"event: ready" in body:
                    ready.set()
    return body


async def test_sigterm_ends_every_stream_on_every_worker_with_the_reconnect_frame() -> None:
    with workers(2, {"TC_EVENTS_SERVER__SHUTDOWN_GRACE": "5"}) as server:
        await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
        readies = [asyncio.Event() for _ in range(12)]
        bodies = [
            asyncio.ensure_future(read_to_end(server, server.url([]), ready)) for ready in readies
        ]
        for ready in readies:
            await asyncio.wait_for(ready.wait(), 10)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        ended = await asyncio.wait_for(asyncio.gather(*bodies), 20)
        assert await asyncio.to_thread(server.process.wait, 20) == 0
        assert time.monotonic() - started < 10
        for body in ended:
            assert b"\n\nevent: reconnect\ndata: {}\nid:\nretry: " in body and body.endswith(
                b"\n\n"
            )
        assert not queues_of(server.namespace)
        output = server.output()
        assert "Traceback" not in output and "stopping 2 workers" in output


async def test_a_killed_worker_comes_back_and_the_others_never_notice(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    with workers(2) as server:
        await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
        binding = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
        readers = [SSEReader(server.url(binding)) for _ in range(16)]
        try:
            for reader in readers:
                await reader.__aenter__()
            for reader in readers:
                await reader.wait_for("ready")
            victim, survivor = children(server)
            victim.kill()
            await wait_until(lambda: len(children(server)) == 2, 15, 0.2)
            await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
            assert "was killed by signal 9; starting it again" in server.output()
            cut = [reader for reader in readers if reader.ended.is_set()]
            kept = [reader for reader in readers if not reader.ended.is_set()]
            assert cut and kept  # both workers had streams
            # The clients of the killed worker come back (as an EventSource would) ...
            again = [SSEReader(server.url(binding)) for _ in cut]
            for reader in again:
                await reader.__aenter__()
                await reader.wait_for("ready")
            readers += again
            # ... and every stream, old or new, gets what is published now.
            await publish(exchange, "after.kill", b'"after"')
            for reader in kept + again:
                await reader.wait_for("message")
                assert reader.data("message") == [{**reader.data("message")[0], "payload": "after"}]
            assert all(len(reader.named("ready")) == 1 for reader in kept)
            assert survivor.is_running()
        finally:
            for reader in readers:
                await reader.close()


async def test_a_killed_parent_leaves_no_worker_behind() -> None:
    with workers(2) as server:
        await wait_until(lambda: len(children(server)) == 2, 20, 0.2)
        pids = [child.pid for child in children(server)]
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        await wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 20, 0.2)
        await wait_until(lambda: not queues_of(server.namespace), 20, 0.5)


async def test_workers_that_keep_failing_at_start_make_the_parent_give_up() -> None:
    with TcpProxy.running() as proxy:
        env = {"PULSE_PORT": str(proxy.port)}
        server = EventsServer.start(env, args=["--workers", "2"], wait=False)
        try:
            # The parent's own check reaches the broker; then the broker goes away, so
            # every worker fails to connect at its start, again and again.
            await wait_until(lambda: "started 2 workers" in server.output(), 20, 0.01)
            proxy.cut()
            code = await asyncio.to_thread(server.process.wait, 90)
            assert code == 1
            output = server.output()
            assert "failed 5 times right after its start: giving up" in output
            assert "starting it again in" in output and "Traceback" not in output
        finally:
            server.stop()


async def test_the_port_check_refuses_a_port_other_workers_share_and_not_time_wait() -> None:
    """A second `--workers` instance on the port of a first is refused (the kernel once
    split clients between them); and right after a single-process instance stopped
    with connections open (TIME-WAIT), `--workers` starts on its port at once."""
    single = EventsServer.start()
    port = single.port
    async with SSEReader(single.url([])) as reader:
        await reader.wait_for("ready")
        assert single.stop() == 0  # the server closes first: TIME-WAIT on its side
    first = EventsServer.start(port=port, args=["--workers", "2"])
    try:
        second = EventsServer.start(port=port, args=["--workers", "2"], wait=False)
        try:
            assert second.process.wait(30) == 1
        finally:
            second.stop()
        assert second.output().strip().splitlines()[-1] == (
            f"tc-events: cannot listen on http://127.0.0.1:{port}: Address already in use"
        )
        async with SSEReader(first.url([])) as reader:
            await reader.wait_for("ready")
    finally:
        first.stop()
