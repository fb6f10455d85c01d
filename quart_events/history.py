"""History for resumable streams: the messages of the kept exchanges in a RabbitMQ
stream queue, written by one writer per deployment and read by each resumed stream.

Why the service writes the history itself: RabbitMQ 3.10's stream queues drop
array-valued headers, ``CC`` included, so a stream bound straight to the exchanges
could not match ``route.*`` bindings. Every instance binds one durable feed queue
(``x-single-active-consumer``: the broker picks the one writer, and the next when it
dies) to each kept exchange; the writer copies each message into the stream with its
exchange, routing key and ``CC`` as string headers (``CC`` as JSON), with publisher
confirms, and only then acknowledges it: a writer that dies leaves its unacknowledged
messages to the next, so history is complete, and a message in flight may be written
twice (at least once). Positions are the stream's offsets: the broker's, the same on
every worker and instance.

A resumed stream reads the stream from its position with a consumer of its own, in
order, from the replay straight into the live messages: one read, so there is no
hand-over to get wrong (no gap, no duplicate). The broker sends a reader at most
``PREFETCH`` unacknowledged messages, and a reader acknowledges only while its
client's outbox has room: a replay is read as the client takes it, never loaded whole.
docs/design.md draws the flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from .bindings import Binding
from .broker import TRANSIENT, open_connection
from .errors import BindFailed, BrokerUnavailable
from .message import Message, cc_keys
from .outbox import Outbox
from .settings import HistorySettings, PulseSettings
from .topic import TopicTrie

log = logging.getLogger(__name__)

PREFETCH = 200  # messages the broker sends a reader ahead of its acknowledgements
# Readers (a channel each) per AMQP connection: RabbitMQ allows 2,047 channels on one
# and closes the whole connection past it; more readers open more connections.
READERS_PER_CONNECTION = 1000
ROOM = 0.5  # a reader acknowledges while its outbox is below this share of its bound
PACE = 0.05  # seconds between looks at a full outbox
EXCHANGE, ROUTING_KEY, CC, REDELIVERED = "x-tc-exchange", "x-tc-routing-key", "x-tc-cc", "x-tc-re"
OFFSET = "x-stream-offset"


class NotKept(ValueError):
    """A resumable binding on an exchange this deployment keeps no history for."""


def names(pulse: PulseSettings) -> tuple[str, str]:
    """The stream's and the feed's queue names (Pulse lets a user make ``queue/<ns>/...``)."""
    prefix = f"queue/{pulse.namespace}/events/history"
    return prefix, prefix + "-feed"


class History:
    """The stream queue, the feed, the writer's consumer, and the readers of this process."""

    def __init__(self, pulse: PulseSettings, settings: HistorySettings) -> None:
        self.pulse = pulse
        self.settings = settings
        self.stream_name, self.feed_name = names(pulse)
        self.connection: AbstractConnection | None = None
        self.writer: AbstractChannel | None = None
        self.binder: AbstractChannel | None = None
        self.kept: set[str] = set()  # exchanges the feed is bound to (by this process)
        self.readers: set[Reader] = set()
        self.written = 0
        self.retrying: asyncio.Future[None] | None = None
        self.stopping = False
        self.tasks: set[asyncio.Future[None]] = set()
        self.connected = asyncio.Event()  # readers may be opened
        self.links: list[ReaderLink] = []

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background (kept here until it is done)."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stats(self) -> dict[str, int | bool]:
        """For operators and tests: whether it is connected, its readers, what it wrote."""
        return {
            "connected": self.connected.is_set(),
            "readers": len(self.readers),
            "written": self.written,
        }

    @property
    def enabled(self) -> bool:
        return bool(self.settings.exchanges)

    def keeps(self, exchange: str) -> bool:
        return any(fnmatch.fnmatchcase(exchange, pattern) for pattern in self.settings.exchanges)

    async def start(self, in_background: bool = False) -> None:
        """Connect, declare the stream and the feed, consume the feed (the broker makes
        one consumer of the deployment the writer); ``in_background``: keep trying."""
        if not self.enabled:
            return
        if in_background:
            self.retrying = asyncio.ensure_future(self._reconnect(at_once=True))
            return
        await self._connect()

    async def _connect(self) -> None:
        node = self.pulse.nodes[0]
        self.connection = await open_connection(self.pulse, node, "tc-events history")
        self.connection.close_callbacks.add(self._lost)
        channel = await self.connection.channel()
        await channel.declare_queue(
            self.stream_name,
            durable=True,
            arguments={
                "x-queue-type": "stream",
                "x-max-age": self.settings.max_age,
                "x-max-length-bytes": self.settings.max_bytes,
                "x-stream-max-segment-size-bytes": self.settings.segment_bytes,
            },
        )
        feed = await channel.declare_queue(
            self.feed_name, durable=True, arguments={"x-single-active-consumer": True}
        )
        await channel.set_qos(prefetch_count=PREFETCH)
        self.writer = channel
        await feed.consume(self._write)
        self.connected.set()

    async def stop(self) -> None:
        self.stopping = True
        if self.retrying is not None:
            self.retrying.cancel()
        for reader in list(self.readers):
            reader.stop()
        links, self.links = self.links, []
        connections = [link.connection for link in links]
        if self.connection is not None:
            self.connection.close_callbacks.discard(self._lost)
            connections.append(self.connection)
            self.connection = None
        for connection in connections:
            with contextlib.suppress(Exception):
                await connection.close()

    def _lost(self, *_: Any) -> None:
        """The history's own connection (the writer's, the feed's bindings) is gone: new
        readers wait until it is back. Readers have connections of their own; one that
        is lost ends its readers (their clients resume from their last position)."""
        log.warning("history: the broker connection was lost; reconnecting")
        self.connection = self.writer = self.binder = None
        self.connected.clear()
        self.kept.clear()
        if not self.stopping:
            self.retrying = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self, at_once: bool = False) -> None:
        delay = self.pulse.reconnect_min_delay
        while self.connection is None and not self.stopping:
            if not at_once:
                await asyncio.sleep(delay)
            at_once = False
            try:
                await self._connect()
            except (BrokerUnavailable, *TRANSIENT) as error:
                log.warning("history: reconnect failed: %s", error)
                delay = min(delay * 2, self.pulse.reconnect_max_delay)
        log.info("history: connected again")

    async def _write(self, message: AbstractIncomingMessage) -> None:
        """Copy one message of a kept exchange into the stream, then acknowledge it."""
        assert self.writer is not None
        headers: dict[str, Any] = {
            EXCHANGE: message.exchange or "",
            ROUTING_KEY: message.routing_key or "",
            CC: json.dumps(cc_keys(message.headers)),
        }
        if message.redelivered:
            headers[REDELIVERED] = "1"
        try:
            await self.writer.default_exchange.publish(
                aio_pika.Message(message.body, headers=headers, delivery_mode=2),
                routing_key=self.stream_name,
            )
            await message.ack()
            self.written += 1
        except TRANSIENT as error:
            log.warning("history: a message was not written (%s); it is written again", error)

    async def keep(self, exchanges: Iterable[str]) -> None:
        """Bind the feed to ``exchanges`` (once per process; the binding is durable):
        every message they get from now on is kept. ``NotKept`` for one outside the
        patterns; ``ExchangeMissing`` for one that does not exist."""
        exchanges = set(exchanges)
        for exchange in exchanges:
            if not self.keeps(exchange):
                raise NotKept(f"no history is kept for exchange `{exchange}`")
        for exchange in exchanges - self.kept:
            if self.connection is None:
                raise BrokerUnavailable("the history is not reachable")
            if self.binder is None or self.binder.is_closed:
                self.binder = await self.connection.channel()
            try:
                feed = await self.binder.get_queue(self.feed_name, ensure=False)
                await feed.bind(exchange, routing_key="#")
            except aiormq.exceptions.ChannelNotFoundEntity as error:
                self.binder = None  # the broker closed it
                raise BindFailed.missing(exchange) from error
            self.kept.add(exchange)

    async def read(
        self,
        bindings: Iterable[Binding],
        since: int | None,
        outbox: Outbox,
        on_message: Callable[[int, Message], None],
        on_gap: Callable[[int, int], None],
        on_lost: Callable[[], None],
    ) -> Reader:
        """A reader of the stream after ``since`` (none: from the next message on) that
        matches ``bindings``; it has started once this returns."""
        if self.connection is None:
            raise BrokerUnavailable("the history is not reachable")
        reader = Reader(self, bindings, since, outbox, on_message, on_gap, on_lost)
        link = await self._link()
        link.readers.add(reader)
        reader.link = link
        try:
            await reader.start(link.connection)
        except BaseException:
            reader.stop()
            raise
        self.readers.add(reader)
        return reader

    async def _link(self) -> ReaderLink:
        """A connection for one more reader: one with room, else a new one."""
        for link in self.links:
            if len(link.readers) < READERS_PER_CONNECTION and not link.connection.is_closed:
                return link
        connection = await open_connection(self.pulse, self.pulse.nodes[0], "tc-events readers")
        link = ReaderLink(connection)
        self.links.append(link)
        connection.close_callbacks.add(lambda *_: self._link_lost(link))
        return link

    def _link_lost(self, link: ReaderLink) -> None:
        if link in self.links:
            self.links.remove(link)
        for reader in list(link.readers):
            reader.lost()


