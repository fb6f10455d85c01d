"""A resumable subscription: its exchanges kept, the messages after its position
replayed from the history, then the live ones from the process's tail reader, each
framed with its position by its transport.

The hand-over, without gap or duplicate (Mercure's order: live first, history up to
it). The subscription listens to the tail before its replay starts, and keeps what
the tail hears meanwhile (bounded). The replay, read from the position in order,
stops once it reaches the first message kept from the tail or the last the tail has
read (a new tail starts from a message at the stream's end, so after a restart that is
known at once), or, on a stream that was empty when the tail started, once it has gone
quiet for ``CAUGHT_UP`` seconds without being held back by its client. From then on
only the tail speaks. Nothing at or before the last position sent is sent again.

``ready`` goes out once the history keeps every exchange of the subscription and it
listens to the tail; the replay follows it. While the history's connection is down,
a new one waits ``pulse.wait_for_broker``; a lost connection ends it with the
transport's "come back" (an EventSource then resumes from its last position).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from .bindings import Binding
from .broker import TRANSIENT
from .errors import BindFailed, BrokerError, client_message
from .history import History, NotKept, Reader
from .message import Message
from .outbox import Outbox
from .topic import Bound

log = logging.getLogger(__name__)

CAUGHT_UP = 2.0  # seconds a replay may be quiet (not held back) before it is done
KEEP_WHILE_REPLAYING = 1000  # messages kept from the tail during a replay; past it, dropped
# (the replay then reads them too: it reads to the end of the stream before it stops)


class Wire(Protocol):
    """How a transport says what a resumable subscription hears."""

    def ready(self) -> bytes: ...

    def message(self, message: Message) -> bytes:
        """Its frame for ``message``, with ``message.position``."""

    def gap(self, asked: int, earliest: int) -> bytes: ...

    def failed(self, why: str) -> None:
        """A binding cannot be kept: the subscription ends, told why."""

    def lost(self) -> None:
        """The history is gone for now: the client should come back and resume."""


class Resumed:
    """One resumable subscription: its replay, its hand-over, its live messages."""

    def __init__(
        self, history: History, bindings: list[Binding], since: int | None, wire: Wire
    ) -> None:
        self.history = history
        self.bindings = bindings
        self.bound: Bound[None] = Bound()  # what its replay matches
        for binding in bindings:
            self.bound.add(binding.exchange, binding.routing_key_pattern, None)
        self.since = since
        self.sent = -1 if since is None else since  # the last position sent
        self.wire = wire
        self.outbox: Outbox | None = None
        self.replay: Reader | None = None
        self.replaying = since is not None
        self.kept: list[Message] = []  # heard from the tail while replaying
        self.first = True
        self.replayed = self.sent  # the last position the replay covers
        self.watch: asyncio.TimerHandle | None = None
        self.closed = False

    def matches(self, message: Message) -> bool:
        return bool(self.bound.match(message.exchange, message.routing_key, message.cc))

    async def open(self, outbox: Outbox) -> None:
        self.outbox = outbox
        history = self.history
        try:
            await asyncio.wait_for(history.connected.wait(), history.pulse.wait_for_broker)
            await history.keep(binding.exchange for binding in self.bindings)
        except (NotKept, BindFailed) as error:
            self.wire.failed(client_message(error))
            return
        except (TimeoutError, BrokerError, *TRANSIENT) as error:
            log.warning("resumable subscription: the history is not reachable (%s)", error)
            self.lost()
            return
        if self.closed:
            return
        history.listen(self, self.bindings)  # before the replay: the tail covers what follows
        outbox.push(self.wire.ready())
        if self.since is None:
            return
        if 0 <= history.tail_offset <= self.since:
            self._hand_over()  # nothing to read back: the tail reads on from before it
            return
        try:
            replay = await history.replay(self.since, self._from_replay, self.lost, outbox)
        except (BrokerError, *TRANSIENT) as error:
            log.warning("resumable subscription: its replay could not start (%s)", error)
            self.lost()
            return
        if self.closed:
            replay.stop()
            return
        self.replay = replay
        self._watch()

    # -- the replay ------------------------------------------------------------------

    def _from_replay(self, offset: int, message: Message | None) -> None:
        if not self.replaying:
            return
        self.replayed = offset
        if self.first:
            self.first = False
            if self.since is not None and offset > self.since + 1:
                self._push(self.wire.gap(self.since, offset))  # retention removed it
        if self.kept and offset >= _position(self.kept[0]):
            self._hand_over()  # it reached what the tail kept for it
            return
        self._send(offset, message if message is not None and self.matches(message) else None)
        tail = self.history.tail_offset
        if 0 <= tail <= offset:
            self._hand_over()  # it read all the tail has read: the tail takes it on

    def _watch(self) -> None:
        self.watch = asyncio.get_running_loop().call_later(CAUGHT_UP, self._caught_up)

    def _caught_up(self) -> None:
        """Quiet for a while, not held back, and nothing written that it has not read:
        the replay has read to the end (once the tail has read anything, exactly;
        before that, by its quiet)."""
        self.watch = None
        replay = self.replay
        if not self.replaying or replay is None or self.closed:
            return
        quiet = time.monotonic() - replay.heard_at
        tail = self.history.tail_offset
        if replay.paced or quiet < CAUGHT_UP or self.replayed < tail:
            self._watch()
        else:
            self._hand_over()

    def _hand_over(self) -> None:
        self.replaying = False
        if self.replay is not None:
            self.replay.stop()  # its turn goes to the next replay
            self.replay = None
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        kept, self.kept = self.kept, []
        for message in kept:
            self._send(_position(message), message)

    # -- live ------------------------------------------------------------------------

    def from_tail(self, message: Message) -> None:
        """A message it is bound to (the tail matched it)."""
        if self.replaying:
            if len(self.kept) < KEEP_WHILE_REPLAYING:
                self.kept.append(message)
            else:
                self.kept.clear()  # the replay reads them (it reads to the end)
            return
        self._send(_position(message), message)

    def _send(self, offset: int, message: Message | None) -> None:
        """Send ``message`` (one it is bound to; none: the offset is only passed), unless
        it was sent already (the replay and the tail may both read it)."""
        if offset <= self.sent:
            return
        self.sent = offset
        if message is not None:
            self._push(self.wire.message(message))

    def _push(self, frame: bytes) -> None:
        if self.outbox is not None:
            self.outbox.push(frame)  # past its bound it ends, as the transport says

    def lost(self) -> None:
        if not self.closed:
            self.close()
            self.wire.lost()

    def close(self) -> None:
        self.closed = True
        self.history.unlisten(self)
        if self.replay is not None:
            self.replay.stop()
            self.replay = None
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None


def _position(message: Message) -> int:
    assert message.position is not None  # read from the history
    return message.position
