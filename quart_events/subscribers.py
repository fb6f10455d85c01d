"""The subscriber layer, the same for every transport: who may subscribe, and what a
subscriber is.

A transport (SSE in ``connect.py``) parses its client's request into bindings,
asks ``Subscribers.admit`` and gets either a ``Subscriber`` or a typed refusal,
which it translates to its own wire. A subscriber's subscription state (bindings,
readiness on the current broker connection) is apart from its ``Outbox`` (the
frames waiting for its connection): one connection may carry several
subscriptions. The hub speaks to a subscriber only through its ``Transport``,
which makes the frames (``ready``, a message, a ping) and decides what ending it
means on its wire. docs/design.md draws a subscriber's life.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .bindings import Binding
from .message import Encoder, Message
from .metrics import EndReason, Metrics, Outcome
from .outbox import Outbox, no_op
from .settings import ServerSettings

if TYPE_CHECKING:
    from .hub import Hub
    from .shared_bindings import SharedBinding


class Transport(Protocol):
    """What the hub needs of a transport: its frames, and what ending means on its wire."""

    # Encodes a message once for every subscriber of the transport (``Message.encoded``:
    # one encoder may serve many transport objects, one per connection, say).
    encoder: Encoder
    # Whether a message's frame differs by subscriber (``address``); if not, every
    # subscriber of the transport gets the encoder's bytes as they are.
    addressed: bool

    def ready(self, subscriber: Subscriber) -> bytes | None:
        """The subscriber's bindings are in effect (again); ``None``: nothing to say
        (its connection was told already)."""

    def address(self, subscriber: Subscriber, frame: bytes, message: Message) -> bytes | None:
        """The encoder's frame of ``message`` for one subscriber (``None``: not for it,
        as when its connection got the message through another subscriber already)."""

    def ping(self) -> bytes | None:
        """A keepalive frame, or ``None`` when the transport keeps alive its own way."""

    def end(self, subscriber: Subscriber, reason: EndReason, detail: str | None) -> None:
        """End the subscriber on the wire: ``detail`` is the client's message of an error."""


class Subscriber:
    """One subscription: its bindings, where it stands with the broker, its outbox.

    Slotted and lean: a server holds thousands.
    """

    __slots__ = (
        "bindings",
        "deadline",
        "delivered",
        "end_reason",
        "generation",
        "joined",
        "label",
        "opened_at",
        "outbox",
        "shares",
        "transport",
        "waiting_for",
    )

    def __init__(
        self,
        bindings: Iterable[Binding],
        transport: Transport,
        outbox: Outbox,
        label: bytes = b"",
    ) -> None:
        self.bindings = tuple(dict.fromkeys(bindings))  # distinct, in the client's order
        self.transport = transport
        self.outbox = outbox
        self.label = label  # the transport's name for it (a WebSocket subscription's id)
        self.joined = False  # in the topic tries: gets messages
        self.generation = 0  # the broker connection its last `ready` was for
        self.shares: list[SharedBinding] = []  # its share of the broker's bindings
        self.waiting_for = 0  # shares not yet in effect on the current connection
        self.deadline: asyncio.TimerHandle | None = None  # while a new one waits for the broker
        self.opened_at = time.monotonic()
        self.delivered = 0  # message frames queued for it
        self.end_reason: EndReason | None = None  # why the server ended it

    @property
    def ended(self) -> bool:
        """Ended by the server (or its outbox finished): it gets nothing more."""
        return self.end_reason is not None or self.outbox.finished

    @property
    def why_ended(self) -> EndReason:
        return self.end_reason or self.outbox.end_reason or EndReason.CLIENT_LEFT


# -- refusals: what a transport translates to its wire -------------------------------


@dataclass(frozen=True, slots=True)
class ShuttingDown:
    """This process is going away: come back (to another) after ``retry_ms``."""

    retry_ms: int


@dataclass(frozen=True, slots=True)
class OverLimit:
    """Over a limit of this process (``why``); waiting may help: after ``retry_ms``."""

    why: str
    retry_ms: int


@dataclass(frozen=True, slots=True)
class BadInput:
    """The request itself cannot be served; ``message`` says why, for the client."""

    message: str


Refusal = ShuttingDown | OverLimit | BadInput


class Subscribers:
    """Admission for every transport, and a subscriber's way out."""

    def __init__(self, hub: Hub, settings: ServerSettings, metrics: Metrics) -> None:
        self.hub = hub
        self.settings = settings
        self.opened = metrics.streams_opened

    def outbox(
        self,
        on_frames: Callable[[], None] = no_op,
        on_abort: Callable[[], None] = no_op,
        overflow_frame: bytes | None = None,
    ) -> Outbox:
        """A connection's outbox, with the configured bounds, in the process's budget."""
        settings = self.settings
        return Outbox(
            settings.buffer_messages,
            settings.buffer_bytes,
            on_frames,
            on_abort,
            self.hub.budget,
            overflow_frame,
        )

    def admit(
        self,
        bindings: Iterable[Binding],
        transport: Transport,
        outbox: Outbox,
        label: bytes = b"",
    ) -> Subscriber | Refusal:
        """A subscriber (its ``ready`` or error will reach its outbox), or why not."""
        hub, settings = self.hub, self.settings
        bindings = tuple(bindings)
        if hub.shutting_down:
            self.opened.labels(Outcome.SHUTTING_DOWN).inc()
            return ShuttingDown(retry_ms(settings))
        if hub.open_count(outbox) >= settings.max_streams:
            self.opened.labels(Outcome.OVER_LIMIT).inc()
            return OverLimit("Too many streams on this server", retry_ms(settings))
        fits, never = hub.binding_room(bindings)
        if never is not None:
            return self.bad_input(never)
        if not fits:
            self.opened.labels(Outcome.OVER_LIMIT).inc()
            return OverLimit("Too many bindings on this server", retry_ms(settings))
        return hub.open(bindings, transport, outbox, label)

    def connect(self, outbox: Outbox) -> Refusal | None:
        """A connection that will carry subscribers of its own choosing (a WebSocket):
        ``None`` when it may open. Until it carries one it counts as a stream, and
        shutdown ends it even when it carries none."""
        hub, settings = self.hub, self.settings
        if hub.shutting_down:
            return ShuttingDown(retry_ms(settings))
        if hub.open_count() >= settings.max_streams:
            return OverLimit("Too many streams on this server", retry_ms(settings))
        hub.connect(outbox)
        return None

    def disconnect(self, outbox: Outbox, subscribers: Iterable[Subscriber] = ()) -> None:
        """The connection is gone, and with it the subscribers it carried."""
        self.hub.disconnect(outbox, subscribers)

    def bad_input(self, message: str) -> BadInput:
        """A request the transport found bad (counted like the ones found here)."""
        self.opened.labels(Outcome.BAD_INPUT).inc()
        return BadInput(message)

    def leave(self, subscriber: Subscriber, peer: str | None = None) -> None:
        """The subscriber is gone (its client left, or its end was written)."""
        self.hub.leave(subscriber, peer)


def retry_ms(settings: ServerSettings) -> int:
    """A delay to come back after, jittered over the retry window: a crowd spreads."""
    return random.randint(settings.retry_min_ms, settings.retry_max_ms)
