"""Slow and vanished clients: bounded memory, an `error` that says why, cleanup.

The slow client is a raw socket that sends its request and then stops reading,
with a small receive buffer so the server's writes back up quickly.
"""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika
import pytest
from helpers import EventsServer, SSEReader, StalledClient, wait_until

from quart_events.errors import TOO_SLOW

pytestmark = [pytest.mark.broker, pytest.mark.slow]


MESSAGE = json.dumps({"pad": "x" * 10_000}).encode()  # about 10 KiB
MESSAGES = 5_000  # about 50 MB in all


async def publish_all(exchange: aio_pika.abc.AbstractExchange, server: EventsServer) -> int:
    """Publish ~50 MB; return the highest RSS the server reached meanwhile."""
    peak = 0
    for n in range(MESSAGES):
        await exchange.publish(aio_pika.Message(MESSAGE), routing_key=f"k.{n}")
        if n % 250 == 0:
            peak = max(peak, (await asyncio.to_thread(server.stats))["rss_bytes"])
    return peak


async def test_a_slow_client_is_ended_with_an_error_and_memory_stays_bounded(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    with EventsServer.running() as server:
        async with SSEReader(
            server.url([{"exchange": exchange.name, "routingKeyPattern": "#"}])
        ) as fast:
            await fast.wait_for("ready")
            slow = StalledClient(server, exchange.name)
            await wait_until(lambda: server.stats()["streams"] == 2)
            before = server.stats()["rss_bytes"]
            peak = await publish_all(exchange, server)
            await fast.wait_for("message", MESSAGES, timeout=120)  # the other stream kept up
            stats = server.stats()
            assert stats["too_slow"] == 1
            peak = max(peak, stats["rss_bytes"])
            growth = peak - before
            print(
                f"RSS before {before >> 20} MiB, peak {peak >> 20} MiB, growth {growth >> 20} MiB"
            )
            assert growth < 40 << 20, f"server grew by {growth >> 20} MiB for a stalled client"
            # The slow client reads again: what was still buffered, then the reason, then the end.
            body = await asyncio.to_thread(slow.read_to_end)
        assert body.rstrip(b"\r\n0").endswith(sse_error_tail())
        await wait_until(lambda: server.stats()["streams"] == 0)


def sse_error_tail() -> bytes:
    return f"event: error\ndata: {json.dumps(TOO_SLOW)}\nid: -".encode()


async def test_a_client_that_stops_reading_for_good_is_dropped(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:

    with EventsServer.running({"TC_EVENTS_SERVER__WRITE_TIMEOUT": "2"}) as server:
        warm_up_binding = [{"exchange": exchange.name, "routingKeyPattern": "warm.up"}]
        async with SSEReader(server.url(warm_up_binding)) as warm_up:  # makes the bind channel
            await warm_up.wait_for("ready")
        await wait_until(lambda: server.stats()["streams"] == 0)
        await asyncio.sleep(1)
        idle_tasks = server.stats()["tasks"]
        stalled = StalledClient(server, exchange.name)
        await wait_until(lambda: server.stats()["streams"] == 1)
        for n in range(1_500):  # enough to fill the socket buffers and block the writes
            await exchange.publish(aio_pika.Message(MESSAGE), routing_key=f"k.{n}")
        started = time.monotonic()
        await wait_until(lambda: server.stats()["streams"] == 0, timeout=30, interval=0.2)
        print(f"dropped {time.monotonic() - started:.1f} s after the last publish")
        assert server.stats()["buffered_bytes"] == 0
        await wait_until(lambda: server.stats()["bindings"] == 0)  # unbound on the broker
        # The connection itself is freed too (its tasks gone), while the client still holds it.
        await wait_until(lambda: server.stats()["tasks"] <= idle_tasks, timeout=20)
        stalled.sock.close()
