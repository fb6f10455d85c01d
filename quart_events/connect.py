"""The SSE transport: the connect endpoint as a plain ASGI handler, in front of the Quart app.

Why not a Quart route: a server holds thousands of these streams open, and Quart's
per-request machinery (two tasks, a request and a response object, contexts) cost
about a third of the memory of each (docs/performance.md has the figures). Here each
stream costs hypercorn's connection, the handler's task and, only while there is
something to write, a writer task. Everything else (lifespan, stats, 404s) goes on
to Quart. Who may subscribe is the subscriber layer's to say (``subscribers.py``);
this module only translates its answers to SSE.
"""

from __future__ import annotations

import asyncio
import re
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
from .bindings import Binding, BindingError, parse_bindings
from .errors import TOO_SLOW
from .front_door import DIRECT, Door
from .history import History
from .message import Encoder, Message, to_json
from .metrics import Counts, EndReason
from .outbox import Outbox, no_op
from .resume import Resumed
from .settings import ServerSettings
from .subscribers import (
    BadInput,
    OverLimit,
    Refusal,
    ShuttingDown,
    Subscriber,
    Subscribers,
    retry_ms,
)

PATHS = frozenset(
    path + slash for path in ("/api/events/v1/connect", "/events/v1/connect") for slash in ("", "/")
)
MAX_WRITE = 256 * 1024  # bytes handed to the server in one send
STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
TOO_SLOW_FRAME = sse.error(TOO_SLOW)
# A resumable stream's: no id, so the EventSource comes back and resumes where it was.
RESUMABLE_TOO_SLOW = sse.unnumbered("error", to_json(TOO_SLOW))
POSITION = re.compile(r"[0-9]{1,18}")  # a stream offset (within a 64-bit integer)


class SseTransport:
    """SSE's frames for the hub: every stream of a message gets the same bytes."""

    addressed = False

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.encoder: Encoder = self

    def encode(self, message: Message) -> bytes:
        return sse.message_event(message)

    def ready(self, subscriber: Subscriber) -> bytes:
        return sse.READY

    def address(self, subscriber: Subscriber, frame: bytes, message: Message) -> bytes:
        return frame

    def ping(self) -> bytes:
        return sse.ping()

    def end(self, subscriber: Subscriber, reason: EndReason, detail: str | None) -> None:
        """A stream is one subscriber: ending it ends the response after a last frame."""
        outbox = subscriber.outbox
        if reason is EndReason.TOO_SLOW:
            outbox.end_too_slow()
        elif reason is EndReason.SHUTDOWN:
            outbox.finish(sse.goodbye(retry_ms(self.settings)), reason)
        else:
            outbox.finish(sse.error(detail or ""), reason)


class ResumableTransport(SseTransport):
    """A resumable stream (``resume=true``): its messages come from the history
    (``history.Reader``), not from the hub, so the hub only pings it, says nothing on
    its ``ready`` (the reader's is what counts) and ends it; only messages carry ids."""

    def ready(self, subscriber: Subscriber) -> None:  # type: ignore[override]
        return None

    def ping(self) -> bytes:
        return sse.unnumbered("ping", sse.ping_data())

    def end(self, subscriber: Subscriber, reason: EndReason, detail: str | None) -> None:
        if reason is EndReason.SHUTDOWN:
            subscriber.outbox.finish(sse.come_back(retry_ms(self.settings)), reason)
        else:
            super().end(subscriber, reason, detail)


class SseResumeWire:
    """A resumable stream's frames (``resume.Wire``): ids only on messages."""

    def __init__(self, outbox: Outbox, retry_ms: int) -> None:
        self.outbox = outbox
        self.retry_ms = retry_ms

    def ready(self) -> bytes:
        return sse.RESUMABLE_READY

    def message(self, message: Message) -> bytes:
        return message.encoded(sse.POSITIONED)

    def gap(self, asked: int, earliest: int) -> bytes:
        return sse.gap(asked, earliest)

    def failed(self, why: str) -> None:
        self.outbox.finish(sse.error(why), EndReason.ERROR)  # id ``-``: it stops (204)

    def lost(self) -> None:
        self.outbox.finish(sse.come_back(self.retry_ms), EndReason.ERROR)


