"""One client's stream: its bindings and the bounded buffer of frames not yet written.

The hub puts frames in; whoever writes the response takes them out. The buffer
is bounded in frames and bytes so a slow client cannot grow the server: past
the bound the stream ends with an ``error`` that says why. The byte bound leaves
out the largest frame waiting, so one message larger than the whole buffer
reaches a client that keeps up (a large message is not the client's slowness):
a stream holds at most ``max_bytes`` plus one frame. The chunk being written counts
until its write returns (it is still held), so the bound is exact, not twice it.

Every stream's bytes also count against the process's ``Budget``
(``server.max_buffered_bytes``); past it, the hub ends the streams holding the most.
"""

from __future__ import annotations

import asyncio
import ctypes
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import sse
from .bindings import Binding
from .errors import TOO_SLOW
from .metrics import EndReason

if TYPE_CHECKING:
    from .shared_bindings import SharedBinding


def no_op() -> None:
    return None


class Budget:
    """The bytes all streams of a process hold, against one bound; ``on_over`` is
    called (once, until ``shed`` is done) when they go past it."""

    __slots__ = ("freed", "limit", "on_over", "over_called", "total")

    def __init__(self, limit: int | None = None, on_over: Callable[[], None] = no_op) -> None:
        self.limit = sys.maxsize if limit is None else limit  # an int: one compare per push
        self.total = 0
        self.freed = 0  # bytes let go since the last ``give_back``
        self.on_over = on_over
        self.over_called = False

    def add(self, size: int) -> None:
        self.total += size
        if self.total > self.limit:
            self.exceeded()

    def exceeded(self) -> None:
        if not self.over_called:
            self.over_called = True
            self.on_over()

    def remove(self, size: int) -> None:
        self.total -= size
        self.freed += size

    def give_back(self) -> bool:
        """Hand freed memory back to the system once much was let go (glibc keeps freed
        blocks of a few hundred KiB for itself: 99 ended HTTP/2 streams of a 2 MiB
        message left the process 254 MiB larger, 5 MiB after a trim)."""
        if self.freed < GIVE_BACK_AFTER:
            return False
        self.freed = 0
        return _malloc_trim()


GIVE_BACK_AFTER = 32 * 2**20  # bytes freed by streams before memory is handed back


def _malloc_trim() -> bool:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim(0)
    return True


UNBOUNDED = Budget()


class Stream:
    """Bindings, buffered frames, and where the stream stands with the broker.

    Whoever writes it to the client sets ``on_frames`` (called when frames are
    waiting or the stream finished) and ``on_abort`` (called when the client takes
    nothing any more). Slotted and lean: a server holds thousands.
    """

    __slots__ = (
        "bindings",
        "budget",
        "buffered_bytes",
        "deadline",
        "delivered",
        "end_reason",
        "finished",
        "frames",
        "generation",
        "in_flight",
        "in_flight_largest",
        "joined",
        "largest",
        "max_bytes",
        "max_frames",
        "on_abort",
        "on_frames",
        "opened_at",
        "pending_since",
        "shares",
        "waiting_for",
    )

    def __init__(
        self,
        bindings: Iterable[Binding],
        max_frames: int,
        max_bytes: int,
        on_frames: Callable[[], None] = no_op,
        on_abort: Callable[[], None] = no_op,
        budget: Budget = UNBOUNDED,
    ) -> None:
        self.bindings = tuple(dict.fromkeys(bindings))  # distinct, in the client's order
        self.budget = budget
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.on_frames = on_frames
        self.on_abort = on_abort
        self.frames: list[bytes] = []
        self.buffered_bytes = 0
        self.largest = 0  # the largest frame waiting: not counted against max_bytes
        self.in_flight = 0  # bytes of the chunk being written (``sending`` .. ``sent``)
        self.in_flight_largest = 0  # the largest frame in that chunk
        self.finished = False
        self.joined = False  # in the topic tries: gets messages
        self.generation = 0  # the broker connection its last `ready` was for
        self.pending_since = 0.0  # when the oldest unwritten frame was queued
        self.shares: list[SharedBinding] = []  # its share of the broker's bindings
        self.waiting_for = 0  # shares not yet in effect on the current connection
        self.deadline: asyncio.TimerHandle | None = None  # while a new stream waits for the broker
        self.opened_at = time.monotonic()
        self.delivered = 0  # message frames queued for it
        self.end_reason: EndReason | None = None  # why the server ended it (None: the client left)

    def push(self, frame: bytes) -> bool:
        """Queue a frame; ``False`` when this frame overflowed the buffer and ended the stream."""
        if self.finished:
            return True
        frames, size = self.frames, len(frame)
        largest = self.largest if self.largest > size else size
        # What it would hold beside its largest frame (waiting, or in the chunk in flight).
        held = self.buffered_bytes + size - largest
        if self.in_flight:
            held += self.in_flight
            if self.in_flight_largest > largest:
                held += largest - self.in_flight_largest
        if len(frames) >= self.max_frames or held > self.max_bytes:
            self.end_too_slow()
            return False
        if not frames:
            self.pending_since = time.monotonic()
        frames.append(frame)
        self.buffered_bytes += size
        self.largest = largest
        budget = self.budget
        budget.total += size  # Budget.add, inlined: this runs per message and stream
        if budget.total > budget.limit:
            budget.exceeded()
        self.on_frames()
        return True

    def end_too_slow(self) -> None:
        """Drop what the client did not read: memory stays bounded, the client is told why."""
        self._drop()
        self.finish(sse.error(TOO_SLOW), EndReason.TOO_SLOW)

    def finish(self, last_frame: bytes | None = None, reason: EndReason | None = None) -> None:
        """End the stream after what is buffered, and ``last_frame``, for ``reason``."""
        if self.finished:
            return
        self.end_reason = reason
        if last_frame is not None:
            if not self.frames:
                self.pending_since = time.monotonic()
            self.frames.append(last_frame)
            self.buffered_bytes += len(last_frame)
            self.budget.add(len(last_frame))
        self.finished = True
        self.on_frames()

    def abort(self, reason: EndReason) -> None:
        """Stop writing to a client that does not take what is written (gone or stuck)."""
        self._drop()
        if not self.finished:
            self.end_reason = reason
        self.finished = True
        self.on_abort()

    def take(self) -> bytes:
        """Every frame waiting, as one write (empty when there is none)."""
        frames = self.frames
        chunk = frames[0] if len(frames) == 1 else b"".join(frames)
        self.in_flight_largest = self.largest
        self._drop()
        return chunk

    def sending(self, chunk: bytes) -> None:
        """The writer writes ``chunk`` (from ``take``): it is held until ``sent``."""
        self.in_flight = len(chunk)
        self.budget.add(self.in_flight)

    def sent(self) -> None:
        self.budget.remove(self.in_flight)
        self.in_flight = self.in_flight_largest = 0

    @property
    def held_bytes(self) -> int:
        """What the stream holds: frames waiting and the chunk being written."""
        return self.buffered_bytes + self.in_flight

    def discard_frames(self) -> None:
        """Nothing more will be written (the stream is closed): let its frames go."""
        self._drop()

    def _drop(self) -> None:
        self.frames.clear()
        self.budget.remove(self.buffered_bytes)
        self.buffered_bytes = self.largest = 0
