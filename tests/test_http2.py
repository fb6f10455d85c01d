"""TLS and HTTP/2 (`--certfile`, `--keyfile`): many streams over one connection.

The certificates are made by the test (conftest's ``certificates``): a throw-away
CA and a certificate for localhost signed by it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from helpers import EventsServer, connect_target, publish, wait_until
from httpx_sse import aconnect_sse

pytestmark = pytest.mark.broker

Certificates = tuple[Path, Path, Path]


@pytest.fixture(scope="module")
def tls_server(certificates: Certificates) -> Iterator[EventsServer]:
    _, cert, key = certificates
    env = {"TC_EVENTS_SERVER__WRITE_TIMEOUT": "3", "TC_EVENTS_SERVER__BUFFER_BYTES": "65536"}
    with EventsServer.running(env, args=["--certfile", str(cert), "--keyfile", str(key)]) as server:
        yield server


def trusting(certificates: Certificates) -> ssl.SSLContext:
    """A client context that trusts the test's CA."""
    return ssl.create_default_context(cafile=str(certificates[0]))


def https(server: EventsServer) -> str:
    return f"https://localhost:{server.port}"


def stats(server: EventsServer, certificates: Certificates) -> dict[str, int]:
    response = httpx.get(f"{https(server)}/api/events/v1/__stats__", verify=trusting(certificates))
    return dict(response.json())


async def follow(client: httpx.AsyncClient, url: str, events: list[str]) -> None:
    async with aconnect_sse(client, "GET", url) as source:
        assert source.response.http_version == "HTTP/2"
        async for event in source.aiter_sse():
            events.append(event.event if event.event != "message" else event.data)


async def test_a_hundred_streams_over_one_http2_connection(
    tls_server: EventsServer, certificates: Certificates, exchange: aio_pika.abc.AbstractExchange
) -> None:
    server = tls_server
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(
        http2=True,
        verify=trusting(certificates),
        limits=limits,
        timeout=httpx.Timeout(30, read=None),
    ) as client:
        streams: list[list[str]] = [[] for _ in range(100)]
        tasks = [
            asyncio.ensure_future(
                follow(
                    client,
                    https(server)
                    + connect_target([{"exchange": exchange.name, "routingKeyPattern": f"s{n}.#"}]),
                    events,
                )
            )
            for n, events in enumerate(streams)
        ]
        try:
            await wait_until(lambda: all("ready" in events for events in streams), timeout=20)
            await publish(exchange, "s0.x.y", b'{"all": "of them"}')
            for n in range(100):
                await publish(exchange, f"s{n}.only", b'{"n": %d}' % n)

            def delivered() -> bool:
                counts = [sum(1 for e in events if e.startswith("{")) for events in streams]
                return counts[0] >= 2 and all(count >= 1 for count in counts)

            await wait_until(delivered, timeout=20)
            assert stats(server, certificates)["streams"] >= 100
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    # Each stream got exactly its own messages: none went to another HTTP/2 stream.
    for n, events in enumerate(streams):
        payloads = [json.loads(e)["payload"] for e in events if e.startswith("{")]
        assert payloads == ([{"all": "of them"}, {"n": 0}] if n == 0 else [{"n": n}]), n


def test_http11_clients_are_still_served_over_tls(
    tls_server: EventsServer, certificates: Certificates
) -> None:
    with httpx.Client(verify=trusting(certificates), timeout=10) as client:
        with client.stream("GET", https(tls_server) + connect_target([])) as response:
            assert response.http_version == "HTTP/1.1" and response.status_code == 200
            assert next(response.iter_raw()).startswith(b"event: ready")


