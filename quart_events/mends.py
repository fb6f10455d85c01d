"""Mends to hypercorn, installed when serving starts (``install``), each tied to the
hypercorn version it was written for and to a test that fails once hypercorn's own
behaviour changes, so that it can go (tests/test_mends.py). The reports upstream are
in docs/design.md.

1. HTTP/2 back-pressure: writers are held back while a stream's buffer is full.
2. HTTP/2 ended streams: a stream that ends with data its client never took is reset
   and its buffer freed at once.
3. TLS at shutdown: a connection is given up within a second when it closes.
4. WebSocket pongs: a client that has not answered the last ping when the next is due
   is dropped (hypercorn pings, and never looks at the answers).
5. WebSocket batches: several text messages handed over at once go out in one write
   (hypercorn makes a socket write of every message): as whole frames (``FRAMES``) the
   application built, when the socket negotiated no extension (``RAW_FRAMES`` in its
   scope), else as texts (``TEXTS``) that wsproto frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from importlib import metadata
from typing import Any

import h2.errors
import h2.exceptions
import hypercorn.asyncio.run as hypercorn_run
from hypercorn.events import Closed
from hypercorn.protocol import h2 as hypercorn_h2
from hypercorn.protocol import ws_stream as hypercorn_ws
from hypercorn.protocol.events import Data, StreamClosed
from priority.priority import MissingStreamError
from wsproto import connection as wsproto_connection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from . import front_door

log = logging.getLogger(__name__)

WRITTEN_FOR = "0.18."  # the hypercorn series these mends were written for and tested on
TLS_CLOSE_TIMEOUT = 1.0  # seconds a TLS connection may take to close at shutdown

# hypercorn's own, before ``install``: the mends call the second, the tests read both.
ORIGINAL_POP = hypercorn_h2.StreamBuffer.pop
ORIGINAL_STREAM_SEND = hypercorn_h2.H2Protocol.stream_send
ORIGINAL_EVENTS = wsproto_connection.Connection.events
ORIGINAL_SEND_PINGS = hypercorn_ws.WSStream._send_pings
NO_PONG = 1011  # the close code of a client dropped for not answering a ping
ORIGINAL_WS_APP_SEND = hypercorn_ws.WSStream.app_send
# Mend 5's keys, only used when ``batches_installed`` says the running hypercorn
# understands them: a ``websocket.send`` with several text messages (``TEXTS``) or with
# whole frames (``FRAMES``, allowed when the accept put ``RAW_FRAMES`` in the scope).
TEXTS = "tc_events.texts"
FRAMES = "tc_events.frames"
RAW_FRAMES = "tc_events.raw_frames"
_installed = False


async def pop_with_backpressure(self: hypercorn_h2.StreamBuffer, max_length: int) -> bytes:
    """hypercorn's HTTP/2 stream buffer, with writers held back while it is full.

    hypercorn (0.18) lets writers go on whenever it takes a short chunk out of the
    buffer, and with the client's flow-control window at zero it takes empty chunks
    over and over: a stream whose client stopped reading buffered without bound, and
    our slow-client limit never saw it. Here writers go on only once the buffer has
    drained below its low-water mark, as its high-water mark intends.
    """
    length = min(len(self.buffer), max_length)
    data = bytes(self.buffer[:length])
    del self.buffer[:length]
    if len(self.buffer) < hypercorn_h2.BUFFER_LOW_WATER:
        await self._paused.set()
    if not self.buffer:
        await self._is_empty.set()
    return data


async def stream_send_resetting_ended_streams(self: hypercorn_h2.H2Protocol, event: Any) -> None:
    """hypercorn (0.18) keeps an HTTP/2 stream's buffer after the application ended the
    stream until the client has taken every byte: a client that stopped reading kept
    it for as long as the connection lived (99 ended streams held 293 MiB). A stream
    that ends with data still buffered is reset (RST_STREAM, CANCEL) and its buffer
    freed; a stream whose data was all sent ends as before."""
    if isinstance(event, StreamClosed):
        buffer = self.stream_buffers.get(event.stream_id)
        if buffer is not None and buffer.buffer:
            try:
                self.connection.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)
                await self._flush()
            except h2.exceptions.H2Error:
                pass  # closed already: nothing to tell the client
            except Exception:  # the connection is going: its buffers go with it
                await self.send(Closed())
            await buffer.close()
            del self.stream_buffers[event.stream_id]
            with contextlib.suppress(MissingStreamError):
                self.priority.remove_stream(event.stream_id)
    await ORIGINAL_STREAM_SEND(self, event)


class AsyncioForHypercorn:
    """asyncio as hypercorn's ``serve`` sees it, but TLS connections are given up within
    a second when they close: asyncio waits up to 30 s for the client's close_notify,
    and an idle HTTP/2 client that does not answer held every shutdown that long. And a
    plain listener with a front door (``front_door.py``) is served by it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def start_server(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_shutdown_timeout", TLS_CLOSE_TIMEOUT)
        else:  # a plain listener with a front door: it serves, and hands hypercorn the rest
            door = front_door.registered(kwargs.get("sock"))
            if door is not None:
                return await door.start(args[0], kwargs["sock"])
        return await asyncio.start_server(*args, **kwargs)


def events_noting_pongs(self: wsproto_connection.Connection) -> Any:
    """wsproto's events, each pong noted on the connection (hypercorn skips them)."""
    for event in ORIGINAL_EVENTS(self):
        if isinstance(event, Pong):
            self.pong_seen = True  # type: ignore[attr-defined]
        yield event


async def send_pings_dropping_the_silent(self: hypercorn_ws.WSStream) -> None:
    """hypercorn (0.18) pings every ``websocket_ping_interval`` and never looks at the
    pongs: a client that stopped answering (a frozen tab, a half-open link) was kept
    until TCP gave up. Here one that has not answered the last ping when the next is
    due is closed (1011) and its connection ended; the application hears the
    disconnect."""
    connection, interval = self.connection, self.config.websocket_ping_interval or 0.0
    connection.pong_seen = True  # type: ignore[attr-defined]
    while not self.closed:
        if not connection.pong_seen:  # type: ignore[attr-defined]
            await self._send_wsproto_event(CloseConnection(code=NO_PONG, reason="no pong"))
            await self.send(StreamClosed(stream_id=self.stream_id))
            return
        connection.pong_seen = False  # type: ignore[attr-defined]
        await self._send_wsproto_event(Ping())
        await self.context.sleep(interval)


async def app_send_in_batches(self: hypercorn_ws.WSStream, message: Any) -> None:
    """hypercorn (0.18) frames each ``websocket.send`` with wsproto (three copies of the
    payload, in Python) and writes it to the socket on its own: a syscall per message,
    most of a WebSocket's cost when a socket gets many (70% of the server's CPU at 100
    sockets flat out). Here a ``websocket.send`` may carry a batch, written in one go:
    ``FRAMES``, bytes of whole frames that the application built itself (it may once
    the accept put ``RAW_FRAMES`` in its scope: no extension was negotiated, so a text
    frame is a header and the text), or ``TEXTS``, a list of UTF-8 texts (as bytes)
    that wsproto frames (e.g. with permessage-deflate)."""
    if message is None or message["type"] != "websocket.send" or self.closed:
        await ORIGINAL_WS_APP_SEND(self, message)
        if message is not None and message["type"] == "websocket.accept":
            connection = getattr(self, "connection", None)
            if connection is not None and not connection._proto.extensions:
                self.scope[RAW_FRAMES] = True  # type: ignore[literal-required]
        return
    frames, texts = message.get(FRAMES), message.get(TEXTS)
    if frames is None and texts is None:
        await ORIGINAL_WS_APP_SEND(self, message)
        return
    connection = self.connection
    if self.state != hypercorn_ws.ASGIWebsocketState.CONNECTED:
        return
    if connection.state is not ConnectionState.OPEN:
        return  # closing already: nothing more goes out, as with hypercorn's own send
    if frames is None:
        frames = b"".join(connection.send(TextMessage(data=text.decode())) for text in texts)
    await self.send(Data(stream_id=self.stream_id, data=frames))


def text_frame_header(length: int) -> bytes:
    """A final, unmasked text frame's header (RFC 6455 5.2), as a server sends it."""
    if length <= 125:
        return bytes((0x81, length))
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)


