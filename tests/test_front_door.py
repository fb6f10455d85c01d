"""The front door: plain-HTTP/1.1 streams served on their transports, every other
connection handed to hypercorn. What a client sees is the same either way, so each
answer here is compared with the same server's answer with the front door off."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator

import aio_pika
import pytest
from helpers import EventsServer, connect_target, publish, wait_until

from quart_events.front_door import HEAD_TIMEOUT

pytestmark = pytest.mark.broker

DATE = re.compile(rb"\r\ndate: [^\r]*")


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[EventsServer, EventsServer]]:
    """(front door on, front door off): the same settings otherwise."""
    with (
        EventsServer.running({"TC_EVENTS_SERVER__PING_INTERVAL": "60"}) as front,
        EventsServer.running(
            {"TC_EVENTS_SERVER__PING_INTERVAL": "60", "TC_EVENTS_SERVER__FRONT_DOOR": "false"}
        ) as plain,
    ):
        yield front, plain


class Raw:
    """A raw HTTP/1.1 connection: what is written, and the bytes that come back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: EventsServer) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    def get(self, target: str, *headers: str) -> None:
        lines = [f"GET {target} HTTP/1.1", "Host: events.test", *headers, "", ""]
        self.writer.write("\r\n".join(lines).encode())

    async def head(self) -> bytes:
        """The response head, its date line left out (it is the only line that differs)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        return DATE.sub(b"", head)

    async def chunked_body(self, until: bytes | None = None) -> bytes:
        """A chunked body, decoded: to its end, or until it holds ``until``."""
        body = b""
        while until is None or until not in body:
            size = int(await asyncio.wait_for(self.reader.readuntil(b"\r\n"), 10), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return body
            body += chunk[:-2]
        return body

    def close(self) -> None:
        self.writer.close()


async def test_a_stream_is_framed_as_hypercorn_frames_it(
    servers: tuple[EventsServer, EventsServer], exchange: aio_pika.abc.AbstractExchange
) -> None:
    target = connect_target([{"exchange": exchange.name, "routingKeyPattern": "#"}])
    seen = []
    for server in servers:
        raw = await Raw.open(server)
        raw.get(target, "Accept: text/event-stream")
        head = await raw.head()
        body = await raw.chunked_body(b"event: ready")
        await publish(exchange, "a.b", b'{"n": 1}')
        body += await raw.chunked_body(b"event: message")  # a frame is one chunk
        seen.append((head, body))
        raw.close()
    assert seen[0] == seen[1]
    head, body = seen[0]
    assert head.startswith(b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert b'data: {"payload":{"n": 1},"exchange":"' in body


STREAM = "GET /api/events/v1/connect/?bindings=zz HTTP/1.1\r\n"
ASKED = {
    "another route": "GET /__lbheartbeat__ HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/1.0": "GET /api/events/v1/connect/?bindings=zz HTTP/1.0\r\n\r\n",
    "POST": "POST /api/events/v1/connect/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    "no Host": "GET /api/events/v1/connect/?bindings=zz HTTP/1.1\r\n\r\n",
    "two Hosts": "GET /api/events/v1/connect/?bindings=zz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "a bad header": STREAM + "Host: x\r\nno colon\r\n\r\n",
    "a folded header": (
        "GET /api/events/v1/connect/?bindings=zz HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n"
    ),
    "an escaped path": "GET /api/events/v1/%63onnect/?bindings=zz HTTP/1.1\r\nHost: x\r\n\r\n",
    "a bad stream": "GET /api/events/v1/connect/?bindings=zz HTTP/1.1\r\nHost: x\r\n\r\n",
    "the end of one": STREAM + "Host: x\r\nLast-Event-ID: -\r\n\r\n",
    "a long head": "GET /api/events/v1/connect/ HTTP/1.1\r\nHost: x\r\nA: "
    + "a" * 60_000
    + "\r\n\r\n",
    "a long target": "GET /api/events/v1/connect/?bindings="
    + "a" * 40_000
    + " HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("request_text", ASKED.values(), ids=ASKED.keys())
async def test_every_answer_is_the_one_hypercorn_gives(
    servers: tuple[EventsServer, EventsServer], request_text: str
) -> None:
    answers = []
    for server in servers:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_text.encode())
        # Each answer is complete within the keep-alive timeout, after which the server
        # closes an idle connection (both do): read to the end.
        answers.append(DATE.sub(b"", await asyncio.wait_for(reader.read(), 30)))
        writer.close()
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.")


async def test_a_connection_kept_after_its_stream_serves_the_next_requests(
    servers: tuple[EventsServer, EventsServer],
) -> None:
    front, _ = servers
    raw = await Raw.open(front)
    raw.get(connect_target("not json"))
    assert b" 200 " in await raw.head()
    assert b"event: error" in await raw.chunked_body()
    raw.get("/__lbheartbeat__")
    assert (await raw.head()).startswith(b"HTTP/1.1 200 ")
    assert await raw.reader.readexactly(2) == b"{}"
    raw.get(connect_target("not json"), "Last-Event-ID: -")
    assert (await raw.head()).startswith(b"HTTP/1.1 204 ")
    raw.close()


async def test_a_connection_that_asks_nothing_is_closed(
    servers: tuple[EventsServer, EventsServer],
) -> None:
    front, _ = servers
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(b"GET /api/events/v1/connect/?bind")  # and never the rest
    assert await asyncio.wait_for(reader.read(), HEAD_TIMEOUT + 30) == b""
    writer.close()


async def test_a_client_that_floods_its_stream_is_cut_and_the_rest_go_on(
    servers: tuple[EventsServer, EventsServer], exchange: aio_pika.abc.AbstractExchange
) -> None:
    front, _ = servers
    target = connect_target([{"exchange": exchange.name, "routingKeyPattern": "#"}])
    calm, flood = await Raw.open(front), await Raw.open(front)
    for raw in (calm, flood):
        raw.get(target)
        await raw.head()
        await raw.chunked_body(b"event: ready")
    before = front.stats()["streams"]
    flood.writer.write(b"x" * 200_000)  # nothing a stream reads: the server cuts it
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(flood.reader.read(65536), 10):
            pass
    await wait_until(lambda: front.stats()["streams"] == before - 1)
    await publish(exchange, "a", b"{}")
    assert b"event: message" in await calm.chunked_body(b"event: message")
    calm.close()
    flood.close()
