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
                    body = b'{"filler": "' + b"x" * 200 + b'"}'
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
