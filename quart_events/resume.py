"""A resumable subscription: its exchanges kept, its messages read from the history
after its position, each framed with its position by its transport.

``ready`` goes out once the history keeps every exchange of the subscription and its
reader is attached; what the reader hears before that waits for it, so the replay
follows ``ready``. While the history's connection is down, a new one waits
``pulse.wait_for_broker``; a lost connection ends it with the transport's "come back"
(an EventSource then resumes from its last position, here or elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from .bindings import Binding
from .broker import TRANSIENT
from .errors import BindFailed, BrokerError, client_message
from .history import History, NotKept, Reader
from .message import Message
from .outbox import Outbox

log = logging.getLogger(__name__)


class Wire(Protocol):
    """How a transport says what a resumable subscription hears."""

    def ready(self) -> bytes: ...

    def message(self, position: int, message: Message) -> bytes: ...

    def gap(self, asked: int, earliest: int) -> bytes: ...

    def failed(self, why: str) -> None:
        """A binding cannot be kept: the subscription ends, told why."""

    def lost(self) -> None:
        """The history is gone for now: the client should come back and resume."""


class Resumed:
    """One resumable subscription's reading of the history."""

    def __init__(
        self, history: History, bindings: list[Binding], since: int | None, wire: Wire
    ) -> None:
        self.history = history
        self.bindings = bindings
        self.since = since
        self.wire = wire
        self.outbox: Outbox | None = None
        self.reader: Reader | None = None
        self.early: list[bytes] | None = []  # heard before ``ready`` went out
        self.closed = False

    async def open(self, outbox: Outbox) -> None:
        self.outbox = outbox
        history = self.history
        try:
            await asyncio.wait_for(history.connected.wait(), history.pulse.wait_for_broker)
            await history.keep(binding.exchange for binding in self.bindings)
            reader = await history.read(
                self.bindings, self.since, outbox, self._message, self._gap, self._lost
            )
        except (NotKept, BindFailed) as error:
            self.wire.failed(client_message(error))
            return
        except (TimeoutError, BrokerError, *TRANSIENT) as error:
            log.warning("resumable subscription: the history is not reachable (%s)", error)
            self._lost()
            return
        if self.closed:  # its client left meanwhile
            reader.stop()
            return
        self.reader = reader
        early, self.early = self.early or [], None
        outbox.push(self.wire.ready())
        for frame in early:
            outbox.push(frame)

    def _push(self, frame: bytes) -> None:
        if self.early is not None:
            self.early.append(frame)
        elif self.outbox is not None:
            self.outbox.push(frame)  # past its bound it ends, as the transport says

    def _message(self, position: int, message: Message) -> None:
        self._push(self.wire.message(position, message))

    def _gap(self, asked: int, earliest: int) -> None:
        self._push(self.wire.gap(asked, earliest))

    def _lost(self) -> None:
        if not self.closed:
            self.wire.lost()

    def close(self) -> None:
        self.closed = True
        if self.reader is not None:
            self.reader.stop()
            self.reader = None
