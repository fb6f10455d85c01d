"""The bindings this process holds on the broker, shared by the streams that use them.

Each distinct binding is bound once, however many streams use it, and unbound
when its last stream leaves. The broker is not told every change: one worker
brings the broker in line with what the streams want, one binding at a time,
taking one from each stream that waits in turn (a stream with one binding is not
queued behind another's hundred). So the work waiting is never more than one
step per distinct binding, a binding whose streams all left before its bind ran
is never sent to the broker, and a bind and the unbind that follows it cannot
overtake each other.

A binding is *in effect* when it is bound on the current connection. After a
reconnect nothing is: the worker binds everything again, and a restore that a
further loss interrupts is simply carried on after the next connect. The
worker never waits for a connection itself: it stops when there is none and
starts again on ``connected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Hashable, Iterable
from typing import Protocol

from .bindings import Binding
from .errors import BindFailed, NotConnected
from .topic import inner_hash, pattern_words

log = logging.getLogger(__name__)
RETRY_PAUSE = 0.05  # after a bind interrupted while the connection stayed up


class Binder(Protocol):
    """What the worker needs of the broker connection."""

    generation: int  # counts connections: a binding made on an earlier one is gone

    @property
    def is_connected(self) -> bool: ...

    @property
    def link_confirmed(self) -> bool:
        """Connected, and the broker answered lately (a link can die in silence)."""

    def confirm_link(self) -> None:
        """Ask the broker for a sign of life; the answer confirms the link."""

    async def bind(self, binding: Binding, generation: int) -> None:
        """Bind on connection ``generation``; ``NotConnected`` when it is not the current one
        (or was lost meanwhile), ``BindFailed`` when the broker refuses."""

    async def unbind(self, binding: Binding, generation: int) -> None:
        """Unbind on connection ``generation`` if it is still the current one; never raises."""


class SettledListener(Protocol):
    """Who is told when the broker answered for a binding (the hub)."""

    def settled(self, share: SharedBinding) -> None:
        """``share`` is bound on this connection, or refused (``share.failure``)."""


class SharedBinding:
    """One binding's life on the broker."""

    __slots__ = ("binding", "failure", "generation", "inner_hash", "refs", "words")

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.words = pattern_words(binding.routing_key_pattern)
        self.inner_hash = inner_hash(binding.routing_key_pattern)
        self.refs = 0  # streams that use it
        self.generation = 0  # the connection it is bound on; 0: not bound
        self.failure: BaseException | None = None  # why the broker refused it


