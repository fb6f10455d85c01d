"""Subscriptions: which stream wants what, shared bindings, fan-out into bounded buffers.

Each distinct binding is bound once on the broker, however many streams use it,
and unbound when its last stream leaves. Operations on one binding run strictly
in the order they were asked for (a bind still in flight when its stream leaves
is followed by its unbind, never overtaken by it). A stream joins the topic tries,
and so starts getting messages, when all its bindings are in effect: that is the
moment its ``ready`` goes out. A message is decoded and framed once, and the same
bytes go to every matching stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from . import sse
from .bindings import Binding
from .broker import BrokerError, decode_payload, routes_of
from .settings import ServerSettings
from .topic import TopicTrie

log = logging.getLogger(__name__)
T = TypeVar("T")

TOO_SLOW = "The stream was closed because the client read it too slowly."


def _nothing() -> None:
    return None


def _failure(task: asyncio.Task[Any]) -> BaseException | None:
    """Why a finished broker operation failed, or ``None`` when it succeeded."""
    if task.cancelled():
        return BrokerError("the operation was cancelled")
    return task.exception()


def _client_message(error: BaseException) -> str:
    return str(error) if isinstance(error, BrokerError) else "binding failed"


class Binder(Protocol):
    on_delivery: Callable[[str, str, bool, bytes, dict[str, Any] | None], None]
    on_connected: Callable[[], Awaitable[None]]
    generation: int

    async def bind(self, binding: Binding) -> int: ...

    async def unbind(self, binding: Binding) -> None: ...


class Stream:
    """One client's bindings and its bounded buffer of frames waiting to be written.

    Whoever writes it to the client sets ``on_frames`` (called when frames are
    waiting or the stream finished) and ``on_abort`` (called when the client takes
    nothing any more). Slotted and lean: a server holds thousands.
    """

    __slots__ = (
        "bindings",
        "buffered_bytes",
        "entries",
        "finished",
        "frames",
        "generation",
        "joined",
        "max_bytes",
        "max_frames",
        "on_abort",
        "on_frames",
        "pending_since",
    )

    def __init__(
        self,
        bindings: Iterable[Binding],
        max_frames: int,
        max_bytes: int,
        on_frames: Callable[[], None] = _nothing,
        on_abort: Callable[[], None] = _nothing,
    ) -> None:
        self.bindings = tuple(dict.fromkeys(bindings))  # distinct, in the client's order
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.on_frames = on_frames
        self.on_abort = on_abort
        self.frames: list[bytes] = []
        self.buffered_bytes = 0
        self.finished = False
        self.joined = False  # in the topic tries: gets messages
        self.generation = 0  # the broker connection its last `ready` was for
        self.pending_since = 0.0  # when the oldest unwritten frame was queued
        self.entries: list[_Entry] = []  # its share of the hub's bindings

    def push(self, frame: bytes) -> bool:
        """Queue a frame; ``False`` when this frame overflowed the buffer and ended the stream."""
        if self.finished:
            return True
        if len(self.frames) >= self.max_frames or self.buffered_bytes + len(frame) > self.max_bytes:
            # Drop what the client did not read: memory stays bounded, the client is told why.
            self.frames.clear()
            self.buffered_bytes = 0
            self.finish(sse.error(TOO_SLOW))
            return False
        if not self.frames:
            self.pending_since = time.monotonic()
        self.frames.append(frame)
        self.buffered_bytes += len(frame)
        self.on_frames()
        return True

    def finish(self, last_frame: bytes | None = None) -> None:
        """End the stream after what is buffered, and ``last_frame``."""
        if self.finished:
            return
        if last_frame is not None:
            if not self.frames:
                self.pending_since = time.monotonic()
            self.frames.append(last_frame)
            self.buffered_bytes += len(last_frame)
        self.finished = True
        self.on_frames()

    def abort(self) -> None:
        """Stop writing to a client that does not take what is written (gone or stuck)."""
        self.frames.clear()
        self.buffered_bytes = 0
        self.finished = True
        self.on_abort()

    def take(self) -> bytes:
        """Every frame waiting, as one write (empty when there is none)."""
        frames = self.frames
        chunk = frames[0] if len(frames) == 1 else b"".join(frames)
        frames.clear()
        self.buffered_bytes = 0
        return chunk


class _Entry:
    """A binding's life on the broker, shared by the streams that use it."""

    __slots__ = ("binding", "bound", "generation", "refs")

    def __init__(self, binding: Binding, bound: asyncio.Task[int]) -> None:
        self.binding = binding
        self.bound = bound  # the bind; replaced by a failed rebind after a reconnect
        self.refs = 0
        self.generation = 0  # the broker connection it is bound on
        bound.add_done_callback(self._bound)

    def _bound(self, task: asyncio.Task[int]) -> None:
        if _failure(task) is None:
            self.generation = task.result()


