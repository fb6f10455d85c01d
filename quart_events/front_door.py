"""The listening socket's first reader: an SSE stream asked for over plain HTTP/1.1 is
served here, straight on its transport; every other connection goes on to hypercorn.

Why: hypercorn holds each connection with a task group of its own (the connection's
task, the app's, an idle timer), a stream reader and writer, an h11 state machine
and an app queue, and it makes each frame an h11 event and a drained write. That was
19 of the 20 KiB of an idle stream and most of the CPU a crowd of new streams costs
(docs/performance.md). Here a stream is one protocol object and the connect
endpoint's one task, and a frame is one write on the transport.

Only what is plainly a stream is served here: ``GET`` of a connect path, HTTP/1.1, a
well-formed head with a ``Host``, no body and no upgrade. Anything else (the other
routes, WebSockets, a head h11 would refuse) is handed to hypercorn with the bytes
read so far, as is a connection that stays open after its stream ended. The replies
are framed as hypercorn frames them (its status line and headers, chunked bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework, HTTPScope
from hypercorn.utils import parse_socket_addr, suppress_body

from .outbox import no_op

log = logging.getLogger(__name__)

DIRECT = "tc_events.direct"  # the scope extension that carries the ``Door`` of a stream
HEAD_TIMEOUT = 20.0  # seconds a new connection has to send its request head
READ_LIMIT = 2**16  # hypercorn's stream reader limit, for connections handed to it
HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*")
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
NOT_HERE = frozenset((b"content-length", b"transfer-encoding", b"upgrade", b"expect"))

ServerCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_registered: dict[int, FrontDoor] = {}


def register(listener_fd: int, door: FrontDoor) -> None:
    """``door`` serves the listener hypercorn is given as ``fd://listener_fd``."""
    _registered[listener_fd] = door


def registered(sock: socket.socket | None) -> FrontDoor | None:
    """The front door of the listener hypercorn is about to serve, if it has one."""
    return None if sock is None else _registered.pop(sock.fileno(), None)


class FrontDoor:
    """One listener's front door: what its connections share, and the ones open."""

    def __init__(self, endpoint: ASGIFramework, paths: Iterable[str], config: HypercornConfig):
        self.endpoint = endpoint
        self.paths = frozenset(path.encode() for path in paths)
        self.config = config
        self.max_head = config.h11_max_incomplete_size
        self.doors: set[Door] = set()
        self.closing = False
        self.emptied = asyncio.Event()  # set when the last connection leaves while closing
        self.hypercorn: ServerCallback | None = None  # hypercorn's per-connection callback

    async def start(self, hypercorn: ServerCallback, sock: socket.socket) -> Server:
        """Serve ``sock`` (in place of hypercorn's ``asyncio.start_server``)."""
        self.hypercorn = hypercorn
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Door(self), sock=sock, backlog=self.config.backlog
        )
        return Server(self, server)

    def forget(self, door: Door) -> None:
        self.doors.discard(door)
        if self.closing and not self.doors:
            self.emptied.set()

    def hand_over(self, transport: asyncio.Transport, data: bytes, eof: bool) -> None:
        """Give the connection to hypercorn, as if it had accepted it and read ``data``."""
        assert self.hypercorn is not None
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader, self.hypercorn)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            reader.feed_data(data)
        if eof:
            reader.feed_eof()


class Server:
    """What hypercorn closes at shutdown: it stops accepting, closes the connections
    that wait for a request, and waits (within hypercorn's grace) for the streams,
    which the hub ends with their last frame, then cuts what is left."""

    def __init__(self, door: FrontDoor, server: asyncio.Server) -> None:
        self.door = door
        self.server = server

    def close(self) -> None:
        self.door.closing = True
        self.server.close()
        for door in list(self.door.doors):
            if door.task is None:
                door.transport.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()
        if self.door.doors:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.door.emptied.wait(), self.door.config.graceful_timeout)
        for door in list(self.door.doors):
            door.transport.abort()


