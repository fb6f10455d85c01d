"""The registry of subscribers: who is ready, who matches a message, fan-out.

A subscriber joins the topic tries, and so starts getting messages, when every one
of its bindings is in effect on the current broker connection: that is the moment
its ``ready`` goes out. After a reconnect each subscriber gets ``ready`` again once
its bindings are bound on the new connection, or an error when the broker refuses
one. A message reaches every matching subscriber once, whether its routing key or a
``CC`` key matched, and each transport encodes it once for all of its subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable

from .bindings import Binding
from .errors import BindFailed, ExchangeMissing, client_message
from .message import Message
from .metrics import Counts, EndReason, Metrics, Outcome
from .outbox import Budget, Outbox
from .settings import PulseSettings, ServerSettings
from .shared_bindings import SharedBinding, SharedBindings
from .subscribers import Subscriber, Transport
from .topic import TopicTrie

log = logging.getLogger(__name__)
PING_SLICE = 0.01  # seconds of pinging per event-loop turn
PING_BATCH = 100  # subscribers pinged between looks at the clock
MEMORY_SHARE = 4  # by default, outboxes may hold a quarter of the machine's memory


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
    """Subscribers, their topic tries, and their state with the broker.

    It is the broker's listener (``deliver``, ``reconnected``, ``dropped``,
    ``confirmed``) and the shared bindings' (``settled``): the factory attaches it.
    """

    def __init__(
        self,
        settings: ServerSettings,
        shared: SharedBindings,
        pulse: PulseSettings,
        metrics: Metrics,
        counts: Counts | None = None,
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.wait_for_broker = pulse.wait_for_broker
        self.queue_max_length = pulse.queue_max_length
        self.max_message_bytes = pulse.max_message_bytes
        self.metrics = metrics
        self.counts = counts or Counts()
        # In the order they came (a dict, not a set): a ping round goes over them in the
        # same order each time, oldest first, so a crowd of new ones that stretches a
        # round does not move an older stream's ping later than it came in the last one.
        self.subscribers: dict[Subscriber, None] = {}
        # Connections that carry subscribers of their own choosing (WebSocket), by their
        # outbox, with how many they carry; shutdown ends them. One that carries none
        # counts as a stream (it holds a socket), one that carries some as those.
        self.connections: dict[Outbox, int] = {}
        self._carrying = 0  # connections that carry at least one subscriber
        self.budget = Budget(max_buffered_bytes(settings), self._over_budget)
        self.shutting_down = False
        self._waiting: dict[SharedBinding, set[Subscriber]] = {}
        # New subscribers whose bindings are in effect, held back while the broker has
        # not answered the link's probe for a while: ``ready`` only on a confirmed link.
        self._unconfirmed: set[Subscriber] = set()
        self._dropped_told = 0  # drops the subscribers were told of (``tell_of_drops``)
        self._too_large_told = 0
        self._tries: dict[str, TopicTrie[Subscriber]] = {}

    # -- a subscriber's life -----------------------------------------------------------

    def open(
        self, bindings: Iterable[Binding], transport: Transport, outbox: Outbox, label: bytes = b""
    ) -> Subscriber:
        """Register a subscriber; its ``ready`` (or an error) arrives in its outbox.
        Admission (``Subscribers.admit``) decides first whether it may."""
        subscriber = Subscriber(bindings, transport, outbox, label)
        self.subscribers[subscriber] = None
        carried = self.connections.get(outbox)
        if carried is not None:
            self.connections[outbox] = carried + 1
            self._carrying += carried == 0
        shared = self.shared
        subscriber.shares = [shared.acquire(binding, subscriber) for binding in subscriber.bindings]
        # The shared (equal) instances: subscribers with the same bindings, the common
        # case, then hold no copies of their own for as long as they live.
        subscriber.bindings = tuple(share.binding for share in subscriber.shares)
        waiting = self._wait(subscriber)
        if not waiting and (not subscriber.shares or shared.link_confirmed):
            self._ready(subscriber)  # every binding is in effect already (or there is none)
            return subscriber
        if not waiting:
            self._unconfirmed.add(subscriber)
            shared.confirm_link()
        # A new subscriber waits for the broker so long, then is told it is unavailable.
        loop = asyncio.get_running_loop()
        subscriber.deadline = loop.call_later(self.wait_for_broker, self._give_up, subscriber)
        return subscriber

    def open_count(self, joining: Outbox | None = None) -> int:
        """What counts against ``server.max_streams``: subscribers (a stream, a WebSocket
        subscription), and connections that carry none yet; without the connection
        ``joining`` if its first subscriber would take its place."""
        count = len(self.subscribers) + len(self.connections) - self._carrying
        return count - 1 if joining is not None and self.connections.get(joining) == 0 else count

    def connect(self, outbox: Outbox) -> None:
        """A connection whose client opens subscribers of its choosing (a WebSocket)."""
        self.connections[outbox] = 0

    def disconnect(self, outbox: Outbox, subscribers: Iterable[Subscriber]) -> None:
        """The connection is gone, and with it the subscribers it carried."""
        if self.connections.pop(outbox, 0):
            self._carrying -= 1
        for subscriber in subscribers:
            self.leave(subscriber)

    def leave(self, subscriber: Subscriber, peer: str | None = None) -> None:
        """Forget a subscriber (its client left, or its end was written); release what it
        held. Its outbox is its transport's: it may carry other subscribers."""
        if subscriber not in self.subscribers:
            return
        del self.subscribers[subscriber]
        self._unconfirmed.discard(subscriber)
        carried = self.connections.get(subscriber.outbox)
        if carried is not None:
            self.connections[subscriber.outbox] = carried - 1
            self._carrying -= carried == 1
        reason = subscriber.why_ended
        if subscriber.end_reason is None:
            subscriber.end_reason = reason
        self.metrics.streams_ended.labels(reason).inc()
        log.info(
            "stream ended: %s, %d bindings, %.1f s, %d messages%s",
            reason.replace("_", " "),
            len(subscriber.bindings),
            time.monotonic() - subscriber.opened_at,
            subscriber.delivered,
            f", client {peer}" if peer else "",
        )
        self._unwait(subscriber)
        if subscriber.joined:
            for binding in subscriber.bindings:
                trie = self._tries[binding.exchange]
                trie.discard(binding.routing_key_pattern, subscriber)
                if not len(trie):
                    del self._tries[binding.exchange]
        for share in subscriber.shares:
            self.shared.release(share)
        subscriber.shares = []

    def _end(self, subscriber: Subscriber, reason: EndReason, detail: str | None = None) -> None:
        """End a subscriber on its wire, for ``reason``; it leaves once that is written."""
        self._unwait(subscriber)
        self._unconfirmed.discard(subscriber)
        if subscriber.ended:
            return
        subscriber.end_reason = reason
        subscriber.transport.end(subscriber, reason, detail)

    def _wait(self, subscriber: Subscriber) -> bool:
        """Note what the subscriber waits for; ``False`` when every binding is in effect."""
        self._unwait(subscriber)
        for share in subscriber.shares:
            if not self.shared.in_effect(share):
                self._waiting.setdefault(share, set()).add(subscriber)
                subscriber.waiting_for += 1
        return subscriber.waiting_for > 0

    def _unwait(self, subscriber: Subscriber) -> None:
        if subscriber.deadline is not None:
            subscriber.deadline.cancel()
            subscriber.deadline = None
        if subscriber.waiting_for:
            for share in subscriber.shares:
                waiters = self._waiting.get(share)
                if waiters is not None:
                    waiters.discard(subscriber)
                    if not waiters:
                        del self._waiting[share]
            subscriber.waiting_for = 0

    def _ready(self, subscriber: Subscriber) -> None:
        if subscriber.deadline is not None:
            subscriber.deadline.cancel()
            subscriber.deadline = None
        if not subscriber.joined:
            self.metrics.streams_opened.labels(Outcome.READY).inc()
            self.metrics.ready_seconds.observe(time.monotonic() - subscriber.opened_at)
            for binding in subscriber.bindings:
                self._tries.setdefault(binding.exchange, TopicTrie()).add(
                    binding.routing_key_pattern, subscriber
                )
            subscriber.joined = True
        subscriber.generation = self.shared.generation
        self._tell_ready(subscriber)

    def _fail(
        self, subscriber: Subscriber, error: BaseException, outcome: Outcome | None = None
    ) -> None:
        if not subscriber.joined and not subscriber.ended:
            if outcome is None:
                outcome = (
                    Outcome.MISSING_EXCHANGE
                    if isinstance(error, ExchangeMissing)
                    else Outcome.ERROR
                )
            self.metrics.streams_opened.labels(outcome).inc()
        self._end(subscriber, EndReason.ERROR, client_message(error))

    def _give_up(self, subscriber: Subscriber) -> None:
        subscriber.deadline = None
        self._unconfirmed.discard(subscriber)
        shares = subscriber.shares
        waiting = next((share for share in shares if not self.shared.in_effect(share)), None)
        share = waiting or (shares[0] if shares else None)
        exchange = share.binding.exchange if share is not None else ""
        if self.shared.is_connected:  # connected: the binds waiting were too many
            self._fail(subscriber, BindFailed.busy(exchange), Outcome.BUSY)
        else:
            self._fail(subscriber, BindFailed.unavailable(exchange), Outcome.BROKER_UNAVAILABLE)

    # -- the broker's news ------------------------------------------------------------

    def settled(self, share: SharedBinding) -> None:
        """The broker answered for ``share``: bound on this connection, or refused."""
        if share.failure is None and not self.shared.in_effect(share):
            return  # bound on a connection that is gone already: it is bound again
        for subscriber in self._waiting.pop(share, ()):
            if share.failure is not None:
                self._fail(subscriber, share.failure)
            else:
                subscriber.waiting_for -= 1
                if not subscriber.waiting_for:
                    self._ready(subscriber)

    def confirmed(self) -> None:
        """The broker answered a probe of the link: subscribers held back get ``ready``."""
        if not self._unconfirmed:
            return
        held, self._unconfirmed = self._unconfirmed, set()
        for subscriber in held:
            if not subscriber.ended and not self._wait(subscriber):
                self._ready(subscriber)

    def reconnected(self) -> None:
        """A new broker connection: each subscriber that was ready is made ready on it."""
        self.shared.connected()
        generation = self.shared.generation
        held, self._unconfirmed = self._unconfirmed, set()
        for subscriber in held:  # on the new connection they wait for their bindings
            if not subscriber.ended and not self._wait(subscriber):
                self._ready(subscriber)
        for subscriber in list(self.subscribers):
            stale = subscriber.joined and subscriber.generation < generation
            if stale and not subscriber.ended and not self._wait(subscriber):
                self._ready(subscriber)

    def dropped(self) -> None:
        """The broker dropped a message from an exchange queue (the process fell behind)."""
        self.counts.dropped += 1

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

    # -- messages --------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        """Fan one delivery out to every subscriber whose bindings match its routing key or
        a ``CC`` key (RabbitMQ routes by both); the subscribers of the exchange whose queue
        it came on (``via``) get it."""
        counts = self.counts
        counts.deliveries += 1
        trie = self._tries.get(message.via)
        if trie is None:
            return
        subscribers = trie.match(message.routing_key)
        for key in message.cc:
            subscribers |= trie.match(key)
        if not subscribers:
            return
        if len(message.body) > self.max_message_bytes:
            # Checking a body is strict JSON builds its whole tree: a 32 MiB one once took
            # a GiB and stalled every stream for most of a second. Not delivered, counted,
            # and its subscribers are told that they missed something.
            counts.too_large += 1
            for subscriber in subscribers:
                self._tell_ready(subscriber)
            return
        if not message.is_json:
            counts.non_json += 1
        counts.frames_delivered += len(subscribers)
        # Per subscriber as little as can be (this loop is most of a message's cost): the
        # frame is looked up again only when the transport changes (SSE has one).
        last: Transport | None = None
        frame, addressed = b"", False
        for subscriber in subscribers:
            transport = subscriber.transport
            if transport is not last:
                last, addressed = transport, transport.addressed
                frame = message.encoded(transport.encoder)  # made once per encoder
            if addressed:
                framed = transport.address(subscriber, frame, message)
                if framed is None:
                    continue
                subscriber.delivered += 1
                if not subscriber.outbox.push(framed):
                    counts.too_slow += 1
            else:
                subscriber.delivered += 1
                if not subscriber.outbox.push(frame):
                    counts.too_slow += 1

    def _tell_ready(self, subscriber: Subscriber) -> None:
        frame = subscriber.transport.ready(subscriber)
        if frame is not None:  # the transport may say it once for several subscribers
            self._push(subscriber, frame)

    def _push(self, subscriber: Subscriber, frame: bytes) -> None:
        if not subscriber.outbox.push(frame):
            self.counts.too_slow += 1

    # -- the timer's work ------------------------------------------------------------

    async def ping_streams(self) -> None:
        """Ping every subscriber whose transport pings, ``PING_SLICE`` of them per
        event-loop turn: with thousands the loop keeps answering other requests (health
        probes, new streams), and a turn that new streams made long does not hold the
        round back by more than one slice."""
        subscribers = list(self.subscribers)
        frames: dict[Transport, bytes | None] = {}
        deadline = time.perf_counter() + PING_SLICE
        for start in range(0, len(subscribers), PING_BATCH):
            for subscriber in subscribers[start : start + PING_BATCH]:
                transport = subscriber.transport
                if transport not in frames:
                    frames[transport] = transport.ping()
                frame = frames[transport]
                if frame is not None:
                    self._push(subscriber, frame)  # one that ended meanwhile ignores it
            if time.perf_counter() > deadline:
                await asyncio.sleep(0)
                deadline = time.perf_counter() + PING_SLICE

    def tell_of_drops(self) -> None:
        """After drops, once per tick: a log line, and ``ready`` again to every subscriber
        that gets messages, which means "you may have missed messages: re-check", as
        after a reconnect (which subscribers the dropped ones were for is not known)."""
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
        joined = [s for s in self.subscribers if s.joined and not s.ended]
        log.warning(
            "the broker dropped %d messages from this process's queue (pulse.queue_max_length "
            "%d: the process fell behind); %d streams told to re-check with ready",
            new,
            self.queue_max_length,
            len(joined),
        )
        for subscriber in joined:
            self._tell_ready(subscriber)

    def _over_budget(self) -> None:
        """The outboxes together hold more than ``server.max_buffered_bytes``: end the
        subscribers holding the most (the slowest readers) until they hold 90% of it,
        on the next loop turn (this is called from inside a push)."""
        asyncio.get_running_loop().call_soon(self._shed)

    def _shed(self) -> None:
        budget = self.budget
        target = budget.limit * 9 // 10
        ended = 0
        by_size = sorted(self.subscribers, key=lambda s: s.outbox.held_bytes, reverse=True)
        for subscriber in by_size:
            outbox = subscriber.outbox
            if budget.total <= target or not outbox.held_bytes:
                break
            if not subscriber.ended:
                self._end(subscriber, EndReason.TOO_SLOW)
                self.counts.too_slow += 1
                ended += 1
            if outbox.in_flight:  # its client does not take what is being written
                outbox.abort(EndReason.TOO_SLOW)
        budget.over_called = False
        log.warning(
            "streams held %d bytes, over server.max_buffered_bytes (%d): ended the %d slowest",
            budget.total,
            budget.limit,
            ended,
        )

    def drop_stuck_streams(self) -> None:
        """End subscribers whose client took nothing for ``write_timeout``: gone or stuck
        (frames waiting, or a write that does not return, as long)."""
        stuck_before = time.monotonic() - self.settings.write_timeout
        for subscriber in list(self.subscribers):
            outbox = subscriber.outbox
            if outbox.stuck_since(stuck_before):
                self.counts.stuck += 1
                outbox.abort(EndReason.STUCK)
                self.leave(subscriber)
        for outbox in list(self.connections):  # a connection's subscribers leave with it
            if outbox.stuck_since(stuck_before):
                self.counts.stuck += 1
                outbox.abort(EndReason.STUCK)

    def begin_shutdown(self) -> None:
        """End every subscriber the way its transport says goodbye (SSE: a frame that
        makes an EventSource reconnect, spread out)."""
        self.shutting_down = True
        for subscriber in list(self.subscribers):
            self._end(subscriber, EndReason.SHUTDOWN)
        for outbox in list(self.connections):
            outbox.finish(None, EndReason.SHUTDOWN)

    # -- introspection (tests, stats) ------------------------------------------------

    def stats(self) -> dict[str, int]:
        outboxes = {subscriber.outbox for subscriber in self.subscribers}
        return {
            "streams": len(self.subscribers),
            "connections": len(self.connections),
            "bindings": len(self.shared),
            "pending_broker_operations": self.shared.pending,
            "binds_sent": self.shared.binds_sent,
            "unbinds_sent": self.shared.unbinds_sent,
            "buffered_bytes": sum(outbox.buffered_bytes for outbox in outboxes),
            "held_bytes": self.budget.total,
            "trie_entries": sum(len(trie) for trie in self._tries.values()),
            **self.counts.as_dict(),
        }
