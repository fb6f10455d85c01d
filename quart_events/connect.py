"""The connect endpoint as a plain ASGI handler, in front of the Quart app.

Why not a Quart route: a server holds thousands of these streams open, and Quart's
per-request machinery (two tasks, a request and a response object, contexts) cost
about a third of the memory of each (docs/performance.md has the figures). Here each
stream costs hypercorn's connection, the handler's task and, only while there is
something to write, a writer task. Everything else (lifespan, stats, 404s) goes on
to Quart.
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
from collections.abc import Iterable

from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from . import sse
from .bindings import BindingError, parse_bindings
from .hub import Hub
from .metrics import Counts, Outcome
from .settings import ServerSettings
from .stream import Stream, no_op

PATHS = frozenset(
    path + slash for path in ("/api/events/v1/connect", "/events/v1/connect") for slash in ("", "/")
)
MAX_WRITE = 256 * 1024  # bytes handed to the server in one send
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ConnectEndpoint:
    """Serves GET on the connect paths; passes every other request on to ``app``."""

    def __init__(self, app: ASGIFramework, hub: Hub, settings: ServerSettings) -> None:
        self.app = app
        self.hub = hub
        self.settings = settings
        self.cors = [(b"access-control-allow-origin", settings.cors_allow_origin.encode())]
        self.opened = hub.metrics.streams_opened

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
        elif scope["method"] != "GET":
            await self._plain(send, 405, "Only GET is served here.\n", [(b"allow", b"GET")])
        else:
            await self._connect(scope, receive, send)

    async def _plain(
        self,
        send: ASGISendCallable,
        status: int,
        text: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        body = text.encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                    *self.cors,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _connect(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        settings = self.settings
        reconnecting, event_source = _what_the_headers_say(scope)
        if reconnecting:
            # An EventSource reconnecting after its stream ended: tell it to stop.
            await send({"type": "http.response.start", "status": 204, "headers": self.cors})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if len(scope["raw_path"]) + len(scope["query_string"]) > settings.max_request_line:
            limit = settings.max_request_line
            await self._plain(send, 414, f"Request line too long: at most {limit} bytes.\n")
            return
        try:
            bindings = parse_bindings(_bindings_parameter(scope), settings.limits())
        except BindingError as error:
            self.opened.labels(Outcome.BAD_INPUT).inc()
            await self._stream_of(send, sse.error(str(error)))
            return
        if self.hub.shutting_down:
            # This process is going away: come back (to the next one) as if it had ended.
            self.opened.labels(Outcome.SHUTTING_DOWN).inc()
            await self._stream_of(send, self.hub.goodbye())
            return
        if len(self.hub.streams) >= settings.max_streams:
            self.opened.labels(Outcome.OVER_LIMIT).inc()
            await self._refuse(send, event_source, "Too many streams on this server")
            return
        fits, never = self.hub.binding_room(bindings)
        if never is not None:
            self.opened.labels(Outcome.BAD_INPUT).inc()
            await self._stream_of(send, sse.error(never))
            return
        if not fits:
            self.opened.labels(Outcome.OVER_LIMIT).inc()
            await self._refuse(send, event_source, "Too many bindings on this server")
            return
        await self._start_stream(send)
        client = _Client(send, self.hub.counts)
        client.stream = self.hub.open(bindings, client.frames_waiting, client.abort)
        del bindings  # this frame lives as long as the stream: keep it small
        try:
            # The request's own task only waits for the client to leave; frames are
            # written by a task that exists while there is something to write.
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            # The writer ended the response (or gave a stuck client up) and stopped us.
            if not client.ended or asyncio.current_task().uncancel():  # type: ignore[union-attr]
                raise
        finally:
            client.ended = True  # closing the stream below must not start a writer
            client.stop_writing()
            peer = scope["client"] if settings.log_client_address else None
            self.hub.close(client.stream, f"{peer[0]}:{peer[1]}" if peer else None)
            # Break the stream <-> client cycle: refcounting frees them now, and less of
            # a closed connection waits for the garbage collector.
            client.stream.on_frames = client.stream.on_abort = no_op
            client.stream = client.request_task = None

    async def _refuse(self, send: ASGISendCallable, event_source: bool, why: str) -> None:
        """Over a limit of this process. An EventSource stops for good on a 503, so it gets a
        stream that ends at once and asks it to come back later, as on shutdown; other
        clients get the 503. Either way the delay is jittered within the retry window."""
        if event_source:
            await self._stream_of(send, self.hub.goodbye())
            return
        low, high = self.settings.retry_min_ms, self.settings.retry_max_ms
        retry_after = str(max(1, -(-random.randint(low, high) // 1000))).encode()
        await self._plain(
            send,
            503,
            f"{why}; retry later.\n",
            [(b"retry-after", retry_after)],
        )

    async def _stream_of(self, send: ASGISendCallable, frame: bytes) -> None:
        """A whole stream of one frame."""
        await self._start_stream(send)
        await send({"type": "http.response.body", "body": frame, "more_body": False})

    async def _start_stream(self, send: ASGISendCallable) -> None:
        # Headers go out at once, before any event (hypercorn sends them on this message).
        await send(
            {"type": "http.response.start", "status": 200, "headers": [*STREAM_HEADERS, *self.cors]}
        )


class _Client:
    """Writes one stream to its client, from a task that lives only while it writes.

    An idle stream then costs no task of its own beyond the request's, which waits for
    the client to leave.
    """

    __slots__ = ("counts", "ended", "request_task", "send", "stream", "writer")

    def __init__(self, send: ASGISendCallable, counts: Counts) -> None:
        self.send = send
        self.counts = counts
        self.stream: Stream | None = None
        self.request_task = asyncio.current_task()
        self.writer: asyncio.Task[None] | None = None
        self.ended = False  # the response is complete: the request task may stop

    def frames_waiting(self) -> None:
        if self.writer is None and not self.ended:
            self.writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        stream = self.stream
        assert stream is not None
        try:
            while stream.frames:
                chunk = stream.take()
                self.counts.bytes_written += len(chunk)
                stream.sending(chunk)  # held, and counted, until the write returns
                try:
                    # What one send hands over to the server is bounded: hypercorn holds
                    # what it is given until the client takes it.
                    pieces = [chunk] if len(chunk) <= MAX_WRITE else _pieces(chunk)
                    for piece in pieces:
                        await self.send(
                            {"type": "http.response.body", "body": piece, "more_body": True}
                        )
                finally:
                    stream.sent()
            if stream.finished:
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                self._end()
        finally:
            self.writer = None

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.request_task is not None and self.request_task is not asyncio.current_task():
            self.request_task.cancel()

    def abort(self) -> None:
        """The client takes nothing any more: stop writing, end the request."""
        self.stop_writing()
        self._end()

    def stop_writing(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()


def _pieces(chunk: bytes) -> list[bytes]:
    return [chunk[start : start + MAX_WRITE] for start in range(0, len(chunk), MAX_WRITE)]


def _what_the_headers_say(scope: HTTPScope) -> tuple[bool, bool]:
    """(an EventSource reconnecting: it sent ``Last-Event-ID``, the client accepts
    ``text/event-stream``). No dict of headers: the request's frame outlives this, and
    a server holds thousands of them."""
    reconnecting = event_source = False
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"last-event-id":
            reconnecting = True
        elif name == b"accept" and b"text/event-stream" in value:
            event_source = True
    return reconnecting, event_source


def _bindings_parameter(scope: HTTPScope) -> str | None:
    """The first ``bindings`` query parameter; other parameters are ignored."""
    query = urllib.parse.parse_qs(
        scope["query_string"].decode("utf-8", "replace"), keep_blank_values=True, errors="replace"
    )
    values = query.get("bindings")
    return values[0] if values else None
