"""`/metrics` after a known scenario, with two worker processes: exact counts.

Every figure expected here is counted on the client's side (or on the broker's)
as the scenario runs, never written down in advance.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aio_pika
import httpx
import pytest
from helpers import (
    EventsServer,
    SSEReader,
    StalledClient,
    publish,
    queues_of,
    rabbitmqctl,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from tcp_proxy import TcpProxy

from quart_events.metrics import ENDED, OPENED

pytestmark = [pytest.mark.broker, pytest.mark.slow]

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(server: EventsServer) -> dict[Sample, float]:
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def opened(counts: dict[str, int]) -> dict[Sample, float]:
    return {
        ("tc_events_streams_opened_total", (("outcome", outcome),)): counts.get(outcome, 0)
        for outcome in OPENED
    }


def ended(counts: dict[str, int]) -> dict[Sample, float]:
    return {
        ("tc_events_streams_ended_total", (("reason", reason),)): counts.get(reason, 0)
        for reason in ENDED
    }


async def expect(server: EventsServer, expected: dict[Sample, float]) -> None:
    """Wait until the scrape shows ``expected`` (workers flush once a second)."""

    def shown() -> bool:
        samples = scrape(server)
        return all(samples.get(key) == value for key, value in expected.items())

    try:
        await wait_until(shown, timeout=10, interval=0.2)
    except AssertionError:
        samples = scrape(server)
        wrong = {
            key: (samples.get(key), value)
            for key, value in expected.items()
            if samples.get(key) != value
        }
        raise AssertionError(f"metrics (shown, expected): {wrong}") from None


@pytest.fixture
def two_workers() -> Iterator[EventsServer]:
    env = {"TC_EVENTS_SERVER__MAX_STREAMS": "3"}  # per worker
    with EventsServer.running(env, args=["--workers", "2"]) as server:
        yield server


async def test_metrics_count_a_known_scenario_over_two_workers(
    two_workers: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    server = two_workers
    await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
    outcomes: dict[str, int] = {}
    reasons: dict[str, int] = {}

    async with SSEReader(server.url([{"exchange": exchange.name}])) as bad:
        await bad.wait_ended()
    outcomes["bad_input"] = 1
    missing = [{"exchange": "exchange/test/none-such", "routingKeyPattern": "#"}]
    async with SSEReader(server.url(missing)) as gone:
        await gone.wait_ended()
    assert json.loads(gone.events[0].data) == "exchange `exchange/test/none-such` does not exist"
    outcomes["missing_exchange"] = reasons["error"] = 1

    fast = [{"exchange": exchange.name, "routingKeyPattern": "fast.#"}]
    readers, refused = [], 0
    for _ in range(10):  # 6 places in all; which worker a connection lands on is the kernel's
        reader = SSEReader(server.url(fast))
        await reader.__aenter__()
        await wait_until(lambda r=reader: r.named("ready") or r.ended.is_set())
        if reader.named("ready"):
            readers.append(reader)
        else:
            refused += 1
            await reader.close()
    assert readers and refused and len(readers) + refused == 10
    outcomes["ready"], outcomes["over_limit"] = len(readers), refused
    await expect(server, {**opened(outcomes), **ended(reasons)})
    await expect(server, {("tc_events_streams_open", ()): len(readers)})

    for n in range(10):
        await publish(exchange, f"fast.{n}", b'{"n": %d}' % n)
    for reader in readers:
        await reader.wait_for("message", 10)
    bound = {
        line.split("\t")[1]
        for line in rabbitmqctl("list_bindings", "source_name", "destination_name").splitlines()
        if line.startswith(f"{exchange.name}\t")
    }
    await expect(
        server,
        {
            ("tc_events_frames_delivered_total", ()): 10 * len(readers),
            ("tc_events_broker_messages_received_total", ()): 10 * len(bound),
            ("tc_events_broker_bindings", ()): len(bound),
        },
    )
    for reader in readers:
        await reader.close()
    reasons["client_left"] = len(readers)
    await expect(server, {**ended(reasons), ("tc_events_streams_open", ()): 0})

    stalled = StalledClient(server, exchange.name, pattern="slow.#")
    await expect(server, {("tc_events_streams_open", ()): 1})
    outcomes["ready"] += 1
    payload = json.dumps({"pad": "x" * 10_000}).encode()
    for n in range(1_500):  # enough to fill the socket buffers and the stream's buffer
        await publish(exchange, f"slow.{n}", payload)
    body = await asyncio.to_thread(stalled.read_to_end)  # what was written, then the reason
    assert b"too slowly" in body.rstrip(b"\r\n0")[-200:]
    reasons["too_slow"] = 1
    await expect(server, {**opened(outcomes), **ended(reasons)})
    samples = scrape(server)
    assert samples[("tc_events_written_bytes_total", ())] > 0
    connected = [v for (name, _), v in samples.items() if name == "tc_events_broker_connected"]
    assert connected == [1.0, 1.0]  # one per worker
    assert samples[("tc_events_ready_seconds_count", ())] == outcomes["ready"]


async def test_reconnects_bodies_that_are_not_json_and_ping_lateness_are_counted(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    """The metrics the scenario above does not reach: a cut of the broker connection
    (through a proxy) is one reconnect, a body that is not JSON is counted, and every
    tick of the ping timer is observed (its lateness histogram counts the ticks)."""
    with TcpProxy.running() as proxy:
        with EventsServer.running({"PULSE_PORT": str(proxy.port)}) as server:
            binding = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
            async with SSEReader(server.url(binding)) as reader:
                await reader.wait_for("ready")
                await publish(exchange, "k", b"not json {")
                await publish(exchange, "k", b'{"json": true}')
                await reader.wait_for("message", 2)
                await expect(
                    server,
                    {
                        ("tc_events_broker_messages_not_json_total", ()): 1,
                        ("tc_events_broker_messages_received_total", ()): 2,
                        ("tc_events_broker_reconnects_total", ()): 0,
                    },
                )
                proxy.cut()
                proxy.restore()
                await reader.wait_for("ready", 2, timeout=30)
                await expect(server, {("tc_events_broker_reconnects_total", ()): 1})
                await reader.wait_for("ping", 2, timeout=10)
                pings = len(reader.named("ping"))
                ticks = scrape(server)[("tc_events_ping_lateness_seconds_count", ())]
                # Each tick pings the stream: at least as many ticks as pings it got.
                assert pings >= 1 and ticks >= pings
