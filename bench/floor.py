"""The memory floor of an idle SSE stream under hypercorn and uvloop, with no app logic.

    .venv/bin/python bench/floor.py [--streams 10000] [--watch]

A bare ASGI app answers each request with one event and then waits forever
(``--watch``: waits in a task for the client's disconnect, as a real stream must).
Prints the server's RSS growth per open stream: what hypercorn itself costs, to
compare with bench/run.py's `idle` figure for tc-events.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any

import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config

CLIENT = r"""
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def one():
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /api/events/v1/connect/?bindings=%7B%22bindings%22%3A%5B%5D%7D "
                 b"HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"event: ready")
    await asyncio.sleep(3600)
async def main():
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_app(watch: bool) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send(
            {
                "type": "http.response.body",
                "body": b"event: ready\ndata: {}\nid: -\n\n",
                "more_body": True,
            }
        )
        if watch:

            async def until_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            await asyncio.ensure_future(until_disconnect())
        else:
            await asyncio.sleep(3600)

    return app


async def measure(streams: int, watch: bool) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096
    config.errorlog = None
    server = asyncio.ensure_future(serve(make_app(watch), config))
    await asyncio.sleep(1)
    before = rss()
    clients = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(port), str(streams // 4)
        )
        for _ in range(4)
    ]
    await asyncio.sleep(15)
    grown = rss() - before
    for client in clients:
        client.kill()
    print(
        f"{'with' if watch else 'without'} a disconnect watcher: "
        f"{grown / streams / 1024:.1f} KiB per stream ({streams} streams)"
    )
    server.cancel()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--watch", action="store_true")
    args = parser.parse_args()
    uvloop.run(measure(args.streams, args.watch))


if __name__ == "__main__":
    main()