class Hub:
    """The registry of open streams and of the bindings they share."""

    def __init__(self, settings: ServerSettings, binder: Binder) -> None:
        self.settings = settings
        self.binder = binder
        binder.on_delivery = self.deliver
        binder.on_connected = self.restore
        self.streams: set[Stream] = set()
        self._entries: dict[Binding, _Entry] = {}
        self._activations: dict[Stream, asyncio.Task[None]] = {}
        self._last_op: dict[Binding, asyncio.Task[Any]] = {}
        self._tries: dict[str, TopicTrie[Stream]] = {}
        self._pinger: asyncio.Task[None] | None = None
        self.counters = {"deliveries": 0, "non_json": 0, "too_slow": 0, "stuck": 0}

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._pinger = asyncio.ensure_future(self._ping_forever())

    async def _ping_forever(self) -> None:
        # On a fixed schedule, so the time spent pinging thousands of streams does not
        # add up into late pings.
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            tick += self.settings.ping_interval
            await asyncio.sleep(max(0.0, tick - loop.time()))
            frame = sse.ping()
            stuck_before = time.monotonic() - self.settings.write_timeout
            for stream in list(self.streams):
                if stream.frames and stream.pending_since < stuck_before:
                    # Nothing was written for write_timeout: the client is gone or stuck.
                    self.counters["stuck"] += 1
                    stream.abort()
                    self.close(stream)
                else:
                    self._push(stream, frame)

    def begin_shutdown(self) -> None:
        """End every stream with a frame that makes an EventSource reconnect, spread out."""
        low, high = self.settings.retry_min_ms, self.settings.retry_max_ms
        for stream in list(self.streams):
            stream.finish(sse.goodbye(random.randint(low, high)))

    async def stop(self) -> None:
        """After the streams are gone: stop pinging and let pending broker work finish."""
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        pending = list(self._last_op.values())
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=5)
            for task in unfinished:
                task.cancel()

    # -- streams ---------------------------------------------------------------

    def open(
        self,
        bindings: Iterable[Binding],
        on_frames: Callable[[], None] = _nothing,
        on_abort: Callable[[], None] = _nothing,
    ) -> Stream:
        """Register a stream; ``ready`` (or an ``error``) arrives in its buffer."""
        settings = self.settings
        stream = Stream(
            bindings, settings.buffer_messages, settings.buffer_bytes, on_frames, on_abort
        )
        self.streams.add(stream)
        stream.entries = [self._acquire(binding) for binding in stream.bindings]
        pending = [entry.bound for entry in stream.entries if not entry.bound.done()]
        if pending:
            activation = asyncio.ensure_future(self._activate(stream, pending))
            self._activations[stream] = activation
            activation.add_done_callback(lambda _: self._activations.pop(stream, None))
        else:  # every binding is in effect already: ready at once, no task needed
            self._join(stream)
        return stream

    async def _activate(self, stream: Stream, pending: list[asyncio.Task[int]]) -> None:
        # asyncio.wait does not cancel the binds if this stream leaves meanwhile.
        await asyncio.wait(pending)
        self._join(stream)

    def _join(self, stream: Stream) -> None:
        """All binds are done: on success the stream joins the tries and gets `ready`."""
        for entry in stream.entries:
            error = _failure(entry.bound)
            if error is not None:
                stream.finish(sse.error(_client_message(error)))
                return
        for binding in stream.bindings:
            self._tries.setdefault(binding.exchange, TopicTrie()).add(
                binding.routing_key_pattern, stream
            )
        stream.joined = True
        stream.generation = self.binder.generation
        stream.push(sse.READY)

    async def restore(self) -> None:
        """After a reconnect: bind again what was bound before, then `ready` each stream
        again; a stream whose exchange is gone gets an `error` instead."""
        generation = self.binder.generation
        stale = [
            entry
            for entry in self._entries.values()
            if entry.bound.done()
            and _failure(entry.bound) is None
            and entry.generation < generation
        ]
        rebinds = {entry: self._schedule(entry.binding, self.binder.bind) for entry in stale}
        if rebinds:
            await asyncio.wait(rebinds.values())
        failed: dict[Binding, BaseException] = {}
        for entry, task in rebinds.items():
            error = _failure(task)
            if error is None:
                entry.generation = task.result()
            else:
                failed[entry.binding] = error
                entry.bound = task  # a later stream will try to bind it afresh
        for stream in list(self.streams):
            if not stream.joined or stream.finished or stream.generation >= generation:
                continue
            errors = [failed[binding] for binding in stream.bindings if binding in failed]
            if errors:
                stream.finish(sse.error(_client_message(errors[0])))
            else:
                stream.generation = generation
                stream.push(sse.READY)

    def close(self, stream: Stream) -> None:
        """Forget a stream (its client left or it ended); unbind what nobody else uses."""
        if stream not in self.streams:
            return
        self.streams.discard(stream)
        stream.finish()
        activation = self._activations.pop(stream, None)
        if activation is not None:
            activation.cancel()
        if stream.joined:
            for binding in stream.bindings:
                trie = self._tries[binding.exchange]
                trie.discard(binding.routing_key_pattern, stream)
                if not len(trie):
                    del self._tries[binding.exchange]
        for entry in stream.entries:
            self._release(entry)
        stream.entries = []

    # -- shared bindings -------------------------------------------------------

    def _acquire(self, binding: Binding) -> _Entry:
        entry = self._entries.get(binding)
        if entry is None or (entry.bound.done() and _failure(entry.bound) is not None):
            # New, or failed before (the exchange may exist by now): bind it (again).
            entry = _Entry(binding, self._schedule(binding, self.binder.bind))
            self._entries[binding] = entry
        entry.refs += 1
        return entry

    def _release(self, entry: _Entry) -> None:
        entry.refs -= 1
        if entry.refs:
            return
        if self._entries.get(entry.binding) is entry:
            del self._entries[entry.binding]

        async def unbind(binding: Binding) -> None:
            if _failure(entry.bound) is None:
                await self.binder.unbind(binding)

        self._schedule(entry.binding, unbind)

    def _schedule(
        self, binding: Binding, operation: Callable[[Binding], Awaitable[T]]
    ) -> asyncio.Task[T]:
        """Run ``operation`` after every earlier operation on the same binding."""
        previous = self._last_op.get(binding)

        async def run() -> T:
            if previous is not None:
                await asyncio.wait([previous])
            return await operation(binding)

        task = asyncio.ensure_future(run())
        self._last_op[binding] = task

        def done(finished: asyncio.Task[T]) -> None:
            if self._last_op.get(binding) is finished:
                del self._last_op[binding]
            if not finished.cancelled() and finished.exception() is not None:
                log.debug("broker operation on %s failed: %r", binding, finished.exception())

        task.add_done_callback(done)
        return task

    # -- messages --------------------------------------------------------------

    def deliver(
        self,
        exchange: str,
        routing_key: str,
        redelivered: bool,
        body: bytes,
        headers: dict[str, Any] | None,
    ) -> None:
        """Fan one delivery out: decode and frame it once, for every matching stream."""
        self.counters["deliveries"] += 1
        trie = self._tries.get(exchange)
        if trie is None:
            return
        streams = trie.match(routing_key)
        if not streams:
            return
        payload, is_json = decode_payload(body)
        if not is_json:
            self.counters["non_json"] += 1
        frame = sse.message(payload, exchange, routing_key, redelivered, routes_of(headers))
        for stream in streams:
            self._push(stream, frame)

    def _push(self, stream: Stream, frame: bytes) -> None:
        if not stream.push(frame):
            self.counters["too_slow"] += 1

    # -- introspection (tests, metrics) ------------------------------------------

    def bound_bindings(self) -> set[Binding]:
        """Bindings this process holds on the broker or is about to."""
        return set(self._entries)

    def stats(self) -> dict[str, int]:
        return {
            "streams": len(self.streams),
            "bindings": len(self._entries),
            "pending_broker_operations": len(self._last_op),
            "buffered_bytes": sum(stream.buffered_bytes for stream in self.streams),
            "trie_entries": sum(len(trie) for trie in self._tries.values()),
            **self.counters,
        }
