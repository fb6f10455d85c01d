"""The three kinds of subscriber a benchmark drives, each reporting `ready` and messages.

- ``sse``: this service, read over a raw asyncio socket (a browser's cost, not httpx's).
- ``stomp``: RabbitMQ Web-STOMP, `/exchange/<name>/<pattern>` over a websocket.
- ``amqp``: a raw AMQP consumer (aiormq, no-ack): the broker's own limit.

A subscriber calls ``on_message(body_timestamp_or_None)`` per message; the timestamp is
read only when ``want_times`` (latency runs), to keep the load generator cheap.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable

import aiormq
import websockets

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
STOMP_URL = "ws://127.0.0.1:15674/ws"

OnMessage = Callable[[float | None], None]


def _timestamp(data: bytes) -> float:
    return float(json.loads(data)["payload"]["t"])


async def sse(
    port: int,
    exchange: str,
    pattern: str,
    ready: asyncio.Event,
    on_message: OnMessage,
    want_times: bool,
    on_ping: Callable[[], None] | None = None,
) -> None:
    bindings = json.dumps({"bindings": [{"exchange": exchange, "routingKeyPattern": pattern}]})
    query = urllib.parse.urlencode({"bindings": bindings})
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(f"GET /api/events/v1/connect/?{query} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    pending = b""
    try:
        while chunk := await reader.read(1 << 20):
            pending += chunk
            frames = pending.split(b"\n\n")
            pending = frames.pop()
            for frame in frames:
                # Chunked transfer encoding puts size lines between writes: find the event line.
                start = frame.find(b"event: ")
                if start < 0:
                    continue
                name_end = frame.find(b"\n", start)
                name = frame[start + 7 : name_end]
                if name == b"message":
                    if want_times:
                        data = frame[name_end + 7 : frame.find(b"\nid: ", name_end)]
                        on_message(_timestamp(data))
                    else:
                        on_message(None)
                elif name == b"ready":
                    ready.set()
                elif name == b"ping":
                    if on_ping is not None:
                        on_ping()
                elif name == b"error":
                    raise RuntimeError(f"stream error: {frame!r}")
    finally:
        writer.close()


async def stomp(
    port: int,
    exchange: str,
    pattern: str,
    ready: asyncio.Event,
    on_message: OnMessage,
    want_times: bool,
) -> None:
    del port
    async with websockets.connect(
        STOMP_URL,
        subprotocols=[websockets.Subprotocol("v12.stomp")],
        max_size=None,
        compression=None,
    ) as socket:
        await socket.send("CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0")
        connected = await socket.recv()
        if not str(connected).startswith("CONNECTED"):
            raise RuntimeError(f"STOMP refused: {connected!r}")
        await socket.send(
            f"SUBSCRIBE\nid:0\ndestination:/exchange/{exchange}/{pattern}\nack:auto\n"
            "receipt:subscribed\n\n\0"
        )
        async for payload in socket:
            text = payload if isinstance(payload, str) else payload.decode()
            # One websocket message may carry several STOMP frames, each ending in NUL.
            for frame in text.split("\0"):
                frame = frame.lstrip("\n")
                if frame.startswith("MESSAGE"):
                    if want_times:
                        body = frame[frame.index("\n\n") + 2 :]
                        on_message(float(json.loads(body)["t"]))
                    else:
                        on_message(None)
                elif frame.startswith("RECEIPT"):
                    ready.set()
                elif frame.startswith("ERROR"):
                    raise RuntimeError(f"STOMP error: {frame[:200]!r}")


async def amqp(
    connection: aiormq.abc.AbstractConnection,
    exchange: str,
    pattern: str,
    ready: asyncio.Event,
    on_message: OnMessage,
    want_times: bool,
) -> None:
    channel = await connection.channel()
    declared = await channel.queue_declare(exclusive=True, auto_delete=True)
    assert declared.queue is not None
    await channel.queue_bind(declared.queue, exchange, routing_key=pattern)

    async def deliver(message: aiormq.abc.DeliveredMessage) -> None:
        on_message(float(json.loads(message.body)["t"]) if want_times else None)

    await channel.basic_consume(declared.queue, deliver, no_ack=True)
    ready.set()
    await asyncio.Event().wait()  # consume until cancelled
