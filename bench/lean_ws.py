"""The leanest WebSocket client a benchmark can have: a raw asyncio socket, the
handshake written by hand, server frames walked by their headers in place.

A frame's payload is never copied or decoded unless the caller asks for it (a latency
run's timestamps): telling a data frame from the others is a ``startswith`` at an
offset of the buffer, as the SSE reader counts its events with ``bytes.count``. So the
WebSocket systems (this service's and RabbitMQ's Web-STOMP) are read by a client of the
same weight as the SSE one, and a figure per server CPU-second is not the client's.
Pings are answered (the server drops a client that misses a pong); fragmented messages
are not expected from either server, and refused.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable

TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA
OnFrame = Callable[[bytes, int, int], None]  # (buffer, payload start, payload end)


class LeanWebSocket:
    """One client socket: ``open``, ``send`` texts, then ``read`` until it closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, port: int, path: str, subprotocol: str | None = None, host: str = "127.0.0.1"
    ) -> LeanWebSocket:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            status = head.split(b"\r\n", 1)[0]
            raise RuntimeError(f"websocket refused: {status!r}")
        return cls(reader, writer)

    def send(self, text: str | bytes, opcode: int = TEXT) -> None:
        """A masked frame, as a client must send it (RFC 6455 5.3)."""
        payload = text.encode() if isinstance(text, str) else text
        mask = os.urandom(4)
        length = len(payload)
        if length <= 125:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length <= 0xFFFF:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            length, "big"
        )
        self.writer.write(header + mask + masked)

    async def read(self, on_text: OnFrame) -> None:
        """Calls ``on_text(buffer, start, end)`` for each text message, until the server
        closes; the payload is ``buffer[start:end]``, sliced only if the caller wants it."""
        reader = self.reader
        data = b""
        while chunk := await reader.read(1 << 20):
            data = data + chunk if data else chunk
            at, size = 0, len(data)
            while size - at >= 2:
                first, second = data[at], data[at + 1]
                length, start = second & 0x7F, at + 2
                if length == 126:
                    if size - at < 4:
                        break
                    (length,) = struct.unpack_from("!H", data, start)
                    start += 2
                elif length == 127:
                    if size - at < 10:
                        break
                    (length,) = struct.unpack_from("!Q", data, start)
                    start += 8
                end = start + length
                if end > size:
                    break
                if not first & 0x80:
                    raise RuntimeError("fragmented WebSocket message (not expected)")
                opcode = first & 0x0F
                if opcode == TEXT:
                    on_text(data, start, end)
                elif opcode == PING:
                    self.send(data[start:end], PONG)
                elif opcode == CLOSE:
                    return
                at = end
            data = data[at:]

    def close(self) -> None:
        self.writer.close()
