"""A client that vanishes without closing its socket (its network goes away): the
server finds out through its own writes (pings) and cleans the stream up.

The client runs in a network namespace of its own, joined to this one by a veth
pair; taking the link down drops every packet, with no FIN and no RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from helpers import EventsServer, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.netns]

CLIENT = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), 5)
sock.sendall(b"GET /api/events/v1/connect/?bindings=%7B%22bindings%22%3A%5B%5D%7D "
             b"HTTP/1.1\r\nHost: x\r\n\r\n")
received = b""
while b"event: ready" not in received:
    received += sock.recv(4096)
print("ready", flush=True)
time.sleep(3600)
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def client_namespace() -> Iterator[tuple[str, str, str]]:
    """(namespace, the server's address as the client sees it, the host-side link)."""
    tag = uuid.uuid4().hex[:6]
    namespace, host_link, client_link = f"tcev-{tag}", f"tceh{tag}", f"tcec{tag}"
    subnet = f"10.213.{random.randint(0, 255)}"
    try:
        ip("netns", "add", namespace)
        ip("link", "add", host_link, "type", "veth", "peer", "name", client_link)
        ip("link", "set", client_link, "netns", namespace)
        ip("addr", "add", f"{subnet}.1/30", "dev", host_link)
        ip("link", "set", host_link, "up")
        ip("netns", "exec", namespace, "ip", "addr", "add", f"{subnet}.2/30", "dev", client_link)
        ip("netns", "exec", namespace, "ip", "link", "set", client_link, "up")
        yield namespace, f"{subnet}.1", host_link
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", host_link)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("netns", "del", namespace)


async def test_a_vanished_client_is_found_by_failed_writes_and_cleaned_up() -> None:
    env = {"TC_EVENTS_SERVER__WRITE_TIMEOUT": "3"}
    with (
        client_namespace() as (namespace, server_address, host_link),
        EventsServer.running(env, args=["--host", "0.0.0.0"]) as server,
    ):
        client = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            "-c",
            CLIENT,
            server_address,
            str(server.port),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert client.stdout is not None
            assert await asyncio.wait_for(client.stdout.readline(), 20) == b"ready\n"
            assert server.stats()["streams"] == 1
            ip("link", "set", host_link, "down")  # the client's network is gone: no FIN, no RST
            # Pings every second (test profile) cannot be delivered; after write_timeout
            # the kernel fails the connection and the stream is cleaned up.
            await wait_until(lambda: server.stats()["streams"] == 0, timeout=30, interval=0.5)
            assert server.stats()["buffered_bytes"] == 0
        finally:
            client.kill()
            await client.wait()