class ConnectEndpoint:
    """Serves GET on the connect paths; passes every other request on to ``app``."""

    def __init__(
        self,
        app: ASGIFramework,
        subscribers: Subscribers,
        settings: ServerSettings,
        counts: Counts,
        history: History,
    ) -> None:
        self.app = app
        self.subscribers = subscribers
        self.settings = settings
        self.counts = counts
        self.history = history
        self.transport = SseTransport(settings)
        self.resumable = ResumableTransport(settings)
        self.cors = [(b"access-control-allow-origin", settings.cors_allow_origin.encode())]

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
        last_event_id, event_source = _what_the_headers_say(scope)
        query = _query(scope)
        resume = query.get("resume", [""])[0] == "true"
        # 204 stops an EventSource: one that reconnects after its stream ended (its
        # error's id is ``-``), unless it resumes from a position.
        if last_event_id is not None and (not resume or last_event_id in {"", "-"}):
            # An EventSource reconnecting after its stream ended: tell it to stop.
            await send({"type": "http.response.start", "status": 204, "headers": self.cors})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if len(scope["raw_path"]) + len(scope["query_string"]) > settings.max_request_line:
            limit = settings.max_request_line
            await self._plain(send, 414, f"Request line too long: at most {limit} bytes.\n")
            return
        direct = (scope.get("extensions") or {}).get(DIRECT)  # served by the front door
        client = _Client(send, self.counts, direct if isinstance(direct, Door) else None)
        resumed: Resumed | None = None
        try:
            bindings = parse_bindings(_first(query, "bindings"), settings.limits())
            if resume:
                position = self._position(bindings, last_event_id, _first(query, "since"))
        except BindingError as error:
            admitted: Subscriber | Refusal = self.subscribers.bad_input(str(error))
        else:
            if not resume:
                outbox = self.subscribers.outbox(
                    client.frames_waiting, client.abort, TOO_SLOW_FRAME
                )
                admitted = self.subscribers.admit(bindings, self.transport, outbox)
            else:  # its bindings are its reader's: the hub only pings it and ends it
                outbox = self.subscribers.outbox(
                    client.frames_waiting, client.abort, RESUMABLE_TOO_SLOW
                )
                admitted = self.subscribers.admit((), self.resumable, outbox)
                wire = SseResumeWire(outbox, retry_ms(settings))
                resumed = Resumed(self.history, bindings, position, wire)
            del bindings  # this frame lives as long as the stream: keep it small
        if not isinstance(admitted, Subscriber):
            await self._refuse(send, event_source, admitted, resume)
            return
        client.outbox = admitted.outbox
        try:
            await self._start_stream(send)
            client.start()  # what the hub put in the outbox meanwhile goes out now
            if resumed is not None:
                await resumed.open(admitted.outbox)
            # The request's own task only waits for the client to leave; frames are
            # written by a task that exists while there is something to write.
            while (await receive())["type"] != "http.disconnect":
                pass
        except asyncio.CancelledError:
            # The writer ended the response (or gave a stuck client up) and stopped us.
            if not client.ended or asyncio.current_task().uncancel():  # type: ignore[union-attr]
                raise
        finally:
            if resumed is not None:
                resumed.close()
            client.stop()  # closing the outbox below must not start a writer
            admitted.outbox.close()  # nothing more is written: its frames leave the budget
            peer = scope["client"] if settings.log_client_address else None
            self.subscribers.leave(admitted, f"{peer[0]}:{peer[1]}" if peer else None)
            # Break the outbox <-> client cycle: refcounting frees them now, and less of
            # a closed connection waits for the garbage collector.
            admitted.outbox.on_frames = admitted.outbox.on_abort = no_op
            client.outbox = client.request_task = None
            if client.direct is not None:
                client.direct.on_writable = no_op
                client.direct = None

    def _position(
        self, bindings: list[Binding], last_event_id: str | None, since: str | None
    ) -> int | None:
        """A resumable stream's position (none: from now on); ``BindingError`` if it
        cannot be one."""
        if not self.history.enabled:
            raise BindingError("This server keeps no history: `resume=true` is not available")
        position = last_event_id if last_event_id is not None else since
        if position is not None and not POSITION.fullmatch(position):
            what = "Last-Event-ID" if last_event_id is not None else "`since`"
            raise BindingError(f"{what} must be a position: a whole number from a message's id")
        unkept = self.history.unkept(binding.exchange for binding in bindings)
        if unkept is not None:
            raise BindingError(unkept)
        return None if position is None else int(position)

    async def _refuse(
        self, send: ASGISendCallable, event_source: bool, refusal: Refusal, resume: bool = False
    ) -> None:
        """Bad input: a stream of its ``error``. Shutting down: a stream that ends at once
        and sends the client elsewhere. Over a limit: an EventSource stops for good on a
        503, so it gets that same stream that asks it to come back later; other clients
        get the 503. Either way the delay is jittered within the retry window."""
        if isinstance(refusal, BadInput):
            await self._stream_of(send, sse.error(refusal.message))
        elif isinstance(refusal, ShuttingDown) or event_source:
            # A resumable stream keeps its id: it comes back from where it was.
            goodbye = sse.come_back if resume else sse.goodbye
            await self._stream_of(send, goodbye(refusal.retry_ms))
        else:
            assert isinstance(refusal, OverLimit)
            retry_after = str(max(1, -(-refusal.retry_ms // 1000))).encode()
            await self._plain(
                send, 503, f"{refusal.why}; retry later.\n", [(b"retry-after", retry_after)]
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
    """Writes one stream's outbox to its client. Served by the front door (``direct``):
    at once, on the transport, while it has room. Else from a task that lives only
    while it writes: an idle stream then costs no task of its own beyond the
    request's, which waits for the client to leave."""

    __slots__ = (
        "counts",
        "direct",
        "ended",
        "outbox",
        "request_task",
        "send",
        "started",
        "writer",
    )

    def __init__(self, send: ASGISendCallable, counts: Counts, direct: Door | None) -> None:
        self.send = send
        self.counts = counts
        self.direct = direct
        self.outbox: Outbox | None = None
        self.request_task = asyncio.current_task()
        self.writer: asyncio.Task[None] | None = None
        self.started = False  # the response's headers are out: frames may follow
        self.ended = False  # the response is complete (or the client gone): stop

    def start(self) -> None:
        self.started = True
        if self.direct is not None:
            self.direct.on_writable = self._room_again
        if self.outbox is not None and (self.outbox.frames or self.outbox.finished):
            self.frames_waiting()

    def frames_waiting(self) -> None:
        if not self.started or self.ended:
            return
        if self.direct is not None:
            self._write_now(self.direct)
        elif self.writer is None:
            self.writer = asyncio.ensure_future(self._write())

    def _write_now(self, direct: Door) -> None:
        """Everything waiting, written while the transport has room; a chunk that
        filled it is held (and counted) until it has room again."""
        outbox = self.outbox
        assert outbox is not None
        if outbox.in_flight:
            return
        while outbox.frames:
            if not direct.writable:
                return
            chunk = outbox.take()
            self.counts.bytes_written += len(chunk)
            direct.write_body(chunk)
            if not direct.writable:
                outbox.sending(len(chunk))
                return
        if outbox.finished:
            direct.end()
            self.abort()  # the response is complete: the request task may stop

    def _room_again(self) -> None:
        outbox = self.outbox
        if outbox is not None and outbox.in_flight:
            outbox.sent()
        self.frames_waiting()

    async def _write(self) -> None:
        outbox = self.outbox
        assert outbox is not None
        try:
            while outbox.frames:
                chunk = outbox.take()
                self.counts.bytes_written += len(chunk)
                outbox.sending(len(chunk))  # held, and counted, until the write returns
                try:
                    # What one send hands over to the server is bounded: hypercorn holds
                    # what it is given until the client takes it.
                    pieces = [chunk] if len(chunk) <= MAX_WRITE else _pieces(chunk)
                    for piece in pieces:
                        await self.send(
                            {"type": "http.response.body", "body": piece, "more_body": True}
                        )
                finally:
                    outbox.sent()
            if outbox.finished:
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                self.abort()  # the response is complete: the request task may stop
        finally:
            self.writer = None

    def abort(self) -> None:
        """Nothing more is written (the response is complete, or the client takes
        nothing any more): stop the writer and end the request, once."""
        first, task = not self.ended, self.request_task
        self.stop()
        if first and task is not None and task is not asyncio.current_task():
            task.cancel()

    def stop(self) -> None:
        """Stop writing, for good."""
        self.ended = True
        writer, self.writer = self.writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()


def _pieces(chunk: bytes) -> list[bytes]:
    return [chunk[start : start + MAX_WRITE] for start in range(0, len(chunk), MAX_WRITE)]


def _what_the_headers_say(scope: HTTPScope) -> tuple[str | None, bool]:
    """(the ``Last-Event-ID`` an EventSource sends when it reconnects, whether the
    client accepts ``text/event-stream``). No dict of headers: the request's frame
    outlives this, and a server holds thousands of them."""
    last_event_id, event_source = None, False
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"last-event-id":
            last_event_id = value.decode("latin-1").strip()
        elif name == b"accept" and b"text/event-stream" in value:
            event_source = True
    return last_event_id, event_source


def _query(scope: HTTPScope) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(
        scope["query_string"].decode("utf-8", "replace"), keep_blank_values=True, errors="replace"
    )


def _first(query: dict[str, list[str]], name: str) -> str | None:
    """The first value of a query parameter; other parameters are ignored."""
    values = query.get(name)
    return values[0] if values else None