def text_frame(text: bytes) -> bytes:
    """``text`` as a whole text frame, as a server sends it (for ``FRAMES``)."""
    return text_frame_header(len(text)) + text


def batches_installed() -> bool:
    """Whether ``websocket.send`` may carry ``TEXTS`` (mend 5 is in place)."""
    return _installed


def install() -> bool:
    """Install every mend, once; ``False`` (and a warning) on another hypercorn series,
    where they were never tested: its tests say whether they are still needed."""
    version = metadata.version("hypercorn")
    if not version.startswith(WRITTEN_FOR):
        log.warning(
            "hypercorn %s: its mends were written for %sx and are not installed",
            version,
            WRITTEN_FOR,
        )
        return False
    hypercorn_h2.StreamBuffer.pop = pop_with_backpressure  # type: ignore[method-assign]
    hypercorn_h2.H2Protocol.stream_send = stream_send_resetting_ended_streams  # type: ignore[method-assign]
    hypercorn_run.asyncio = AsyncioForHypercorn()  # type: ignore[assignment,attr-defined]
    wsproto_connection.Connection.events = events_noting_pongs  # type: ignore[method-assign]
    hypercorn_ws.WSStream._send_pings = send_pings_dropping_the_silent  # type: ignore[method-assign]
    hypercorn_ws.WSStream.app_send = app_send_in_batches  # type: ignore[method-assign]
    global _installed
    _installed = True
    return True
