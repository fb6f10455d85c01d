"""A resumable SSE stream (``resume=true``): its exchanges kept, its messages read from
the history after its position, each with its position as the event id.

``ready`` goes out once the history keeps every exchange of the stream and its reader
is attached; what the reader hears before that waits for it, so the replay follows
``ready``. A lost history connection ends the stream with a frame that keeps the id:
the EventSource comes back with ``Last-Event-ID`` and resumes, here or elsewhere.
"""

from __future__ import annotations

import logging

from . import sse
from .bindings import Binding
from .errors import BrokerError, client_message
from .history import History, NotKept, Reader
from .message import Message
from .metrics import EndReason
from .outbox import Outbox

log = logging.getLogger(__name__)


class Resumed:
    """One resumable stream's reading of the history."""

    def __init__(self, history: History, bindings: list[Binding], since: int | None) -> None:
        self.history = history
        self.bindings = bindings
        self.since = since
        self.outbox: Outbox | None = None
        self.reader: Reader | None = None
        self.early: list[bytes] | None = []  # heard before ``ready`` went out
        self.retry_ms = 0

    async def open(self, outbox: Outbox, retry_ms: int) -> None:
        self.outbox, self.retry_ms = outbox, retry_ms
        try:
            await self.history.keep(binding.exchange for binding in self.bindings)
            self.reader = await self.history.read(
                self.bindings, self.since, outbox, self._message, self._gap, self._lost
            )
        except (NotKept, BrokerError) as error:
            outbox.finish(sse.error(client_message(error)), EndReason.ERROR)
            return
        early, self.early = self.early or [], None
        outbox.push(sse.RESUMABLE_READY)
        for frame in early:
            outbox.push(frame)

    def _push(self, frame: bytes) -> None:
        if self.early is not None:
            self.early.append(frame)
        elif self.outbox is not None:
            self.outbox.push(frame)  # past its bound it ends, with a frame that keeps the id

    def _message(self, position: int, message: Message) -> None:
        self._push(sse.message_at(message, position))

    def _gap(self, asked: int, earliest: int) -> None:
        self._push(sse.gap(asked, earliest))

    def _lost(self) -> None:
        if self.outbox is not None:
            self.outbox.finish(sse.come_back(self.retry_ms), EndReason.ERROR)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.stop()
            self.reader = None
