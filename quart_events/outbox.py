"""A connection's outgoing buffer: the frames not yet written, bounded.

The hub puts frames in; the transport that writes the connection takes them out.
The buffer is bounded in frames and bytes so a slow client cannot grow the server:
past the bound the outbox ends, with the transport's last frame for it (SSE: an
``error`` that says why). The byte bound leaves out the largest frame waiting, so
one message larger than the whole buffer reaches a client that keeps up (a large
message is not the client's slowness): an outbox holds at most ``max_bytes`` plus
one frame. The chunk being written counts until its write returns (it is still
held), so the bound is exact, not twice it.

Every outbox's bytes also count against the process's ``Budget``
(``server.max_buffered_bytes``); past it, the hub ends the subscribers holding the most.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable

from .metrics import EndReason


def no_op() -> None:
    return None


class Budget:
    """The bytes all outboxes of a process hold, against one bound; ``on_over`` is
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


class Outbox:
    """Frames waiting for one connection, and whether it is finished.

    The transport that writes it sets ``on_frames`` (called when frames are waiting
    or the outbox finished) and ``on_abort`` (called when the client takes nothing
    any more). ``overflow_frame`` is the last frame when the bound is passed (none:
    the transport says it its own way). Slotted and lean: a server holds thousands.
    """

    __slots__ = (
        "budget",
        "buffered_bytes",
        "end_reason",
        "finished",
        "frames",
        "in_flight",
        "in_flight_largest",
        "largest",
        "max_bytes",
        "max_frames",
        "on_abort",
        "on_frames",
        "overflow_frame",
        "pending_since",
    )

    def __init__(
        self,
        max_frames: int,
        max_bytes: int,
        on_frames: Callable[[], None] = no_op,
        on_abort: Callable[[], None] = no_op,
        budget: Budget = UNBOUNDED,
        overflow_frame: bytes | None = None,
    ) -> None:
        self.budget = budget
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.on_frames = on_frames
        self.on_abort = on_abort
        self.overflow_frame = overflow_frame
        self.frames: list[bytes] = []
        self.buffered_bytes = 0
        self.largest = 0  # the largest frame waiting: not counted against max_bytes
        self.in_flight = 0  # bytes of the chunk being written (``sending`` .. ``sent``)
        self.in_flight_largest = 0  # the largest frame in that chunk
        self.finished = False
        self.pending_since = 0.0  # when the oldest unwritten frame was queued
        self.end_reason: EndReason | None = None  # why the server ended it (None: the client left)

    def push(self, frame: bytes) -> bool:
        """Queue a frame; ``False`` when this frame overflowed the bound and ended the outbox."""
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
        self.clear()
        self.finish(self.overflow_frame, EndReason.TOO_SLOW)

    def finish(self, last_frame: bytes | None = None, reason: EndReason | None = None) -> None:
        """End after what is buffered, and ``last_frame``, for ``reason``."""
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
        self.clear()
        if not self.finished:
            self.end_reason = reason
        self.finished = True
        self.on_abort()

    def take(self) -> bytes:
        """Every frame waiting, as one write (empty when there is none)."""
        frames = self.frames
        chunk = frames[0] if len(frames) == 1 else b"".join(frames)
        self.in_flight_largest = self.largest
        self.clear()
        return chunk

    def take_each(self) -> list[bytes]:
        """Every frame waiting, one by one (a WebSocket sends each as a message)."""
        frames = self.frames[:]
        self.in_flight_largest = self.largest
        self.clear()
        return frames

    def sending(self, size: int) -> None:
        """The writer writes ``size`` bytes (from ``take``): they are held until ``sent``."""
        self.in_flight = size
        self.budget.add(size)

    def sent(self) -> None:
        self.budget.remove(self.in_flight)
        self.in_flight = self.in_flight_largest = 0

    def stuck_since(self, moment: float) -> bool:
        """Whether what it holds (waiting, or being written) has waited since ``moment``."""
        return bool(self.frames or self.in_flight) and self.pending_since < moment

    @property
    def held_bytes(self) -> int:
        """What it holds: frames waiting and the chunk being written."""
        return self.buffered_bytes + self.in_flight

    def close(self) -> None:
        """Nothing more will be written (the connection is gone): let the frames go."""
        self.finished = True
        self.clear()

    def clear(self) -> None:
        """Let the frames waiting go (written, dropped, or nothing more will be)."""
        self.frames.clear()
        self.budget.remove(self.buffered_bytes)
        self.buffered_bytes = self.largest = 0
