"""Taskcluster's events WebSocket of 2026: ``/subscription/raw`` and ``/subscription/named``.

What Taskcluster's UI speaks (``ui/src/utils/pulseListener.js``): one JSON text
frame per message, each with a ``type``. ``connection_init`` first (within 10 s),
answered ``connection_ack``; then any number of ``subscribe`` frames, each a
subscription of its own on this socket, acknowledged with ``subscribe_ack`` once
every one of its bindings is in effect on the broker (again after a reconnect, as
``ready`` is for a stream); ``data`` frames carry each matching message once per
subscription, with the message's whole ``CC`` header. A malformed ``subscribe`` or
an unknown frame type gets a ``ProtocolError`` frame and the socket stays open; a
binding the broker refuses ends its subscription with a ``SubscriptionError``.
A ``connection_init`` with ``authorization`` is taken as anonymous: every client
may read every exchange ``server.allowed_exchanges`` lets through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

from taskcluster.exceptions import TaskclusterFailure
from taskcluster.generated.queueevents import QueueEvents

from .bindings import Binding, BindingError, checked
from .history import History
from .mends import text_frame_header
from .message import Encoder, Message, strict_json, to_json_bytes
from .metrics import EndReason
from .resume import Resumed
from .subscribers import BadInput, OverLimit, Subscriber
from .websocket import WebSocketConnection

PATHS = {"/subscription/raw": "raw", "/subscription/named": "named"}
CONNECTION_INIT_TIMEOUT = 10.0  # seconds
MAX_SUBSCRIPTIONS = 100  # bindings or event names in one subscribe, as upstream
# The services whose events can be subscribed to by name, and their events client.
EVENTS_SERVICES: dict[str, Any] = {"queue": QueueEvents({"rootUrl": "https://events.invalid"})}
EVENT_NAMES = {
    "queue": frozenset(
        name for name, value in vars(QueueEvents).items() if callable(value) and name[0] != "_"
    )
}


class ProtocolError(ValueError):
    """A frame the client should not have sent; ``str`` is what it is told."""


class DataEncoder:
    """A message as the ``message`` object of a ``data`` frame: made once per message
    for every subscription on every socket (the subscription's id is put around it)."""

    def encode(self, message: Message) -> bytes:
        rest = to_json_bytes(
            {
                "exchange": message.exchange,
                "routingKey": message.routing_key,
                "redelivered": message.redelivered,
                "cc": message.cc,
            }
        )
        return b"".join((b'{"payload":', message.payload, b",", rest[1:]))


DATA = DataEncoder()
DATA_START, DATA_MIDDLE = b'{"type":"data","subscriptionId":"', b'","message":'
DATA_WRAPPING = len(DATA_START) + len(DATA_MIDDLE) + 1  # and the closing brace
POSITIONED = "positioned"  # the key of a resumable subscription's frames in Message.shared


class TaskclusterSocket(WebSocketConnection):
    """One socket of Taskcluster's 2026 protocol; ``shape`` is ``raw`` or ``named``."""

    protocol: ClassVar[str] = "subscription"
    encoder: Encoder = DATA

    def __init__(self, shape: str, history: History, *args: Any) -> None:
        super().__init__(*args)
        self.history = history
        self.resumed: dict[bytes, Resumed] = {}  # subscriptions read from the history
        self.resolve: Callable[[dict[str, Any]], list[Binding]] = (
            self._raw if shape == "raw" else self._named
        )
        self.initialised = False
        self.init_timer: asyncio.TimerHandle | None = None
        self.minted = 0  # subscription ids: a number per socket, never used twice

    def opened(self) -> None:
        loop = asyncio.get_running_loop()
        self.init_timer = loop.call_later(
            CONNECTION_INIT_TIMEOUT,
            self._protocol_error,
            "Protocol error: no connection_init frame received",
        )
        self.timers.append(self.init_timer)

    def frame(self, text: str) -> None:
        try:
            frame = strict_json(text)
        except (ValueError, RecursionError):
            self._protocol_error("Protocol error: malformed JSON")
            return
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            self._protocol_error("Protocol error: missing frame type")
            return
        kind = frame["type"]
        if not self.initialised:
            if kind != "connection_init":
                self._protocol_error("Protocol error: first frame must be connection_init")
                return
            self.initialised = True
            if self.init_timer is not None:
                self.init_timer.cancel()
            self.push(b'{"type":"connection_ack"}')
        elif kind == "subscribe":
            self._subscribe(frame)
        elif kind == "unsubscribe":
            self._unsubscribe(frame.get("subscriptionId"))
        else:
            self._error("ProtocolError", f"Unknown frame type: {kind}"[:300])

    # -- subscriptions ------------------------------------------------------------------

    def _subscribe(self, frame: dict[str, Any]) -> None:
        try:
            bindings = self.resolve(frame)
            resumable = "since" in frame
            since = self._since(frame["since"], bindings) if resumable else None
        except ProtocolError as error:
            self._error("ProtocolError", str(error))
            return
        self.minted += 1
        label = str(self.minted).encode()
        # A resumable one (``since``) reads the history: the hub only counts and ends it
        # (and its ``ready`` is the reader's: known as resumed before it is admitted).
        if resumable:
            wire = ResumeWire(self, label)
            self.resumed[label] = Resumed(self.history, bindings, since, wire)
        admitted = self.subscribers.admit(() if resumable else bindings, self, self.outbox, label)
        if isinstance(admitted, Subscriber) and not admitted.ended:
            self.carried[label] = admitted
            if resumable:
                self.history.later(self.resumed[label].open(self.outbox))
            return
        self.resumed.pop(label, None)
        if isinstance(admitted, BadInput):
            self._error("ProtocolError", admitted.message)
        elif isinstance(admitted, OverLimit):
            self._error("SubscriptionError", f"{admitted.why}; retry later.", label)
        # Shutting down: the socket is being closed with 1012.

    def _unsubscribe(self, subscription_id: Any) -> None:
        """An unknown or ended id is ignored: unsubscribing is idempotent."""
        if not isinstance(subscription_id, str):
            return
        label = subscription_id.encode()
        subscriber = self.carried.pop(label, None)
        resumed = self.resumed.pop(label, None)
        if resumed is not None:
            resumed.close()
        if subscriber is not None:
            self.subscribers.leave(subscriber)

    def _since(self, since: Any, bindings: list[Binding]) -> int | None:
        """The extension for resuming: ``since`` a position (``null``: from now on)."""
        if since is not None and (type(since) is not int or since < 0):
            raise ProtocolError("since must be a position (a data frame's) or null")
        if not self.history.enabled:
            raise ProtocolError("This server keeps no history: since is not available")
        unkept = self.history.unkept(binding.exchange for binding in bindings)
        if unkept is not None:
            raise ProtocolError(unkept)
        return since

    def _stop(self) -> None:
        super()._stop()
        resumed, self.resumed = self.resumed, {}
        for reading in resumed.values():
            reading.close()

    def _raw(self, frame: dict[str, Any]) -> list[Binding]:
        bindings = frame.get("bindings")
        if not isinstance(bindings, list) or not bindings:
            raise ProtocolError("subscribe requires a non-empty array of bindings")
        if len(bindings) > MAX_SUBSCRIPTIONS:
            raise ProtocolError(f"subscribe allows at most {MAX_SUBSCRIPTIONS} bindings")
        for binding in bindings:
            if (
                not isinstance(binding, dict)
                or not isinstance(binding.get("exchange"), str)
                or not isinstance(binding.get("pattern"), str)
            ):
                raise ProtocolError("each binding requires an `exchange` and a `pattern` string")
        return self._checked([(b["exchange"], b["pattern"]) for b in bindings])

    def _named(self, frame: dict[str, Any]) -> list[Binding]:
        service, names, routing_key = (
            frame.get("service"),
            frame.get("subscriptions"),
            frame.get("routingKey"),
        )
        if not isinstance(service, str):
            raise ProtocolError("subscribe requires a `service` string")
        if service not in EVENTS_SERVICES:
            raise ProtocolError(f"unknown events service: {service}"[:300])
        if not isinstance(names, list) or not names:
            raise ProtocolError("subscribe requires a non-empty array of subscriptions")
        if len(names) > MAX_SUBSCRIPTIONS:
            raise ProtocolError(f"subscribe allows at most {MAX_SUBSCRIPTIONS} subscriptions")
        if routing_key is not None and not isinstance(routing_key, dict):
            raise ProtocolError("routingKey must be an object of routing-key fields")
        client, pairs = EVENTS_SERVICES[service], []
        for name in names:
            if not isinstance(name, str) or name not in EVENT_NAMES[service]:
                raise ProtocolError(f"unknown {service} event: {name}"[:300])
            try:
                # As Taskcluster's client expands it: omitted fields match anything.
                binding = getattr(client, name)(routing_key or {})
            except (TaskclusterFailure, TypeError, ValueError) as error:
                message = f"invalid routingKey for {service} event {name}: {error}"
                raise ProtocolError(message[:300]) from None
            pairs.append((binding["exchange"], binding["routingKeyPattern"]))
        return self._checked(pairs)

    def _checked(self, pairs: list[tuple[Any, Any]]) -> list[Binding]:
        try:
            return checked(pairs, self.settings.limits(), "pattern")
        except BindingError as error:
            raise ProtocolError(str(error)) from None

    # -- what the hub says, on this wire --------------------------------------------

    def ready(self, subscriber: Subscriber) -> bytes | None:
        if subscriber.label in self.resumed:
            return None  # its reader says it once it reads the history
        return self.acknowledgement(subscriber.label)

    def acknowledgement(self, label: bytes) -> bytes:
        return self.wire(b'{"type":"subscribe_ack","subscriptionId":"' + label + b'"}')

    def address(self, subscriber: Subscriber, frame: bytes, message: Message) -> bytes:
        """The message's ``data`` frame for one subscription. Ids are numbered per socket,
        so the first subscription of every socket is ``1``: a whole frame (header and
        all) is made once per message and id, shared by every socket that takes whole
        frames, as an SSE frame is by every stream."""
        self.messages += 1
        label = subscriber.label
        if self.raw_frames:
            shared = message.shared
            framed = shared.get(label)
            if framed is None:
                header = text_frame_header(len(label) + len(frame) + DATA_WRAPPING)
                framed = b"".join((header, DATA_START, label, DATA_MIDDLE, frame, b"}"))
                shared[label] = framed
            return framed
        return b"".join((DATA_START, label, DATA_MIDDLE, frame, b"}"))

    def subscription_failed(self, subscriber: Subscriber, message: str) -> None:
        self._error("SubscriptionError", message, subscriber.label)

    def _error(self, code: str, message: str, label: bytes | None = None) -> None:
        error: dict[str, str] = {"type": "error", "code": code}
        if label is not None:
            error["subscriptionId"] = label.decode()
        error["message"] = message
        self.push(to_json_bytes(error))

    def _protocol_error(self, why: str) -> None:
        self.close(EndReason.PROTOCOL_ERROR, why)


class ResumeWire:
    """A resumable subscription's frames (``resume.Wire``): ``data`` frames with their
    ``position``, ``gap`` when retention removed what was asked."""

    def __init__(self, socket: TaskclusterSocket, label: bytes) -> None:
        self.socket = socket
        self.label = label

    def ready(self) -> bytes:
        return self.socket.acknowledgement(self.label)

    def message(self, message: Message) -> bytes:
        """Its ``data`` frame with the position: made once per message and id, as
        ``address`` makes the others."""
        socket = self.socket
        socket.messages += 1
        key = (POSITIONED, self.label, socket.raw_frames)
        frame = message.shared.get(key)
        if frame is None:
            head = DATA_START + self.label + b'","position":' + str(message.position).encode()
            text = b"".join((head, b',"message":', message.encoded(DATA), b"}"))
            frame = message.shared[key] = socket.wire(text)
        return frame

    def gap(self, asked: int, earliest: int) -> bytes:
        frame = {"type": "gap", "subscriptionId": self.label.decode()}
        return self.socket.wire(to_json_bytes({**frame, "from": asked, "earliest": earliest}))

    def failed(self, why: str) -> None:
        self.socket.resumed.pop(self.label, None)
        subscriber = self.socket.carried.get(self.label)
        if subscriber is not None:
            self.socket.end(subscriber, EndReason.ERROR, why)

    def lost(self) -> None:
        """The client comes back (1012) and subscribes again from its last position."""
        self.socket.close(EndReason.SHUTDOWN)