class RawHttp2:
    """An HTTP/2 client on the h2 library, for what httpx does not do: reset one stream
    (httpx leaves a stream it stops reading open until the connection closes), or read
    the socket without ever giving the flow-control window back."""

    def __init__(self, server: EventsServer, ca: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("localhost", server.port), 5)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.authority = f"localhost:{server.port}"
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.connection.initiate_connection()
        self.received: dict[int, bytes] = {}
        self.acknowledge = True

    def open(self, target: str) -> int:
        stream_id = self.connection.get_next_available_stream_id()
        headers = [
            (":method", "GET"),
            (":path", target),
            (":scheme", "https"),
            (":authority", self.authority),
        ]
        self.connection.send_headers(stream_id, headers, end_stream=True)
        self.sock.sendall(self.connection.data_to_send())
        self.received[stream_id] = b""
        return stream_id

    def reset(self, stream_id: int) -> None:
        self.connection.reset_stream(stream_id)
        self.sock.sendall(self.connection.data_to_send())

    def read_for(self, seconds: float) -> None:
        """Read frames (answering pings and settings) for ``seconds``."""
        self.sock.settimeout(0.1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for event in self.connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.received[event.stream_id] += event.data
                    if self.acknowledge:
                        self.connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
            self.sock.sendall(self.connection.data_to_send())


async def test_a_stream_reset_by_its_client_is_cleaned_up_while_the_others_go_on(
    tls_server: EventsServer, certificates: Certificates, exchange: aio_pika.abc.AbstractExchange
) -> None:
    server = tls_server
    client = RawHttp2(server, certificates[0])
    streams = {
        client.open(
            connect_target([{"exchange": exchange.name, "routingKeyPattern": f"r{n}.#"}])
        ): n
        for n in range(3)
    }
    first, closed, last = streams
    reading = asyncio.ensure_future(asyncio.to_thread(client.read_for, 3))
    try:
        await wait_until(lambda: all(b"event: ready" in client.received[s] for s in streams))
        await reading
        assert (exchange.name, "r1.#") in server.broker_bindings()
        client.reset(closed)
        await wait_until(lambda: (exchange.name, "r1.#") not in server.broker_bindings(), 20, 0.5)
        reading = asyncio.ensure_future(asyncio.to_thread(client.read_for, 5))
        for n in range(3):
            await publish(exchange, f"r{n}.x", b'{"after": %d}' % n)
        await wait_until(
            lambda: (
                b'"after": 0' in client.received[first] and b'"after": 2' in client.received[last]
            )
        )
        assert b'"after": 1' not in client.received[closed]
    finally:
        client.sock.close()
        await asyncio.gather(reading, return_exceptions=True)


async def test_the_slow_client_limit_holds_under_http2_flow_control(
    tls_server: EventsServer, certificates: Certificates, exchange: aio_pika.abc.AbstractExchange
) -> None:
    server = tls_server
    before = stats(server, certificates)
    slow = RawHttp2(server, certificates[0])
    slow.acknowledge = False  # reads the socket, never gives the window back
    stream = slow.open(connect_target([{"exchange": exchange.name, "routingKeyPattern": "slow.#"}]))
    reading = asyncio.ensure_future(asyncio.to_thread(slow.read_for, 30))
    try:
        await wait_until(lambda: b"event: ready" in slow.received[stream], timeout=10)
        body = json.dumps({"pad": "x" * 10_000}).encode()
        for n in range(100):  # 1 MB: past the stream window (64 KiB) and the buffer (64 KiB)
            await publish(exchange, f"slow.{n}", body)
        await wait_until(lambda: stats(server, certificates)["too_slow"] > before["too_slow"])
        # Its frames can never go out: it is dropped after write_timeout, binding and all.
        # (at most as many as before: an earlier test's stream may end meanwhile too)
        await wait_until(lambda: stats(server, certificates)["streams"] <= before["streams"], 20)
        await wait_until(lambda: (exchange.name, "slow.#") not in server.broker_bindings(), 20)
    finally:
        slow.sock.close()
        await asyncio.gather(reading, return_exceptions=True)


async def test_sigterm_with_http2_clients_connected_ends_within_the_grace_period(
    certificates: Certificates,
) -> None:
    _, cert, key = certificates
    env = {"TC_EVENTS_SERVER__SHUTDOWN_GRACE": "3"}
    server = EventsServer.start(env, args=["--certfile", str(cert), "--keyfile", str(key)])
    ends: list[bytes] = []

    async def follow(client: httpx.AsyncClient) -> None:
        async with client.stream("GET", https(server) + connect_target([])) as response:
            async for chunk in response.aiter_raw():
                ends.append(chunk)

    client = httpx.AsyncClient(
        http2=True, verify=trusting(certificates), timeout=httpx.Timeout(30, read=None)
    )
    try:
        streams = [asyncio.ensure_future(follow(client)) for _ in range(3)]
        await wait_until(lambda: len(ends) >= 3)
        server.process.send_signal(signal.SIGTERM)
        # The client keeps its connection and never answers the TLS close: no matter.
        # (Unmended, asyncio waits 30 s for its close_notify: a safety timeout of 20 s
        # tells the two apart; tests/test_mends.py watches hypercorn's side.)
        assert await asyncio.to_thread(server.process.wait, 20) == 0
        await asyncio.gather(*streams, return_exceptions=True)
        assert ends[-1].endswith(
            b"\n\n"
        ) and b"event: reconnect\ndata: {}\nid:\nretry: " in b"".join(ends)
    finally:
        await client.aclose()
        server.stop()


async def test_the_buffers_of_ended_http2_streams_are_freed(
    certificates: Certificates, exchange: aio_pika.abc.AbstractExchange
) -> None:
    """99 streams on one HTTP/2 connection that stop reading, one 2 MiB message: once
    the process still held +293 MiB after the stuck-stream sweep had ended them
    (hypercorn kept each ended stream's buffer, and each send handed it the whole
    chunk). Now an ended stream is reset and its buffer freed, and one send hands
    over at most 256 KiB."""
    _, cert, key = certificates
    env = {"TC_EVENTS_SERVER__WRITE_TIMEOUT": "3", "TC_EVENTS_PULSE__MAX_MESSAGE_BYTES": str(2**22)}
    args = ["--certfile", str(cert), "--keyfile", str(key)]
    with EventsServer.running(env, args=args) as server:
        client = RawHttp2(server, certificates[0])
        client.acknowledge = False  # reads the socket, never gives the window back
        target = connect_target([{"exchange": exchange.name, "routingKeyPattern": "big.#"}])
        streams = [client.open(target) for _ in range(99)]
        reading = asyncio.ensure_future(asyncio.to_thread(client.read_for, 40))
        try:
            await wait_until(lambda: stats(server, certificates)["streams"] == 99, timeout=20)
            before = stats(server, certificates)["rss_bytes"]
            await publish(exchange, "big.one", json.dumps({"pad": "x" * 2**21}).encode())
            # The sweep ends every stream (none takes anything), and their buffers go.
            await wait_until(lambda: stats(server, certificates)["streams"] == 0, timeout=30)
            await asyncio.sleep(1)
            grown = stats(server, certificates)["rss_bytes"] - before
            print(f"\nRSS after the sweep: {grown / 2**20:+.0f} MiB")
            assert grown < 64 * 2**20
            assert len(streams) == 99
        finally:
            client.sock.close()
            await asyncio.gather(reading, return_exceptions=True)


async def test_a_tls_client_that_never_says_hello_is_let_go(tls_server: EventsServer) -> None:
    """A connection that never sends its ClientHello held a descriptor for hypercorn's
    default 60 s handshake timeout; now 5 s (asserted with room: under 30 s)."""

    def held_for() -> float:
        with socket.create_connection(("127.0.0.1", tls_server.port), 5) as idle:
            idle.settimeout(60)
            began = time.monotonic()
            assert idle.recv(1) == b""  # the server closed it, having heard nothing
            return time.monotonic() - began

    held = await asyncio.to_thread(held_for)
    print(f"\nan idle TLS connection was closed after {held:.1f} s")
    assert held < 30