class Door(asyncio.Protocol):
    """One connection until it is handed to hypercorn: its head, then its stream.

    For the connect endpoint it is the ASGI ``receive`` and ``send`` and, in the scope
    under ``DIRECT``, a writer that writes frames at once (``writable``, ``write_body``,
    ``end``, and ``on_writable`` called when a full transport has room again)."""

    __slots__ = (
        "buffer",
        "chunked",
        "complete",
        "disconnected",
        "eof",
        "front",
        "gone",
        "hand_over_when_writable",
        "keep_alive",
        "on_writable",
        "started",
        "task",
        "timer",
        "transport",
        "waiting",
        "writable",
    )

    def __init__(self, front: FrontDoor) -> None:
        self.front = front
        self.buffer = b""
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.disconnected: asyncio.Future[None] | None = None
        self.waiting: asyncio.Future[None] | None = None  # a send waiting for room
        self.on_writable: Callable[[], None] = no_op
        self.writable = True
        self.started = self.complete = self.chunked = False
        self.gone = self.eof = self.hand_over_when_writable = False
        self.keep_alive = True

    # -- the transport's side ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not one
        self.front.doors.add(self)
        if self.front.closing:
            transport.close()
            return
        # A connection that sends no request in time is closed, as hypercorn does, but
        # later: a crowd's requests may still be in TCP retransmission (seconds, after its
        # handshakes outran the listen queue) when their connections are accepted.
        loop = asyncio.get_running_loop()
        wait = max(HEAD_TIMEOUT, self.front.config.keep_alive_timeout)
        self.timer = loop.call_later(wait, transport.close)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if self.task is not None or self.hand_over_when_writable:  # while a stream is served
            if len(buffer) > self.front.max_head:
                self.transport.abort()
                return
            self.buffer = buffer
            return
        end = buffer.find(b"\r\n\r\n", 0, self.front.max_head + 4)
        if end < 0:
            if len(buffer) > self.front.max_head:
                self._hand_over(buffer)  # too long: hypercorn answers as h11 does
            else:
                self.buffer = buffer
            return
        scope = self._scope(buffer[:end])
        if scope is None:
            self._hand_over(buffer)
            return
        self.buffer = buffer[end + 4 :]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.task = asyncio.ensure_future(self._serve(scope))

    def eof_received(self) -> bool:
        self.eof = True
        self._disconnect()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.front.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._disconnect()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writable = False

    def resume_writing(self) -> None:
        self.writable = True
        waiting, self.waiting = self.waiting, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        if self.hand_over_when_writable and not self.gone:
            self._hand_over(self.buffer)
        elif self.started and not self.complete:
            self.on_writable()

    # -- the request ------------------------------------------------------------------

    def _scope(self, head: bytes) -> HTTPScope | None:
        """The ASGI scope of a plain stream request, or None: hypercorn's to serve."""
        lines = head.split(b"\r\n")
        request_line = lines[0].split(b" ")
        if len(request_line) != 3:
            return None
        method, target, version = request_line
        path, _, query = target.partition(b"?")
        if method != b"GET" or version != b"HTTP/1.1" or path not in self.front.paths:
            return None
        headers: list[tuple[bytes, bytes]] = []
        hosts = 0
        for line in lines[1:]:
            match = HEADER.fullmatch(line)
            if match is None or BAD_VALUE.search(match[2]) is not None:
                return None
            name = match[1].lower()
            if name in NOT_HERE:
                return None
            if name == b"host":
                hosts += 1
            elif name == b"connection" and b"close" in match[2].lower():
                self.keep_alive = False
            headers.append((name, match[2]))
        if hosts != 1:
            return None
        transport = self.transport
        family = transport.get_extra_info("socket").family
        client = parse_socket_addr(family, transport.get_extra_info("peername"))
        server = parse_socket_addr(family, transport.get_extra_info("sockname"))
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": urllib.parse.unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query,
            "root_path": self.front.config.root_path,
            "headers": headers,
            "client": client,
            "server": server,
            "extensions": {DIRECT: self},
        }
        return cast(HTTPScope, scope)

    async def _serve(self, scope: HTTPScope) -> None:
        try:
            await self.front.endpoint(scope, self.receive, self.send)  # type: ignore[arg-type]
        except Exception:
            log.exception("a stream failed")
        finally:
            self.task = None
            self._after()

    def _after(self) -> None:
        """The response is done (or given up): the connection goes to hypercorn if the
        client keeps it, else it closes; one given up is cut (nothing more it holds is
        worth sending)."""
        if self.gone:
            return
        if not self.complete:
            self.transport.abort()
        elif self.keep_alive and not self.front.closing and not self.eof:
            if self.writable:
                self._hand_over(self.buffer)
            else:  # hypercorn would not know the transport is full: wait for room
                self.hand_over_when_writable = True
        else:
            self.transport.close()

    def _hand_over(self, data: bytes) -> None:
        self.front.forget(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.front.hand_over(self.transport, data, self.eof)

    def _disconnect(self) -> None:
        if self.disconnected is not None and not self.disconnected.done():
            self.disconnected.set_result(None)

    async def receive(self) -> dict[str, Any]:
        if self.disconnected is None:  # the first: the request, which has no body
            self.disconnected = asyncio.get_running_loop().create_future()
            if self.gone or self.eof:
                self.disconnected.set_result(None)
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnected
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.gone or self.complete:
            return
        if message["type"] == "http.response.start":
            self._start(message["status"], message.get("headers", ()))
        elif message["type"] == "http.response.body":
            self.write_body(message.get("body", b""))
            if not message.get("more_body", False):
                self.end()
            elif not self.writable:
                self.waiting = asyncio.get_running_loop().create_future()
                await self.waiting

    def _start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        lines = [b"HTTP/1.1 %d \r\n" % status]
        sized = False
        for name, value in (*headers, *self.front.config.response_headers("h11")):
            sized = sized or name.lower() == b"content-length"
            lines.append(b"%s: %s\r\n" % (name, value))
        self.chunked = not sized and not suppress_body("GET", status)
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        self.started = True
        self.transport.write(b"".join(lines))

    def write_body(self, data: bytes) -> None:
        """Write (a part of) the body now; ``writable`` says whether more may follow."""
        if not data or self.gone:
            return
        if self.chunked:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def end(self) -> None:
        """The body is complete."""
        if self.complete or self.gone:
            return
        self.complete = True
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")
