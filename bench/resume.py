"""Resumable streams: what the history costs and how fast it replays.

- ``replay``: one stream resumes from 100,000 messages back (1 KiB each): messages/s
  from the request to the last, and every process's CPU.
- ``live``: server CPU per message of one stream, history off against on (the writer
  copies every message of a kept exchange into the stream), and of one resumable
  stream (read from the history) with it on.
- ``memory``: 1,000 streams resuming at once from the same position: the server's
  RSS before and at its peak, and how long until every one has caught up.
- ``restart``: a crowd right after a restart (a new process, the same
  history), 50 messages back each: how long until every one has caught up.

Readers are raw sockets counting ``event: message`` with ``bytes.count`` (as lean as
the other benchmarks' SSE reader). Run: ``.venv/bin/python bench/resume.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiormq
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from clients import AMQP_URL
from run import (
    broker_pid,
    cpu_of,
    declare,
    events_server,
    publish,
    rss_of,
    tree_cpu,
)

MESSAGE = b"event: message\n"


def url_of(port: int, exchange: str, resume: bool, since: int | None = None) -> str:
    bindings = json.dumps({"bindings": [{"exchange": exchange, "routingKeyPattern": "#"}]})
    query = urllib.parse.urlencode({"bindings": bindings})
    extra = "&resume=true" if resume else ""
    if since is not None:
        extra += f"&since={since}"
    return f"/api/events/v1/connect/?{query}{extra}"


async def read(
    port: int,
    target: str,
    count: int,
    ready: asyncio.Event | None = None,
    stay: asyncio.Barrier | None = None,
) -> int:
    """Read one stream until ``count`` messages came; the last message's id (or -1).
    ``stay``: then keep the stream open until every reader of the crowd has its count
    (as browsers stay: a stream that leaves would free its replay's turn early)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    seen, tail, last = 0, b"", -1
    try:
        while seen < count:
            chunk = await reader.read(1 << 20)
            if not chunk:
                raise RuntimeError(f"the stream ended after {seen}: {tail[-200:]!r}")
            data = tail + chunk
            if ready is not None and b"event: ready" in data:
                ready.set()
            seen += data.count(MESSAGE, max(0, len(tail) - len(MESSAGE) + 1))
            tail = data[-(len(MESSAGE) + 40) :]
            at = data.rfind(b"\nid: ")
            if at >= 0:
                end = data.find(b"\n", at + 5)
                if end > 0 and data[at + 5 : end].isdigit():
                    last = int(data[at + 5 : end])
        if stay is not None:
            await stay.wait()
    finally:
        writer.close()
    return last


def stats(port: int) -> dict[str, Any]:
    return dict(httpx.get(f"http://127.0.0.1:{port}/api/events/v1/__stats__", timeout=10).json())


async def position_now(port: int, exchange: str) -> int:
    """The position of a message published now: where a replay starts after."""
    ready = asyncio.Event()
    reading = asyncio.ensure_future(read(port, url_of(port, exchange, True), 1, ready))
    await asyncio.wait_for(ready.wait(), 30)
    await publish(exchange, 1)
    return await asyncio.wait_for(reading, 30)


async def wait_written(port: int, count: int) -> None:
    deadline = time.time() + 300
    while stats(port)["history"]["written"] < count:
        if time.time() > deadline:
            raise RuntimeError("the history did not take every message")
        await asyncio.sleep(0.2)


async def drop_history(namespace: str) -> None:
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel()
    for queue in (f"queue/{namespace}/events/history", f"queue/{namespace}/events/history-feed"):
        await channel.queue_delete(queue)
    await connection.close()


def kept(exchange: str) -> dict[str, str]:
    return {"TC_EVENTS_HISTORY__EXCHANGES": json.dumps([exchange])}


def replay(messages: int) -> dict[str, Any]:
    exchange = f"bench-{os.urandom(4).hex()}"
    asyncio.run(declare(exchange))
    try:
        with events_server(kept(exchange)) as server:
            try:
                return asyncio.run(_replay(server.port, server.process.pid, exchange, messages))
            finally:
                asyncio.run(drop_history(server.namespace))
    finally:
        asyncio.run(declare(exchange, delete=True))


async def _replay(port: int, pid: int, exchange: str, messages: int) -> dict[str, Any]:
    start = await position_now(port, exchange)
    began = time.time()
    server_before = tree_cpu(pid)
    await publish(exchange, messages)
    await wait_written(port, messages + 1)
    writing = {"written_per_s": messages / (time.time() - began)}
    writing["writer_server_cpu_s"] = tree_cpu(pid) - server_before
    print("replay: written", writing, flush=True)
    broker = broker_pid()
    server_before, broker_before = tree_cpu(pid), cpu_of(broker)
    client_before = time.process_time()
    began = time.time()
    await read(port, url_of(port, exchange, True, start), messages)
    elapsed = time.time() - began
    return {
        **writing,
        "messages": messages,
        "per_s": messages / elapsed,
        "elapsed_s": elapsed,
        "server_cpu_s": tree_cpu(pid) - server_before,
        "broker_cpu_s": cpu_of(broker) - broker_before,
        "client_cpu_s": time.process_time() - client_before,
    }


def live(messages: int) -> dict[str, Any]:
    """Server CPU per message (microseconds): off, on (plain stream), on (resumable)."""
    figures: dict[str, Any] = {}
    for name, history, resume in (
        ("off", False, False),
        ("on", True, False),
        ("resumed", True, True),
    ):
        exchange = f"bench-{os.urandom(4).hex()}"
        asyncio.run(declare(exchange))
        try:
            with events_server(kept(exchange) if history else None) as server:
                try:
                    figures[name] = asyncio.run(
                        _live(server.port, server.process.pid, exchange, messages, resume, history)
                    )
                finally:
                    if history:
                        asyncio.run(drop_history(server.namespace))
        finally:
            asyncio.run(declare(exchange, delete=True))
    return figures


async def _live(
    port: int, pid: int, exchange: str, messages: int, resume: bool, history: bool
) -> dict[str, Any]:
    if history:  # the exchange is kept from the first resumable stream on
        await position_now(port, exchange)
    ready = asyncio.Event()
    reading = asyncio.ensure_future(read(port, url_of(port, exchange, resume), messages, ready))
    await asyncio.wait_for(ready.wait(), 30)
    broker = broker_pid()
    server_before, broker_before = tree_cpu(pid), cpu_of(broker)
    began = time.time()
    await publish(exchange, messages)
    await asyncio.wait_for(reading, 300)
    elapsed = time.time() - began
    if history:  # the writer's work for these messages counts too
        await wait_written(port, messages + 1)
    server = tree_cpu(pid) - server_before
    return {
        "server_us_per_message": server / messages * 1e6,
        "server_cpu_s": server,
        "broker_cpu_s": cpu_of(broker) - broker_before,
        "per_s": messages / elapsed,
    }


def memory(streams: int, messages: int) -> dict[str, Any]:
    exchange = f"bench-{os.urandom(4).hex()}"
    asyncio.run(declare(exchange))
    try:
        with events_server(kept(exchange)) as server:
            try:
                return asyncio.run(
                    _memory(server.port, server.process.pid, exchange, streams, messages)
                )
            finally:
                asyncio.run(drop_history(server.namespace))
    finally:
        asyncio.run(declare(exchange, delete=True))


async def _memory(
    port: int, pid: int, exchange: str, streams: int, messages: int
) -> dict[str, Any]:
    start = await position_now(port, exchange)
    await publish(exchange, messages)
    await wait_written(port, messages + 1)
    before = rss_of(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss_of(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        figures = await _crowd(port, pid, exchange, streams, messages, start)
    finally:
        done.set()
        sampler.join()
    return {**figures, "rss_before_mib": before / 2**20, "rss_peak_mib": peak[0] / 2**20}


def restart(streams: int, messages: int) -> dict[str, Any]:
    exchange = f"bench-{os.urandom(4).hex()}"
    asyncio.run(declare(exchange))
    try:
        with events_server(kept(exchange)) as first:
            start = asyncio.run(position_now(first.port, exchange))
            asyncio.run(publish(exchange, messages))
            asyncio.run(wait_written(first.port, messages + 1))
        again = {**kept(exchange), "PULSE_NAMESPACE": first.namespace}
        with events_server(again) as server:
            try:
                return asyncio.run(
                    _crowd(server.port, server.process.pid, exchange, streams, messages, start)
                )
            finally:
                asyncio.run(drop_history(server.namespace))
    finally:
        asyncio.run(declare(exchange, delete=True))


async def _crowd(
    port: int, pid: int, exchange: str, streams: int, messages: int, start: int
) -> dict[str, Any]:
    """``streams`` readers resume at once from ``start`` and stay until all have their
    ``messages``: how long that took, and every process's CPU meanwhile."""
    broker = broker_pid()
    server_before, broker_before = tree_cpu(pid), cpu_of(broker)
    client_before = time.process_time()
    began = time.time()
    target = url_of(port, exchange, True, start)
    crowd = asyncio.Barrier(streams)
    await asyncio.gather(*(read(port, target, messages, stay=crowd) for _ in range(streams)))
    elapsed = time.time() - began
    return {
        "streams": streams,
        "messages_each": messages,
        "all_caught_up_s": elapsed,
        "server_cpu_s": tree_cpu(pid) - server_before,
        "broker_cpu_s": cpu_of(broker) - broker_before,
        "client_cpu_s": time.process_time() - client_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    workloads = ["replay", "live", "memory", "restart"]
    parser.add_argument("workloads", nargs="*", default=workloads, choices=workloads)
    parser.add_argument("--replay-messages", type=int, default=100_000)
    parser.add_argument("--live-messages", type=int, default=20_000)
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--messages-each", type=int, default=1_000)
    parser.add_argument("--after-restart", type=int, default=50, help="messages back each")
    args = parser.parse_args()
    if "replay" in args.workloads:
        print("replay:", replay(args.replay_messages), flush=True)
    if "live" in args.workloads:
        print("live:", live(args.live_messages), flush=True)
    if "memory" in args.workloads:
        print("memory:", memory(args.streams, args.messages_each), flush=True)
    if "restart" in args.workloads:
        print("restart:", restart(args.streams, args.after_restart), flush=True)


if __name__ == "__main__":
    main()