class ReaderLink:
    """An AMQP connection that carries readers."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.readers: set[Reader] = set()


class Reader:
    """One resumed stream's consumer of the stream queue."""

    def __init__(
        self,
        history: History,
        bindings: Iterable[Binding],
        since: int | None,
        outbox: Outbox,
        on_message: Callable[[int, Message], None],
        on_gap: Callable[[int, int], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.history = history
        self.tries: dict[str, TopicTrie[int]] = {}
        for binding in bindings:
            trie = self.tries.setdefault(binding.exchange, TopicTrie())
            trie.add(binding.routing_key_pattern, 0)
        self.since = since
        self.outbox = outbox
        self.on_message, self.on_gap, self.on_lost = on_message, on_gap, on_lost
        self.channel: AbstractChannel | None = None
        self.first = True
        self.held: list[AbstractIncomingMessage] = []  # read, not yet acknowledged
        self.pacer: asyncio.TimerHandle | None = None
        self.stopped = False
        self.link: ReaderLink | None = None

    async def start(self, connection: AbstractConnection) -> None:
        self.channel = await connection.channel()
        # Closed by the broker (the stream deleted, say): the stream ends, to come back.
        self.channel.close_callbacks.add(lambda *_: self.lost())
        await self.channel.set_qos(prefetch_count=PREFETCH)
        queue: AbstractQueue = await self.channel.get_queue(self.history.stream_name, ensure=False)
        offset: int | str = "next" if self.since is None else self.since + 1
        await queue.consume(self._on_delivery, arguments={OFFSET: offset})

    def matches(self, message: Message) -> bool:
        trie = self.tries.get(message.exchange)
        if trie is None:
            return False
        if trie.match(message.routing_key):
            return True
        return any(trie.match(key) for key in message.cc)

    async def _on_delivery(self, delivery: AbstractIncomingMessage) -> None:
        if self.stopped:
            return
        headers = delivery.headers or {}
        offset = headers.get(OFFSET)
        if not isinstance(offset, int):
            await delivery.ack()
            return
        if self.since is not None and offset <= self.since:
            await delivery.ack()  # the chunk the position is in starts before it
            return
        if self.first:
            self.first = False
            if self.since is not None and offset > self.since + 1:
                self.on_gap(self.since, offset)  # retention removed what was asked
        message = _message_of(delivery)
        if message is not None and self.matches(message):
            self.on_message(offset, message)
        self.held.append(delivery)
        self._acknowledge()

    def _acknowledge(self) -> None:
        """Acknowledge what was read while the client's outbox has room; else look again
        soon (the broker sends nothing more meanwhile)."""
        outbox = self.outbox
        if self.stopped or outbox.finished:
            return
        if not self.held:
            return
        if len(outbox.frames) < outbox.max_frames * ROOM and (
            outbox.buffered_bytes < outbox.max_bytes * ROOM
        ):
            last, self.held = self.held[-1], []
            self.history.later(_ack(last))  # it and every one before it
        elif self.pacer is None:
            self.pacer = asyncio.get_running_loop().call_later(PACE, self._paced)

    def _paced(self) -> None:
        self.pacer = None
        self._acknowledge()

    def lost(self) -> None:
        if not self.stopped:
            self.stop()
            self.on_lost()

    def stop(self) -> None:
        """The stream is gone: its consumer goes with its channel."""
        self.stopped = True
        self.history.readers.discard(self)
        if self.link is not None:
            self.link.readers.discard(self)
            self.link = None
        if self.pacer is not None:
            self.pacer.cancel()
        self.held.clear()
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            self.history.later(_close(channel))


async def _ack(delivery: AbstractIncomingMessage) -> None:
    with contextlib.suppress(*TRANSIENT):
        await delivery.ack(multiple=True)


async def _close(channel: AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        await channel.close()


def _message_of(delivery: AbstractIncomingMessage) -> Message | None:
    """The message as it was published, from the writer's string headers."""
    headers = delivery.headers or {}
    exchange, key, cc = headers.get(EXCHANGE), headers.get(ROUTING_KEY), headers.get(CC)
    if not isinstance(exchange, str) or not isinstance(key, str) or not isinstance(cc, str):
        return None
    try:
        keys = json.loads(cc)
    except ValueError:
        keys = []
    return Message(exchange, key, headers.get(REDELIVERED) == "1", delivery.body, {"CC": keys})
