"""Garbage-collector passes and pauses of a busy server, with and without its GC tuning.

    .venv/bin/python bench/gc_pauses.py [--streams 5000] [--seconds 20] [--gc tuned|default]
                                        [--young N]

Serves the app in this process (so ``gc.callbacks`` can time every pass), opens
``--streams`` idle streams from a client process, then publishes 20 messages of
1 KiB every 100 ms to all of them for ``--seconds``, and prints, per generation,
the passes, the longest and the total pause; then the time of one forced full pass
over what the process then holds. ``--gc default`` leaves Python's thresholds and
does not freeze the start-up objects; ``--young N`` tries the tuning with young
passes every N allocations.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiormq
import uvloop

import quart_events.service as service_module
from quart_events.app import create_app, service_of
from quart_events.serve import serve_app
from quart_events.settings import load_settings

CLIENT = r"""
import asyncio, json, sys, urllib.parse
port, n, exchange = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
bindings = json.dumps({"bindings": [{"exchange": exchange, "routingKeyPattern": "bench.#"}]})
query = urllib.parse.urlencode({"bindings": bindings})
async def one():
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(f"GET /api/events/v1/connect/?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    while await reader.read(1 << 20):
        pass
async def main():
    await asyncio.gather(*(one() for _ in range(n)))
asyncio.run(main())
"""
EXCHANGE = "bench-gc-pauses"


async def measure(streams: int, seconds: float, tuned: bool, port: int, young: int | None) -> None:
    os.environ["TC_EVENTS_SERVER__PORT"] = str(port)
    os.environ["TC_EVENTS_SERVER__MAX_STREAMS"] = str(streams + 100)
    if not tuned:
        service_module.tune_garbage_collector = lambda: None
    elif young is not None:
        service_module.GC_THRESHOLDS = (young, *service_module.GC_THRESHOLDS[1:])
    app = create_app(load_settings("test"), lifecycle=False)
    server = asyncio.ensure_future(serve_app(app))
    connection = await aiormq.connect("amqp://guest:guest@127.0.0.1/")
    channel = await connection.channel(publisher_confirms=False)
    await channel.exchange_declare(EXCHANGE, exchange_type="topic")
    while service_of(app).broker.node is None:  # noqa: ASYNC110 (polling the service)
        await asyncio.sleep(0.1)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        str(port),
        str(streams),
        EXCHANGE,
        stdout=subprocess.DEVNULL,
    )
    try:
        while len(service_of(app).hub.subscribers) < streams:  # noqa: ASYNC110 (polling)
            await asyncio.sleep(0.5)
        pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        began = [0.0]

        def timed(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                pauses[info["generation"]].append(time.perf_counter() - began[0])

        gc.callbacks.append(timed)
        body = json.dumps({"pad": "x" * 1000}).encode()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(20):
                await channel.basic_publish(body, exchange=EXCHANGE, routing_key="bench.1")
            await asyncio.sleep(0.1)
        gc.callbacks.remove(timed)
        mode = f"tuned {gc.get_threshold()}" if tuned else "Python's defaults"
        print(f"{streams} streams, {seconds:g} s of 200 messages/s to each, GC {mode}:")
        for generation, times in pauses.items():
            longest = max(times, default=0.0) * 1000
            print(
                f"  generation {generation}: {len(times)} passes, longest {longest:.1f} ms, "
                f"in all {sum(times) * 1000:.0f} ms"
            )
        started = time.perf_counter()
        gc.collect()
        print(
            f"  one forced full pass: {(time.perf_counter() - started) * 1000:.0f} ms "
            f"({len(gc.get_objects())} objects tracked)"
        )
    finally:
        client.kill()
        await client.wait()
        await channel.exchange_delete(EXCHANGE)
        await connection.close()
        os.kill(os.getpid(), signal.SIGTERM)
        await server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--gc", choices=("tuned", "default"), default="tuned")
    parser.add_argument("--port", type=int, default=12778)
    parser.add_argument("--young", type=int, default=None, help="young-pass threshold to try")
    args = parser.parse_args()
    uvloop.run(measure(args.streams, args.seconds, args.gc == "tuned", args.port, args.young))


if __name__ == "__main__":
    main()
