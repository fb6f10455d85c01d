"""The events service's own WebSocket of 2014-2018, as ``WebListener`` of npm
``taskcluster-client-web`` (up to 9.x) speaks it: ``/api/events/v1/listen/websocket``.

The server says ``ready`` once it may be sent bindings, but never in the same read as
the handshake: ``WebListener`` listens for ``ready`` only after it has sent its
``bind`` frames, so a ``ready`` that comes with the ``101`` is lost. It goes out once
the client's first frame has arrived, or after ``READY_DELAY`` when none comes. Each
``bind`` (with a request id) is a subscriber of its own on this socket, answered
``bound`` with that id once in effect, or ``error`` with it; a message that matches
several of the socket's bindings arrives once. After a reconnect of the broker the
socket hears ``ready`` again, once.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, ClassVar

from . import sse
from .bindings import BindingError, checked
from .mends import text_frame
from .message import Encoder, Message, strict_json, to_json_bytes
from .subscribers import BadInput, OverLimit, Subscriber
from .websocket import WebSocketConnection

PATHS = frozenset(
    prefix + "/listen/websocket" for prefix in ("/api/events/v1", "/events/v1", "/v1")
)
READY_DELAY = 0.5  # seconds: ready goes out this long after the open, if no frame came
MAX_ID = 200  # characters of a request id that are echoed back


def _random_id() -> bytes:
    return uuid.uuid4().hex.encode()


class MessageEncoder:
    """A message as the ``message`` event: its payload is the SSE message event's data;
    ``framed``, as a whole WebSocket frame (the same bytes for every socket that takes
    whole frames)."""

    def __init__(self, framed: bool) -> None:
        self.framed = framed

    def encode(self, message: Message) -> bytes:
        parts = sse.message_data_parts(message)
        text = b"".join((b'{"event":"message","id":"', _random_id(), b'","payload":', *parts, b"}"))
        return text_frame(text) if self.framed else text


MESSAGES, FRAMED_MESSAGES = MessageEncoder(framed=False), MessageEncoder(framed=True)


class LegacySocket(WebSocketConnection):
    """One socket of the 2014-2018 protocol."""

    protocol: ClassVar[str] = "listen"
    encoder: Encoder = MESSAGES

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.said_ready = False
        self.ready_generation = 0  # the broker connection the socket last heard ready for
        self.bound: set[Subscriber] = set()  # told `bound` already
        self.last: Message | None = None  # the last message sent: once per socket

    def opened(self) -> None:
        if self.raw_frames:
            self.encoder = FRAMED_MESSAGES
        loop = asyncio.get_running_loop()
        self.timers.append(loop.call_later(READY_DELAY, self._say_ready))

    def _say_ready(self) -> None:
        if not self.said_ready:
            self.said_ready = True
            self.push(b'{"event":"ready","id":"' + _random_id() + b'","payload":null}')

    def frame(self, text: str) -> None:
        try:
            frame = strict_json(text)
        except (ValueError, RecursionError):
            frame = None
        request_id = frame.get("id") if isinstance(frame, dict) else None
        request_id = request_id[:MAX_ID] if isinstance(request_id, str) else None
        self._say_ready()  # the client listens now: it has sent a frame
        if not isinstance(frame, dict):
            self._error(request_id, "Message is not a JSON object")
        elif frame.get("method") != "bind":
            self._error(request_id, "Unknown method: only `bind` is served")
        else:
            self._bind(request_id, frame.get("options"))

    def _bind(self, request_id: str | None, options: Any) -> None:
        if not isinstance(options, dict):
            self._error(request_id, "`options` must be an object")
            return
        pair = (options.get("exchange"), options.get("routingKeyPattern"))
        try:
            (binding,) = checked([pair], self.settings.limits())
        except BindingError as error:
            message = str(error).removeprefix("bindings[0]: ")
            self._error(request_id, message, options)
            return
        label = request_id.encode() if request_id else _random_id()
        if label in self.carried:
            self._error(request_id, "This request id is in use on this socket already", options)
            return
        admitted = self.subscribers.admit([binding], self, self.outbox, label)
        if isinstance(admitted, BadInput):
            self._error(request_id, admitted.message, options)
        elif isinstance(admitted, OverLimit):
            self._error(request_id, f"{admitted.why}; retry later.", options)
        elif isinstance(admitted, Subscriber) and not admitted.ended:
            self.carried[label] = admitted

    # -- what the hub says, on this wire --------------------------------------------

    def ready(self, subscriber: Subscriber) -> bytes | None:
        if subscriber not in self.bound:
            self.bound.add(subscriber)
            self.ready_generation = max(self.ready_generation, subscriber.generation)
            binding = subscriber.bindings[0]
            options = {
                "exchange": binding.exchange,
                "routingKeyPattern": binding.routing_key_pattern,
            }
            return self.wire(self._frame("bound", subscriber.label.decode(), {"options": options}))
        if subscriber.generation > self.ready_generation:  # a reconnect: once per socket
            self.ready_generation = subscriber.generation
            return self.wire(b'{"event":"ready","id":"' + _random_id() + b'","payload":null}')
        return None

    def address(self, subscriber: Subscriber, frame: bytes, message: Message) -> bytes | None:
        if self.last is message:  # another of its bindings matched it already
            return None
        self.last = message
        self.messages += 1
        return frame

    def subscription_failed(self, subscriber: Subscriber, message: str) -> None:
        options = _options(subscriber)
        self.bound.discard(subscriber)
        self._error(subscriber.label.decode(), message, options)

    def _error(self, request_id: str | None, message: str, options: Any = None) -> None:
        properties = options if isinstance(options, dict) else {}
        self.push(self._frame("error", request_id, {"message": message, "properties": properties}))

    def _frame(self, event: str, request_id: str | None, payload: Any) -> bytes:
        return to_json_bytes(
            {"event": event, "id": request_id or _random_id().decode(), "payload": payload}
        )


def _options(subscriber: Subscriber) -> dict[str, str]:
    """A legacy subscriber's one binding, as its client asked for it."""
    binding = subscriber.bindings[0]
    return {"exchange": binding.exchange, "routingKeyPattern": binding.routing_key_pattern}
