"""The leanest AMQP consumer and publisher this project's dependencies allow: the
reference for what the broker itself can deliver, and a publisher that does not set
the pace.

pamqp (aiormq's own codec) handles the handshake and the few RPCs; deliveries are
then counted by scanning frame headers, without decoding a frame into objects, a
task per message or a copy of the body. One connection per process, one channel,
exclusive queue and consumer (``no_ack``) per subscriber.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Self

from pamqp import body as content
from pamqp import commands, frame, header
from pamqp.base import Frame

FRAME_END = 0xCE
METHOD, BODY = 1, 3
DELIVER = struct.pack(">HH", 60, 60)  # Basic.Deliver's class and method ids
CHANNEL_CLOSE = struct.pack(">HH", 20, 40)
FRAME_HEADER = struct.Struct(">BHI")


class LeanConnection:
    """A connection set up with pamqp; what it then does is up to its subclass."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = b""
        self.channels = 0
        # per channel: called with the body of each delivery, or None when not wanted
        self.on_delivery: dict[int, Callable[[bytes | None], None]] = {}
        self.wants_body: set[int] = set()

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 5672) -> Self:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        consumer = cls(reader, writer)
        writer.write(frame.marshal(header.ProtocolHeader(), 0))
        await consumer._expect(0, commands.Connection.Start)
        consumer._send(0, commands.Connection.StartOk(response="\0guest\0guest"))
        tune = await consumer._expect(0, commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        consumer._send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        consumer._send(0, commands.Connection.Open("/"))
        await consumer._expect(0, commands.Connection.OpenOk)
        return consumer

    def _send(self, channel: int, method: Frame) -> None:
        self.writer.write(frame.marshal(method, channel))

    async def _expect(self, channel: int, kind: type[Frame]) -> Frame:
        """The next frame, during set-up (nothing is consumed yet)."""
        while True:
            try:
                used, got_channel, value = frame.unmarshal(self.buffer)
            except Exception:  # not a whole frame yet
                chunk = await self.reader.read(1 << 16)
                if not chunk:
                    raise ConnectionError("the broker closed the connection") from None
                self.buffer += chunk
                continue
            self.buffer = self.buffer[used:]
            if not isinstance(value, kind) or got_channel != channel:
                raise RuntimeError(f"expected {kind.__name__}, got {value!r}")
            return value

    async def open_channel(self) -> int:
        self.channels += 1
        self._send(self.channels, commands.Channel.Open())
        await self._expect(self.channels, commands.Channel.OpenOk)
        return self.channels

    def close(self) -> None:
        self.writer.close()


class LeanConsumer(LeanConnection):
    """A connection whose channels each consume one exclusive queue."""

    async def subscribe(
        self, exchange: str, pattern: str, on_delivery: Callable[[bytes | None], None], body: bool
    ) -> None:
        """A channel, an exclusive queue bound to ``exchange`` by ``pattern``, a consumer."""
        channel = await self.open_channel()
        self._send(channel, commands.Queue.Declare(exclusive=True, auto_delete=True))
        declared = await self._expect(channel, commands.Queue.DeclareOk)
        assert isinstance(declared, commands.Queue.DeclareOk) and declared.queue is not None
        self._send(
            channel,
            commands.Queue.Bind(queue=declared.queue, exchange=exchange, routing_key=pattern),
        )
        await self._expect(channel, commands.Queue.BindOk)
        self.on_delivery[channel] = on_delivery
        if body:
            self.wants_body.add(channel)
        self._send(channel, commands.Basic.Consume(queue=declared.queue, no_ack=True))
        await self._expect(channel, commands.Basic.ConsumeOk)

    async def consume(self) -> None:
        """Count deliveries until the connection closes (frames scanned, not decoded)."""
        data = self.buffer
        at = 0
        unpack = FRAME_HEADER.unpack_from
        on_delivery, wants_body = self.on_delivery, self.wants_body
        waiting_body: dict[int, bool] = {}
        while True:
            while len(data) - at >= 8:
                kind, channel, size = unpack(data, at)
                end = at + 7 + size
                if end >= len(data):
                    break
                if kind == METHOD and data[at + 7 : at + 11] == DELIVER:
                    if channel in wants_body:
                        waiting_body[channel] = True
                    else:
                        on_delivery[channel](None)
                elif kind == BODY and waiting_body.pop(channel, False):
                    on_delivery[channel](data[at + 7 : end])
                elif kind == METHOD and data[at + 7 : at + 11] == CHANNEL_CLOSE:
                    raise RuntimeError("the broker closed a channel")
                at = end + 1
            chunk = await self.reader.read(1 << 20)
            if not chunk:
                return
            data = data[at:] + chunk
            at = 0


class LeanPublisher(LeanConnection):
    """Publishes on one channel, no confirms: messages are marshalled before they are
    sent, so sending is writing bytes."""

    @staticmethod
    def frames(exchange: str, routing_key: str, body: bytes, channel: int = 1) -> bytes:
        return b"".join(
            (
                frame.marshal(
                    commands.Basic.Publish(exchange=exchange, routing_key=routing_key), channel
                ),
                frame.marshal(
                    header.ContentHeader(0, len(body), commands.Basic.Properties()), channel
                ),
                frame.marshal(content.ContentBody(body), channel),
            )
        )

    async def send(self, frames: bytes) -> None:
        self.writer.write(frames)
        await self.writer.drain()

    async def flush(self, exchange: str) -> None:
        """A round trip on the publishing channel: the broker has routed every message
        before it answers."""
        self._send(
            1, commands.Exchange.Declare(exchange=exchange, exchange_type="topic", passive=True)
        )
        await self._expect(1, commands.Exchange.DeclareOk)


def timestamp_of(body: bytes) -> float:
    return float(json.loads(body)["t"])
