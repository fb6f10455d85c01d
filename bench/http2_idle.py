"""Memory per idle stream over TLS: HTTP/2 (100 streams per connection) against HTTP/1.1.

Starts its own tc-events server with a throw-away certificate, opens the streams
(empty bindings: ready, then pings), and prints the server's resident memory per
stream, with the CPU seconds of the server and of this client process.

    .venv/bin/python bench/http2_idle.py [--streams 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, cpu_of, free_port, rss_of

TARGET = "/api/events/v1/connect/?" + urllib.parse.urlencode({"bindings": '{"bindings": []}'})


def certificate(where: Path) -> tuple[Path, Path]:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(where / "key.pem"), "-out", str(where / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return where / "cert.pem", where / "key.pem"


async def hold(port: int, streams: int, http2: bool, cert: Path) -> list[asyncio.Task[None]]:
    """Open ``streams`` streams and keep reading them; return once every one is ready."""
    per_connection = 100 if http2 else 1
    connections = -(-streams // per_connection)
    clients = [
        httpx.AsyncClient(
            http2=http2,
            verify=ssl.create_default_context(cafile=str(cert)),
            limits=httpx.Limits(max_connections=1),
            timeout=httpx.Timeout(60, read=None),
        )
        for _ in range(connections)
    ]
    ready = asyncio.Semaphore(0)

    async def follow(client: httpx.AsyncClient) -> None:
        async with client.stream("GET", f"https://localhost:{port}{TARGET}") as response:
            first = True
            async for _ in response.aiter_raw():
                if first:
                    ready.release()
                    first = False

    tasks = [asyncio.ensure_future(follow(clients[n // per_connection])) for n in range(streams)]
    for _ in range(streams):
        await asyncio.wait_for(ready.acquire(), 120)
    return tasks


def start_server(port: int, cert: Path, key: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TC_EVENTS_SERVER__MAX_STREAMS": "50000", "PULSE_NAMESPACE": "bench-h2"}
    server = subprocess.Popen(
        [sys.executable, "-m", "quart_events", "server", "--port", str(port),
         "--certfile", str(cert), "--keyfile", str(key)],
        env=env, cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(3)
    return server


async def measure(streams: int, http2: bool, cert: Path, key: Path) -> str:
    port = free_port()
    server = await asyncio.to_thread(start_server, port, cert, key)
    try:
        before, cpu_before = rss_of(server.pid), cpu_of(server.pid)
        client_before = resource.getrusage(resource.RUSAGE_SELF)
        tasks = await hold(port, streams, http2, cert)
        await asyncio.sleep(5)
        after = rss_of(server.pid)
        client_after = resource.getrusage(resource.RUSAGE_SELF)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client_cpu = (client_after.ru_utime + client_after.ru_stime) - (
            client_before.ru_utime + client_before.ru_stime
        )
        server_cpu = cpu_of(server.pid) - cpu_before
        return (
            f"{'HTTP/2  ' if http2 else 'HTTP/1.1'} {streams} streams: "
            f"{(after - before) / streams / 1024:.1f} KiB per stream "
            f"(server RSS {after / 2**20:.0f} MiB; server CPU {server_cpu:.1f} s, "
            f"client CPU {client_cpu:.1f} s)"
        )
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as where:
        cert, key = certificate(Path(where))
        for http2 in (True, False):
            print(asyncio.run(measure(args.streams, http2, cert, key)), flush=True)


if __name__ == "__main__":
    main()
