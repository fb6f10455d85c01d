"""The open files limit: raised at start, said in the start line, streams kept within
it, the rest answered as over the limit, health probes served, failed accepts logged."""

from __future__ import annotations

import contextlib
import re
import socket
from pathlib import Path

import httpx
import pytest
from helpers import EventsServer, SSEReader, wait_until

from quart_events.descriptors import streams_allowed

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def somaxconn() -> int:
    """The kernel's cap on a listen queue."""
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


async def test_streams_stay_within_the_open_files_limit_and_probes_get_in() -> None:
    """Soft 128, hard 256 (as a service manager may start it): the server raises the soft
    limit to 256, says so, and takes at most what 256 leaves after its reserve; the
    streams beyond get the over-limit answer, and health probes are answered, where once
    every connection past the limit was reset, probes included."""
    server = EventsServer.start(open_files=(128, 256))
    try:
        allowed = streams_allowed(256)
        line = next(line for line in server.output().splitlines() if "listening on" in line)
        assert f"open files limit 256, at most {allowed} streams, listen backlog " in line
        cap = somaxconn()
        granted = f"{cap} (net.core.somaxconn)" if cap < 65535 else "65535"
        assert line.endswith(f"listen backlog {granted}")  # what caps a crowd's queue
        assert f"server.max_streams lowered from 20000 to {allowed}" in server.output()
        readers = [SSEReader(server.url([])) for _ in range(allowed)]
        for reader in readers:
            await reader.__aenter__()
        try:
            for reader in readers:
                await reader.wait_for("ready", timeout=30)
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(20):
                    over = await client.get(server.url([]))
                    assert over.status_code == 503
                    assert over.text == "Too many streams on this server; retry later.\n"
                    source = await client.get(
                        server.url([]), headers={"Accept": "text/event-stream"}
                    )
                    assert source.text.startswith("event: reconnect\n")
                    health = await client.get(f"{server.base}/__lbheartbeat__")
                    assert health.status_code == 200
        finally:
            for reader in readers:
                await reader.close()
    finally:
        server.stop()


async def test_a_process_close_to_its_open_files_limit_says_so() -> None:
    """Connections that hold descriptors without being streams (idle sockets) can still
    exhaust them, and under uvloop a failed accept is never reported to the application:
    the log says when the process is close to the limit, and when it is back."""
    server = EventsServer.start(open_files=(64, 64))
    sockets: list[socket.socket] = []
    try:
        for _ in range(120):
            with contextlib.suppress(OSError):
                sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
        await wait_until(lambda: "open files nearly exhausted" in server.output(), timeout=10)
        assert re.search(r"open files nearly exhausted: \d+ of 64 in use", server.output())
        for held in sockets:
            held.close()
        sockets.clear()
        await wait_until(lambda: "open files back to" in server.output(), timeout=10)
        async with httpx.AsyncClient(timeout=10) as client:  # served again once they left
            health = await client.get(f"{server.base}/__lbheartbeat__")
            assert health.status_code == 200
    finally:
        for held in sockets:
            held.close()
        server.stop()
