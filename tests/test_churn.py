"""10,000 connect/disconnect cycles: nothing is left behind, memory comes back.

Raw asyncio sockets are the clients (cheap enough to run thousands of cycles);
a third leave before `ready`, a third right after it, a third mid-message while a
publisher keeps messages flowing.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid

import aio_pika
import pytest
from helpers import AMQP_URL, EventsServer, SSEReader, bindings_param, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CYCLES = 10_000
WARM_UP = 1_000
CONCURRENCY = 40


async def one_cycle(port: int, exchange: str, n: int) -> None:
    pattern = f"k.{n % 20}.#" if n % 7 else "#"
    query = urllib.parse.urlencode(
        {"bindings": bindings_param([{"exchange": exchange, "routingKeyPattern": pattern}])}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /api/events/v1/connect/?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        received = await reader.readuntil(b"\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 200")
        kind = n % 3
        if kind >= 1:
            while b"event: ready" not in received:
                received += await reader.read(65536)
        if kind == 2:
            while b"event: message" not in received:
                received += await reader.read(65536)
    finally:
        writer.transport.abort() if n % 2 else writer.close()


async def publish_forever(exchange: aio_pika.abc.AbstractExchange, stop: asyncio.Event) -> None:
    body = json.dumps({"pad": "y" * 500}).encode()
    n = 0
    while not stop.is_set():
        await exchange.publish(aio_pika.Message(body), routing_key=f"k.{n % 20}.x")
        n += 1
        await asyncio.sleep(0.002)


async def run_cycles(port: int, exchange: str, start: int, count: int) -> None:
    numbers = iter(range(start, start + count))

    async def worker() -> None:
        for n in numbers:
            await asyncio.wait_for(one_cycle(port, exchange, n), 30)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def test_ten_thousand_cycles_leave_nothing_behind() -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"exchange/test/churn-{uuid.uuid4().hex[:6]}", aio_pika.ExchangeType.TOPIC
        )
        stop = asyncio.Event()
        publisher = asyncio.ensure_future(publish_forever(exchange, stop))
        try:
            with EventsServer.running() as server:
                keeper = [{"exchange": exchange.name, "routingKeyPattern": "kept.open"}]
                async with SSEReader(server.url(keeper)) as kept:
                    await kept.wait_for("ready")
                    await run_cycles(server.port, exchange.name, 0, WARM_UP)
                    await settle(server)
                    before = server.stats()
                    await run_cycles(server.port, exchange.name, WARM_UP, CYCLES)
                    await settle(server)
                    after = server.stats()
                    print(f"\nbefore: {before}\nafter:  {after}")
                    assert after["streams"] == 1 and after["bindings"] == 1
                    assert after["trie_entries"] == 1 and after["pending_broker_operations"] == 0
                    assert after["tasks"] <= before["tasks"]
                    assert after["rss_bytes"] <= before["rss_bytes"] * 1.10
                    assert server.broker_bindings() == [(exchange.name, "kept.open")]
                    assert not kept.ended.is_set()
        finally:
            stop.set()
            await publisher
            await exchange.delete()


async def settle(server: EventsServer) -> None:
    """Wait until only the kept stream is left and nothing is pending."""

    def quiet() -> bool:
        stats = server.stats()
        return bool(stats["streams"] == 1 and stats["pending_broker_operations"] == 0)

    await wait_until(quiet, timeout=60, interval=0.2)
    await asyncio.sleep(6)  # hypercorn lets closed connections go after its keep-alive timeout


async def test_a_burst_of_abandoned_requests_queues_no_broker_work() -> None:
    """500 requests with 100 bindings each leave at once: no bind or unbind piles up
    behind them, the bindings whose streams left before their bind ran are never sent
    to the broker, and a legitimate stream is ready as soon as ever."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"exchange/test/burst-{uuid.uuid4().hex[:6]}", aio_pika.ExchangeType.TOPIC
        )
        try:
            # Room for all of them (150,000 pattern words, 50,000 binds): the burst is
            # admitted, not turned away by the limits that bound it by default.
            room = {
                "TC_EVENTS_SERVER__MAX_BINDING_WORDS": "200000",
                "TC_EVENTS_SERVER__MAX_PENDING_BINDS": "60000",
            }
            with EventsServer.running(room) as server:
                idle_tasks = server.stats()["tasks"]

                async def abandon(n: int) -> None:
                    bindings = [
                        {"exchange": exchange.name, "routingKeyPattern": f"r{n}.k{i}.#"}
                        for i in range(100)
                    ]
                    query = urllib.parse.urlencode({"bindings": bindings_param(bindings)})
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                    writer.write(
                        f"GET /events/v1/connect?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    )
                    await writer.drain()
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                    writer.transport.abort()

                await asyncio.gather(*(abandon(n) for n in range(500)))
                stats = server.stats()
                print(f"\nright after the burst: {stats}")
                assert stats["pending_broker_operations"] <= 100
                keeper = [{"exchange": exchange.name, "routingKeyPattern": "legit.#"}]
                async with SSEReader(server.url(keeper)) as legit:
                    await legit.wait_for("ready", timeout=5)
                await wait_until(lambda: server.stats()["pending_broker_operations"] == 0)
                await wait_until(lambda: not server.broker_bindings(), timeout=20, interval=0.5)
                settled = server.stats()
                print(f"settled: {settled}")
                # Of the 50,000 bindings asked for, only those bound before their stream
                # left went to the broker (one bind at a time takes far longer than the
                # burst): each was unbound, the rest never sent. The legit one too.
                assert settled["binds_sent"] < 25_000
                assert settled["unbinds_sent"] == settled["binds_sent"]
                await wait_until(lambda: server.stats()["tasks"] <= idle_tasks + 2, timeout=20)
        finally:
            await exchange.delete()