class SharedBindings:
    """Reference-counted bindings, reconciled with the broker by one worker."""

    def __init__(self, binder: Binder) -> None:
        self.binder = binder
        self.words = 0  # pattern words of every binding held: what matching costs
        self.inner_hash_words = 0  # of which in patterns with a `#` inside (topic.py)
        self._listener: SettledListener | None = None
        self.binds_sent = self.unbinds_sent = 0  # to the broker, since the start
        self._shares: dict[Binding, SharedBinding] = {}
        # Changed since last reconciled, each in the lane of whoever asked first; the
        # worker takes one from each lane in turn, so a stream that asks for one binding
        # is not queued behind another's hundred (once 7.3 s behind 15,000).
        self._dirty: dict[Binding, Hashable] = {}
        self._lanes: dict[Hashable, dict[Binding, None]] = {}
        self._busy: SharedBinding | None = None  # the one the worker is on
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._shares)

    def attach(self, listener: SettledListener) -> None:
        """Who is told of the broker's answers; before ``start``."""
        self._listener = listener

    # What the broker connection says, for those who hold bindings here.

    @property
    def generation(self) -> int:
        """The current broker connection (counted): a binding's ``in_effect`` is on it."""
        return self.binder.generation

    @property
    def is_connected(self) -> bool:
        return self.binder.is_connected

    @property
    def link_confirmed(self) -> bool:
        """Connected, and the broker answered lately (a link can die in silence)."""
        return self.binder.link_confirmed

    def confirm_link(self) -> None:
        """Ask the broker for a sign of life (its answer: the broker listener's ``confirmed``)."""
        self.binder.confirm_link()

    @property
    def pending(self) -> int:
        """Bindings waiting for the broker (bind or unbind)."""
        return len(self._dirty) + (self._busy is not None)

    def cost_of(self, bindings: Iterable[Binding]) -> tuple[int, int, int]:
        """What ``bindings`` would add: (new bindings, their pattern words, of which in
        inner-``#`` patterns)."""
        new = words = inner = 0
        for binding in set(bindings):
            if binding not in self._shares:
                share_words = pattern_words(binding.routing_key_pattern)
                new += 1
                words += share_words
                if inner_hash(binding.routing_key_pattern):
                    inner += share_words
        return new, words, inner

    def bindings(self) -> set[Binding]:
        """Bindings held on the broker or about to be."""
        return set(self._shares)

    def in_effect(self, share: SharedBinding) -> bool:
        return (
            share.failure is None
            and share.generation == self.binder.generation
            and share.generation != 0
            and self.binder.is_connected
        )

    # -- what the streams want --------------------------------------------------------

    def acquire(self, binding: Binding, lane: Hashable = None) -> SharedBinding:
        """Hold ``binding``; ``lane`` (the stream) is whose turn its bind takes."""
        share = self._shares.get(binding)
        if share is None:
            share = self._shares[binding] = SharedBinding(binding)
            self.words += share.words
            self.inner_hash_words += share.words if share.inner_hash else 0
        share.refs += 1
        if share.failure is not None:
            share.failure = None  # refused before: the exchange may exist by now
        if not self.in_effect(share):
            self._mark(binding, lane)
        return share

    def release(self, share: SharedBinding) -> None:
        share.refs -= 1
        if share.refs:
            return
        if share is not self._busy and not self.in_effect(share):
            # Never bound on this connection: nothing to undo on the broker.
            self._unmark(share.binding)
            self._forget(share)
        else:
            self._mark(share.binding)

    def connected(self) -> None:
        """A new connection: nothing is bound on it yet; bind again what is wanted."""
        for binding, share in self._shares.items():
            if share.refs and share.failure is None:
                self._mark(binding)
        self._wake.set()

    def _mark(self, binding: Binding, lane: Hashable = None) -> None:
        if binding not in self._dirty:
            self._dirty[binding] = lane
            self._lanes.setdefault(lane, {})[binding] = None
        self._wake.set()

    def _unmark(self, binding: Binding) -> None:
        if binding in self._dirty:
            lane = self._dirty.pop(binding)
            waiting = self._lanes[lane]
            del waiting[binding]
            if not waiting:
                del self._lanes[lane]

    def _take(self) -> Binding:
        """The next binding to reconcile: the first of the next lane, in turn."""
        lane = next(iter(self._lanes))
        waiting = self._lanes.pop(lane)
        binding = next(iter(waiting))
        del waiting[binding]
        if waiting:
            self._lanes[lane] = waiting  # to the back: the other lanes go first
        del self._dirty[binding]
        return binding

    # -- the worker ---------------------------------------------------------------

    def start(self) -> None:
        if self._listener is None:
            raise RuntimeError("SharedBindings.start: no listener attached (attach the hub)")
        self._worker = asyncio.ensure_future(self._work())

    async def stop(self) -> None:
        """Stop reconciling (the queue and its bindings go with the connection)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty and self.binder.is_connected:
                binding = self._take()
                share = self._shares.get(binding)
                if share is None:
                    continue
                self._busy = share
                try:
                    await self._reconcile(share)
                except Exception:  # never let the worker die; the binding is tried again
                    log.exception("reconciling %s failed", binding)
                    self._mark(binding)
                    await asyncio.sleep(RETRY_PAUSE)
                finally:
                    self._busy = None

    async def _reconcile(self, share: SharedBinding) -> None:
        binder, binding = self.binder, share.binding
        generation = binder.generation
        if share.refs:
            if share.failure is None and not self.in_effect(share):
                try:
                    self.binds_sent += 1
                    await binder.bind(binding, generation)
                except NotConnected:
                    self._mark(binding)  # on the next connection, or again on this one
                    if binder.is_connected:
                        await asyncio.sleep(RETRY_PAUSE)
                    return
                except BindFailed as error:
                    share.failure = error
                else:
                    share.generation = generation
            assert self._listener is not None  # start() checked
            self._listener.settled(share)
            return
        if self.in_effect(share):
            share.generation = 0  # not in effect while it is being unbound
            self.unbinds_sent += 1
            await binder.unbind(binding, generation)
        if share.refs:  # wanted again meanwhile: bind it again, in order
            self._mark(binding)
        else:
            self._forget(share)

    def _forget(self, share: SharedBinding) -> None:
        del self._shares[share.binding]
        self.words -= share.words
        self.inner_hash_words -= share.words if share.inner_hash else 0
