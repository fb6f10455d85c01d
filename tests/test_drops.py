"""Messages the broker drops at `pulse.queue_max_length` are counted, logged, and the
streams are told (a second `ready`: re-check), where once they left no trace."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import aio_pika
import httpx
import pytest
from helpers import AMQP_URL, EventsServer, SSEReader, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PUBLISHED = 30_000


async def test_drops_at_the_queue_length_limit_are_counted_logged_and_told() -> None:
    env = {"TC_EVENTS_PULSE__QUEUE_MAX_LENGTH": "1000"}
    exchange_name = f"exchange/test/drops-{os.getpid()}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        with EventsServer.running(env) as server:
            binding = [{"exchange": exchange_name, "routingKeyPattern": "#"}]
            async with SSEReader(server.url(binding)) as reader:
                await reader.wait_for("ready")
                server.process.send_signal(signal.SIGSTOP)  # the process falls behind
                try:
                    body = b'{"filler": "' + b"x" * 450 + b'"}'  # 15 MB: more than sockets hold
                    for n in range(PUBLISHED):
                        await exchange.publish(aio_pika.Message(body), routing_key=f"k.{n}")
                    await asyncio.sleep(2)
                finally:
                    server.process.send_signal(signal.SIGCONT)
                await wait_until(lambda: server.stats()["dropped"] > 0, timeout=20)
                await reader.wait_for("ready", 2, timeout=20)  # told: re-check
                seen: list[int] = []

                def settled() -> bool:  # nothing more arrives
                    stats = server.stats()
                    seen.append(stats["deliveries"] + stats["dropped"])
                    return len(seen) > 3 and seen[-1] == seen[-4]

                await wait_until(settled, timeout=30, interval=0.5)
                stats = server.stats()
                assert 0 < stats["dropped"] <= PUBLISHED - stats["deliveries"]
                print(f"\n{stats['dropped']:,} of {PUBLISHED:,} counted as dropped, ", end="")
                print(f"{stats['deliveries']:,} received")
                assert re.search(
                    r"the broker dropped \d+ messages from this process's queue "
                    r"\(pulse.queue_max_length 1000: the process fell behind\); "
                    r"1 streams told to re-check with ready",
                    server.output(),
                )
                async with httpx.AsyncClient() as client:
                    text = (await client.get(f"{server.base}/metrics")).text
                found = re.search(r"^tc_events_broker_messages_dropped_total (\S+)$", text, re.M)
                assert found and float(found.group(1)) > 0


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (Linux ``VmHWM``), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_a_body_over_the_size_limit_is_not_parsed_and_its_streams_are_told(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    """A 32 MiB body of `[{},{},...]` once raised the peak RSS by 1,006 MiB (the strict-JSON
    check builds the whole tree) and stalled health answers 883 ms. Over
    `pulse.max_message_bytes` (1 MiB by default) it is counted and not delivered, its
    streams get `ready` again (re-check), and the next message arrives as usual."""
    with EventsServer.running() as server:
        binding = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
        async with SSEReader(server.url(binding)) as reader:
            await reader.wait_for("ready")
            before = peak_rss(server.process.pid)
            huge = b"[" + b"{}," * (32 * 2**20 // 3) + b"{}]"
            await exchange.publish(aio_pika.Message(huge), routing_key="huge")
            await reader.wait_for("ready", 2, timeout=30)
            await exchange.publish(aio_pika.Message(b'{"small": 1}'), routing_key="small")
            await reader.wait_for("message")
            assert [m["routingKey"] for m in reader.data("message")] == ["small"]
            grew = peak_rss(server.process.pid) - before
            print(f"\npeak RSS grew {grew / 2**20:.0f} MiB for a {len(huge) / 2**20:.0f} MiB body")
            assert grew < 100 * 2**20  # the body itself, not a tree of it
            stats = server.stats()
            assert stats["too_large"] == 1
            await wait_until(
                lambda: (
                    "1 messages over pulse.max_message_bytes (1048576) were not delivered"
                    in server.output()
                ),
                timeout=5,
            )
