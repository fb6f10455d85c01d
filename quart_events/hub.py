"""The registry of open streams: who is ready, who matches a message, fan-out.

A stream joins the topic tries, and so starts getting messages, when every one of
its bindings is in effect on the current broker connection: that is the moment
its ``ready`` goes out. After a reconnect each stream gets ``ready`` again once
its bindings are bound on the new connection, or an ``error`` when the broker
refuses one. A message is framed once, and the same bytes go to every matching
stream, once per stream, whether its routing key or a ``CC`` key matched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import sse
from .bindings import Binding
from .errors import BindFailed, ExchangeMissing, client_message
from .metrics import Counts, EndReason, Metrics, Outcome
from .settings import PulseSettings, ServerSettings
from .shared_bindings import SharedBinding, SharedBindings
from .stream import Budget, Stream, no_op
from .topic import TopicTrie

log = logging.getLogger(__name__)
PING_BATCH = 250  # streams pinged per event-loop turn
MEMORY_SHARE = 4  # by default, streams may hold a quarter of the machine's memory


def max_buffered_bytes(settings: ServerSettings) -> int:
    """``server.max_buffered_bytes``, or (unset) a quarter of the machine's memory."""
    if settings.max_buffered_bytes is not None:
        return settings.max_buffered_bytes
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        memory = 4 * 2**30
    return max(memory // MEMORY_SHARE, settings.buffer_bytes)


class Hub:
    """Open streams, their topic tries, and their state with the broker."""

    def __init__(
        self,
        settings: ServerSettings,
        shared: SharedBindings,
        pulse: PulseSettings,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.wait_for_broker = pulse.wait_for_broker
        self.queue_max_length = pulse.queue_max_length
        self.max_message_bytes = pulse.max_message_bytes
        self.metrics = metrics
        self.counts = Counts()
        self.streams: set[Stream] = set()
        self.budget = Budget(max_buffered_bytes(settings), self._over_budget)
        self.shutting_down = False
        self._waiting: dict[SharedBinding, set[Stream]] = {}
        # New streams whose bindings are in effect, held back while the broker has not
        # answered the link's probe for a while: ``ready`` only on a confirmed link.
        self._unconfirmed: set[Stream] = set()
        self._dropped_told = 0  # drops the streams were told of (``tell_of_drops``)
        self._too_large_told = 0
        self._tries: dict[str, TopicTrie[Stream]] = {}

    # -- streams ---------------------------------------------------------------

    def open(
        self,
        bindings: Iterable[Binding],
        on_frames: Callable[[], None] = no_op,
        on_abort: Callable[[], None] = no_op,
    ) -> Stream:
        """Register a stream; ``ready`` (or an ``error``) arrives in its buffer."""
        settings = self.settings
        stream = Stream(
            bindings,
            settings.buffer_messages,
            settings.buffer_bytes,
            on_frames,
            on_abort,
            self.budget,
        )
        self.streams.add(stream)
        stream.shares = [self.shared.acquire(binding, stream) for binding in stream.bindings]
        # The shared (equal) instances: streams with the same bindings, the common case,
        # then hold no copies of their own for as long as they live.
        stream.bindings = tuple(share.binding for share in stream.shares)
        waiting = self._wait(stream)
        if not waiting and (not stream.shares or self.shared.binder.link_confirmed):
            self._ready(stream)  # every binding is in effect already (or there is none)
            return stream
        if not waiting:
            self._unconfirmed.add(stream)
            self.shared.binder.confirm_link()
        # A new stream waits for the broker so long, then is told it is unavailable.
        loop = asyncio.get_running_loop()
        stream.deadline = loop.call_later(self.wait_for_broker, self._give_up, stream)
        return stream

    def confirmed(self) -> None:
        """The broker answered a probe of the link: streams held back get ``ready``."""
        if not self._unconfirmed:
            return
        held, self._unconfirmed = self._unconfirmed, set()
        for stream in held:
            if not stream.finished and not self._wait(stream):
                self._ready(stream)

    def binding_room(self, bindings: Iterable[Binding]) -> tuple[bool, str | None]:
        """Whether this process may take ``bindings`` now; else why not, when waiting
        cannot help (the bindings alone are over a bound). Bounded: the pattern words it
        holds (what matching a message costs, and memory) and the binds waiting for
        the broker (what a newcomer may wait behind)."""
        settings, shared = self.settings, self.shared
        new, words, inner = shared.cost_of(bindings)
        if inner > settings.max_inner_hash_words:
            return False, (
                f"Too many words in patterns with a `#` before their last word: {inner} given, "
                f"at most {settings.max_inner_hash_words} allowed"
            )
        fits = (
            shared.words + words <= settings.max_binding_words
            and shared.inner_hash_words + inner <= settings.max_inner_hash_words
            and (not new or shared.pending + new <= settings.max_pending_binds)
        )
        return fits, None

    def close(self, stream: Stream, peer: str | None = None) -> None:
        """Forget a stream (its client left or it ended); release what it held."""
        if stream not in self.streams:
            return
        self.streams.discard(stream)
        self._unconfirmed.discard(stream)
        stream.finish()
        stream.discard_frames()  # nothing more is written: they leave the budget
        reason = stream.end_reason or EndReason.CLIENT_LEFT
        self.metrics.streams_ended.labels(reason).inc()
        log.info(
            "stream ended: %s, %d bindings, %.1f s, %d messages%s",
            reason.replace("_", " "),
            len(stream.bindings),
            time.monotonic() - stream.opened_at,
            stream.delivered,
            f", client {peer}" if peer else "",
        )
        self._unwait(stream)
        if stream.joined:
            for binding in stream.bindings:
                trie = self._tries[binding.exchange]
                trie.discard(binding.routing_key_pattern, stream)
                if not len(trie):
                    del self._tries[binding.exchange]
        for share in stream.shares:
            self.shared.release(share)
        stream.shares = []

    def _wait(self, stream: Stream) -> bool:
        """Note what the stream waits for; ``False`` when every binding is in effect."""
        self._unwait(stream)
        for share in stream.shares:
            if not self.shared.in_effect(share):
                self._waiting.setdefault(share, set()).add(stream)
                stream.waiting_for += 1
        return stream.waiting_for > 0

    def _unwait(self, stream: Stream) -> None:
        if stream.deadline is not None:
            stream.deadline.cancel()
            stream.deadline = None
        if stream.waiting_for:
            for share in stream.shares:
                waiters = self._waiting.get(share)
                if waiters is not None:
                    waiters.discard(stream)
                    if not waiters:
                        del self._waiting[share]
            stream.waiting_for = 0

    def settled(self, share: SharedBinding) -> None:
        """The broker answered for ``share``: bound on this connection, or refused."""
        if share.failure is None and not self.shared.in_effect(share):
            return  # bound on a connection that is gone already: it is bound again
        for stream in self._waiting.pop(share, ()):
            if share.failure is not None:
                self._fail(stream, share.failure)
            else:
                stream.waiting_for -= 1
                if not stream.waiting_for:
                    self._ready(stream)

    def _ready(self, stream: Stream) -> None:
        if stream.deadline is not None:
            stream.deadline.cancel()
            stream.deadline = None
        if not stream.joined:
            self.metrics.streams_opened.labels(Outcome.READY).inc()
            self.metrics.ready_seconds.observe(time.monotonic() - stream.opened_at)
            for binding in stream.bindings:
                self._tries.setdefault(binding.exchange, TopicTrie()).add(
                    binding.routing_key_pattern, stream
                )
            stream.joined = True
        stream.generation = self.shared.binder.generation
        stream.push(sse.READY)

    def _fail(self, stream: Stream, error: BaseException, outcome: Outcome | None = None) -> None:
        self._unwait(stream)
        if not stream.joined and not stream.finished:
            if outcome is None:
                outcome = (
                    Outcome.MISSING_EXCHANGE
                    if isinstance(error, ExchangeMissing)
                    else Outcome.ERROR
                )
            self.metrics.streams_opened.labels(outcome).inc()
        stream.finish(sse.error(client_message(error)), EndReason.ERROR)

    def _give_up(self, stream: Stream) -> None:
        stream.deadline = None
        self._unconfirmed.discard(stream)
        waiting = next((share for share in stream.shares if not self.shared.in_effect(share)), None)
        share = waiting or (stream.shares[0] if stream.shares else None)
        exchange = share.binding.exchange if share is not None else ""
        if self.shared.binder.is_connected:  # connected: the binds waiting were too many
            self._fail(stream, BindFailed.busy(exchange), Outcome.BUSY)
        else:
            self._fail(stream, BindFailed.unavailable(exchange), Outcome.BROKER_UNAVAILABLE)

    def reconnected(self) -> None:
        """A new broker connection: each stream that was ready is made ready again on it."""
        self.shared.connected()
        generation = self.shared.binder.generation
        held, self._unconfirmed = self._unconfirmed, set()
        for stream in held:  # on the new connection they wait for their bindings
            if not stream.finished and not self._wait(stream):
                self._ready(stream)
        for stream in self.streams:
            stale = stream.joined and not stream.finished and stream.generation < generation
            if stale and not self._wait(stream):
                self._ready(stream)

    # -- the timer's work ------------------------------------------------------------

    async def ping_streams(self) -> None:
        """Ping every stream, a batch per event-loop turn: with thousands of streams the
        loop keeps answering other requests (health probes, new streams) meanwhile."""
        frame = sse.ping()
        streams = list(self.streams)
        for start in range(0, len(streams), PING_BATCH):
            for stream in streams[start : start + PING_BATCH]:
                self._push(stream, frame)  # a stream that ended meanwhile ignores it
            await asyncio.sleep(0)

    def dropped(self) -> None:
        """The broker dropped a message from an exchange queue (the process fell behind)."""
        self.counts.dropped += 1

    def tell_of_drops(self) -> None:
        """After drops, once per tick: a log line, and ``ready`` again to every stream
        that gets messages, which means "you may have missed messages: re-check", as
        after a reconnect (which streams the dropped ones were for is not known)."""
        too_large = self.counts.too_large - self._too_large_told
        if too_large:
            self._too_large_told = self.counts.too_large
            log.warning(
                "%d messages over pulse.max_message_bytes (%d) were not delivered; "
                "the streams they were for were told to re-check with ready",
                too_large,
                self.max_message_bytes,
            )
        new = self.counts.dropped - self._dropped_told
        if not new:
            return
        self._dropped_told = self.counts.dropped
        joined = [stream for stream in self.streams if stream.joined and not stream.finished]
        log.warning(
            "the broker dropped %d messages from this process's queue (pulse.queue_max_length "
            "%d: the process fell behind); %d streams told to re-check with ready",
            new,
            self.queue_max_length,
            len(joined),
        )
        for stream in joined:
            self._push(stream, sse.READY)

    def _over_budget(self) -> None:
        """The streams together hold more than ``server.max_buffered_bytes``: end the
        ones holding the most (the slowest readers) until they hold 90% of it, on the
        next loop turn (this is called from inside a push)."""
        asyncio.get_running_loop().call_soon(self._shed)

    def _shed(self) -> None:
        budget = self.budget
        target = budget.limit * 9 // 10
        ended = 0
        for stream in sorted(self.streams, key=lambda s: s.held_bytes, reverse=True):
            if budget.total <= target or not stream.held_bytes:
                break
            if not stream.finished:
                stream.end_too_slow()
                self.counts.too_slow += 1
                ended += 1
            if stream.in_flight:  # its client does not take what is being written
                stream.abort(EndReason.TOO_SLOW)
        budget.over_called = False
        log.warning(
            "streams held %d bytes, over server.max_buffered_bytes (%d): ended the %d slowest",
            budget.total,
            budget.limit,
            ended,
        )

    def drop_stuck_streams(self) -> None:
        """End streams whose client took nothing for ``write_timeout``: gone or stuck."""
        stuck_before = time.monotonic() - self.settings.write_timeout
        for stream in list(self.streams):
            if stream.frames and stream.pending_since < stuck_before:
                self.counts.stuck += 1
                stream.abort(EndReason.STUCK)
                self.close(stream)

    def begin_shutdown(self) -> None:
        """End every stream with a frame that makes an EventSource reconnect, spread out."""
        self.shutting_down = True
        for stream in list(self.streams):
            stream.finish(self.goodbye(), EndReason.SHUTDOWN)

    def goodbye(self) -> bytes:
        return sse.goodbye(random.randint(self.settings.retry_min_ms, self.settings.retry_max_ms))

    # -- messages --------------------------------------------------------------

    def deliver(
        self,
        exchange: str,
        routing_key: str,
        redelivered: bool,
        body: bytes,
        headers: dict[str, Any] | None,
        via: str | None = None,
    ) -> None:
        """Fan one delivery out to every stream whose bindings match its routing key or a
        ``CC`` key (RabbitMQ routes by both); frame it once. ``via`` is the exchange whose
        queue it came on (``exchange`` is the one it was published to: they differ when
        it came through an exchange-to-exchange binding); the streams of ``via`` get it."""
        counts = self.counts
        counts.deliveries += 1
        trie = self._tries.get(via or exchange)
        if trie is None:
            return
        streams = trie.match(routing_key)
        cc = sse.cc_keys(headers)
        for key in cc:
            streams |= trie.match(key)
        if not streams:
            return
        if len(body) > self.max_message_bytes:
            # Checking a body is strict JSON builds its whole tree: a 32 MiB one once took
            # a GiB and stalled every stream for most of a second. Not delivered, counted,
            # and its streams are told that they missed something.
            counts.too_large += 1
            for stream in streams:
                self._push(stream, sse.READY)
            return
        frame, is_json = sse.message(body, exchange, routing_key, redelivered, cc)
        if not is_json:
            counts.non_json += 1
        counts.frames_delivered += len(streams)
        for stream in streams:
            stream.delivered += 1
            self._push(stream, frame)

    def _push(self, stream: Stream, frame: bytes) -> None:
        if not stream.push(frame):
            self.counts.too_slow += 1

    # -- introspection (tests, stats) ------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            "streams": len(self.streams),
            "bindings": len(self.shared),
            "pending_broker_operations": self.shared.pending,
            "buffered_bytes": sum(stream.buffered_bytes for stream in self.streams),
            "held_bytes": self.budget.total,
            "trie_entries": sum(len(trie) for trie in self._tries.values()),
            **self.counts.as_dict(),
        }
