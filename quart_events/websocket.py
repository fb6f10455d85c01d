"""What Taskcluster's two WebSocket protocols share: one connection's life over ASGI.

The handshake (an ``Origin`` outside ``server.websocket_allowed_origins``: 403; over
the stream limit or shutting down: 503 with ``Retry-After``), the client's frames
handed to the protocol one by one, the connection's ``Outbox`` written a message per
frame by a task that exists while there is something to write, and the close: its
code says why (``4429`` too slow, ``1012`` shutdown, ``4400`` a protocol error,
``4408`` the lifetime). Each protocol (``tc_websocket.py``, ``legacy_websocket.py``)
is a subclass, and the ``Transport`` of the subscribers its client opens: one
connection carries several. docs/design.md draws a subscriber's life.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, WebsocketScope

from .errors import TOO_SLOW
from .mends import FRAMES, RAW_FRAMES, TEXTS, batches_installed, text_frame
from .message import Encoder, Message
from .metrics import EndReason
from .settings import ServerSettings
from .subscribers import OverLimit, Refusal, ShuttingDown, Subscriber, Subscribers

log = logging.getLogger(__name__)

# Close codes: RFC 6455's "Service Restart", and Taskcluster's own in 4000-4999.
CLOSE_CODES = {
    EndReason.SHUTDOWN: (1012, "Service Restart"),
    EndReason.TOO_SLOW: (4429, TOO_SLOW),
    EndReason.PROTOCOL_ERROR: (4400, "Protocol error"),
    EndReason.LIFETIME: (4408, "Connection lifetime exceeded"),
    EndReason.ERROR: (1011, "Internal error"),
}
MAX_FRAME = 64 * 1024  # bytes of one frame from a client (hypercorn closes larger: 1009)


class WebSocketConnection:
    """One WebSocket connection: its outbox, its subscribers, its end."""

    protocol: ClassVar[str]  # its name in logs and stats
    encoder: Encoder
    addressed = True

    def __init__(
        self,
        scope: WebsocketScope,
        send: ASGISendCallable,
        subscribers: Subscribers,
        settings: ServerSettings,
    ) -> None:
        self.scope = scope
        self.send = send
        self.subscribers = subscribers
        self.settings = settings
        self.outbox = subscribers.outbox(self._frames_waiting, self._abort)
        self.carried: dict[bytes, Subscriber] = {}  # by label (the client's name for it)
        self.task = asyncio.current_task()
        self.writer: asyncio.Task[None] | None = None
        self.timers: list[asyncio.TimerHandle] = []
        self.accepted = False
        self.raw_frames = False  # outbox frames are whole WebSocket frames (mends.py, 5)
        self.ended = False  # nothing more is written
        self.close_reason = ""  # said with a protocol error's close
        self.opened_at = time.monotonic()
        self.messages = 0

    # -- the connection's life --------------------------------------------------------

    async def serve(self, receive: ASGIReceiveCallable) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if not self._origin_allowed():
            await self._deny(403, "This Origin may not open a WebSocket here.\n")
            return
        refusal = self.subscribers.connect(self.outbox)
        if refusal is not None:
            await self._refuse(refusal)
            return
        try:
            await self.send({"type": "websocket.accept", "subprotocol": None, "headers": []})
            self.accepted = True
            self.raw_frames = cast(dict[str, Any], self.scope).get(RAW_FRAMES) is True
            loop = asyncio.get_running_loop()
            lifetime = self.settings.websocket_lifetime
            self.timers.append(loop.call_later(lifetime, self.close, EndReason.LIFETIME))
            self.opened()
            self._frames_waiting()  # what was said before the accept went out
            while True:
                event = await receive()
                if event["type"] == "websocket.disconnect":
                    break
                if event["type"] == "websocket.receive":
                    text = event.get("text")
                    if text is None:
                        data = event.get("bytes") or b""
                        try:
                            text = data.decode("utf-8")
                        except UnicodeDecodeError:
                            text = "\ufffd"  # not JSON: the protocol says so
                    if not self.outbox.finished:
                        self.frame(text)
        except asyncio.CancelledError:
            # The writer closed the socket (or gave a stuck client up) and stopped us.
            if not self.ended or asyncio.current_task().uncancel():  # type: ignore[union-attr]
                raise
        finally:
            self._stop()
            carried = list(self.carried.values())
            self.carried.clear()
            reason = self.outbox.end_reason or EndReason.CLIENT_LEFT
            self.subscribers.disconnect(self.outbox, carried)
            self.outbox.close()
            self.outbox.on_frames = self.outbox.on_abort = _no_op  # no cycle to wait for the GC
            log.info(
                "websocket ended: %s, %s, %d subscriptions at the end, %.1f s, %d messages",
                self.protocol,
                reason.replace("_", " "),
                len(carried),
                time.monotonic() - self.opened_at,
                self.messages,
            )

    def close(self, reason: EndReason, why: str = "") -> None:
        """Close the connection after what is waiting, with the code for ``reason``."""
        if self.outbox.finished:
            return
        self.close_reason = why
        self.outbox.finish(None, reason)

    def push(self, text: bytes) -> None:
        self.outbox.push(self.wire(text))

    def wire(self, text: bytes) -> bytes:
        """A text message as the outbox holds it: a whole frame when the socket allows."""
        return text_frame(text) if self.raw_frames else text

    # -- what each protocol says ----------------------------------------------------

    def opened(self) -> None:
        """The socket is open (accepted): say hello, start the protocol's timers."""

    def frame(self, text: str) -> None:
        """One frame from the client."""
        raise NotImplementedError

    def subscription_failed(self, subscriber: Subscriber, message: str) -> None:
        """The broker refused one of the subscriber's bindings (``message`` says which)."""
        raise NotImplementedError

    # -- Transport, for the hub ----------------------------------------------------

    def ready(self, subscriber: Subscriber) -> bytes | None:
        raise NotImplementedError

    def address(self, subscriber: Subscriber, frame: bytes, message: Message) -> bytes | None:
        raise NotImplementedError

    def ping(self) -> None:
        """WebSocket pings are the server's (hypercorn's ``websocket_ping_interval``)."""
        return None

    def end(self, subscriber: Subscriber, reason: EndReason, detail: str | None) -> None:
        """The hub ends one subscriber: a refused binding ends it alone, the socket goes
        on; being too slow or a shutdown close the socket."""
        if reason is EndReason.ERROR:
            self.subscription_failed(subscriber, detail or "")
            self.carried.pop(subscriber.label, None)
            # It leaves on the next loop turn: the hub is still busy with it.
            asyncio.get_running_loop().call_soon(self.subscribers.leave, subscriber)
        elif reason is EndReason.TOO_SLOW:
            self.outbox.end_too_slow()
        else:
            self.close(reason)

    # -- writing --------------------------------------------------------------------

    def _frames_waiting(self) -> None:
        if self.writer is None and self.accepted and not self.ended:
            self.writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        outbox, send = self.outbox, self.send
        try:
            while outbox.frames:
                if self.raw_frames:  # whole frames, one write (mends.py, 5)
                    chunk = outbox.take()
                    messages: list[dict[str, Any]] = [{"type": "websocket.send", FRAMES: chunk}]
                    outbox.sending(len(chunk))
                else:
                    frames = outbox.take_each()
                    if batches_installed():  # texts, one write (mends.py, 5)
                        messages = [{"type": "websocket.send", TEXTS: frames}]
                    else:
                        messages = [{"type": "websocket.send", "text": f.decode()} for f in frames]
                    outbox.sending(sum(len(frame) for frame in frames))
                try:
                    for message in messages:
                        await send(cast(Any, message))
                finally:
                    outbox.sent()
            if outbox.finished:
                reason = outbox.end_reason or EndReason.ERROR
                code, text = CLOSE_CODES.get(reason, CLOSE_CODES[EndReason.ERROR])
                if reason is EndReason.PROTOCOL_ERROR and self.close_reason:
                    text = self.close_reason
                close = {"type": "websocket.close", "code": code, "reason": text[:123]}
                await send(cast(Any, close))
                self._abort()
        finally:
            self.writer = None

    def _abort(self) -> None:
        """Nothing more is written (the socket is closed, or its client takes nothing):
        stop the writer and the connection's task, once."""
        first, task = not self.ended, self.task
        self._stop()
        if first and task is not None and task is not asyncio.current_task():
            task.cancel()

    def _stop(self) -> None:
        self.ended = True
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        writer, self.writer = self.writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    # -- the handshake --------------------------------------------------------------

    def _origin_allowed(self) -> bool:
        """No ``Origin`` (not a browser) is allowed; a browser's must be listed."""
        for name, value in self.scope["headers"]:
            if name.lower() == b"origin":
                origin = value.decode("latin-1")
                allowed = self.settings.websocket_allowed_origins
                return "*" in allowed or origin in allowed
        return True

    async def _refuse(self, refusal: Refusal) -> None:
        assert isinstance(refusal, OverLimit | ShuttingDown)
        why = refusal.why if isinstance(refusal, OverLimit) else "This server is shutting down"
        retry_after = str(max(1, -(-refusal.retry_ms // 1000)))
        await self._deny(503, f"{why}; retry later.\n", [(b"retry-after", retry_after.encode())])

    async def _deny(
        self, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await deny(self.send, status, text, headers)


async def deny(
    send: ASGISendCallable, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """An HTTP answer instead of the upgrade (ASGI's WebSocket denial response)."""
    body = text.encode()
    start = {
        "type": "websocket.http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    }
    await send(cast(Any, start))
    await send(cast(Any, {"type": "websocket.http.response.body", "body": body}))


def _no_op() -> None:
    return None
