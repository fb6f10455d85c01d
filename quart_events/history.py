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

Each process reads the stream with one tail reader (from the next message on) for
every resumable subscription that has caught up, matched once per message, and with a
replay reader per subscription that catches up from its position (at most
``history.max_replays`` at once: each stream consumer costs the broker open files);
``resume.py`` hands a subscription over from its replay to the tail. The broker sends
a reader at most ``PREFETCH`` unacknowledged messages, and a replay acknowledges only
while its client's outbox has room: it is read as the client takes it, never loaded
whole. docs/design.md draws the flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol

import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
)
from aiormq.abc import DeliveredMessage

from .bindings import Binding
from .broker import TRANSIENT, open_connection
from .errors import BindFailed, BrokerUnavailable
from .message import Message, cc_keys
from .outbox import Outbox
from .settings import HistorySettings, PulseSettings
from .topic import Bound

log = logging.getLogger(__name__)

PREFETCH = 200  # messages the broker sends a reader ahead of its acknowledgements
ACK_EVERY = 50  # acknowledged in batches (the broker's credit never runs out)
WRITE_AHEAD = 500  # messages of the feed the writer holds, written but not yet confirmed
# Readers (a channel each) per AMQP connection: RabbitMQ allows 2,047 channels on one
# and closes the whole connection past it; more readers open more connections.
READERS_PER_CONNECTION = 1000
ROOM = 0.5  # a reader acknowledges while its outbox, and all the broker may still send
# it (``PREFETCH`` messages of the size read so far), stay below this share of its bound
END_WAIT = 1.0  # seconds a new tail waits for the stream's last chunk (none: it is empty)
FRAMING = 200  # bytes a frame adds to a message's body, about
PACE = 0.05  # seconds between looks at a full outbox
EXCHANGE, ROUTING_KEY, CC, REDELIVERED = "x-tc-exchange", "x-tc-routing-key", "x-tc-cc", "x-tc-re"
OFFSET = "x-stream-offset"


class Listener(Protocol):
    """A resumable subscription, as the process's tail reader sees it."""

    def from_tail(self, message: Message) -> None:
        """A message it is bound to, read by the tail (``message.position`` is set)."""

    def lost(self) -> None: ...


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
        self.raw_writer: aiormq.abc.AbstractChannel | None = None
        self.unconfirmed: deque[int] = deque()  # feed delivery tags written, in order
        self.confirmed: set[int] = set()  # of those, the ones the broker confirmed
        self.acked_upto = 0  # confirmed since the last acknowledgement to the feed
        self.tail: Reader | None = None
        self.tail_offset = -1  # the last offset the tail read
        self.live: dict[Listener, list[Binding]] = {}  # listening to the tail, by bindings
        self.bound: Bound[Listener] = Bound()  # the same, matched once per message
        self.replays = asyncio.Semaphore(settings.max_replays)

    def later(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background (kept here until it is done)."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stats(self) -> dict[str, int | bool]:
        """For operators and tests: whether it is connected, its subscriptions, what it wrote."""
        tail = self.tail is not None and not self.tail.stopped
        return {
            "connected": self.connected.is_set(),
            "live": len(self.live),  # resumable subscriptions (replaying or caught up)
            "replaying": len(self.readers) - tail,
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
        """The writer's connection (if it is not up) and the tail (if it is not reading)."""
        if self.connection is None:
            await self._connect_writer()
        await self._start_tail()
        self.connected.set()

    async def _connect_writer(self) -> None:
        node = self.pulse.nodes[0]
        connection = await open_connection(self.pulse, node, "tc-events history")
        try:
            await self._declare_and_write(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self.connection = connection
        connection.close_callbacks.add(self._lost)

    async def _declare_and_write(self, connection: AbstractConnection) -> None:
        channel = await connection.channel()
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
        self.writer = channel
        raw = self.raw_writer = await channel.get_underlay_channel()  # confirms are on
        self.unconfirmed.clear()
        self.confirmed.clear()
        await raw.basic_qos(prefetch_count=WRITE_AHEAD)
        await raw.basic_consume(feed.name, self._write)

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
        self._reconnect_soon()

    def _reconnect_soon(self) -> None:
        if not self.stopping and (self.retrying is None or self.retrying.done()):
            self.retrying = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self, at_once: bool = False) -> None:
        delay = self.pulse.reconnect_min_delay
        while (self.connection is None or self.tail is None) and not self.stopping:
            if not at_once:
                await asyncio.sleep(delay)
            at_once = False
            try:
                await self._connect()
            except (BrokerUnavailable, *TRANSIENT) as error:
                log.warning("history: reconnect failed: %s", error)
                delay = min(delay * 2, self.pulse.reconnect_max_delay)
        log.info("history: connected again")

    async def _write(self, delivery: DeliveredMessage) -> None:
        """Copy one message of a kept exchange into the stream; once the broker confirms
        it (and every one before it), acknowledge them to the feed, in batches."""
        raw = self.raw_writer
        assert raw is not None
        tag = delivery.delivery_tag or 0
        headers: dict[str, Any] = {
            EXCHANGE: delivery.exchange or "",
            ROUTING_KEY: delivery.routing_key or "",
            CC: json.dumps(cc_keys(delivery.header.properties.headers)),
        }
        if delivery.redelivered:
            headers[REDELIVERED] = "1"
        self.unconfirmed.append(tag)
        try:
            await raw.basic_publish(
                delivery.body,
                routing_key=self.stream_name,
                properties=aiormq.spec.Basic.Properties(headers=headers, delivery_mode=2),
            )
        except TRANSIENT as error:  # the connection went: the feed gives it to the next
            log.warning("history: a message was not written (%s); it is written again", error)
            return
        self.written += 1
        self.confirmed.add(tag)
        last, count = 0, 0
        while self.unconfirmed and self.unconfirmed[0] in self.confirmed:
            last = self.unconfirmed.popleft()
            self.confirmed.discard(last)
            count += 1
        if last:
            self.acked_upto += count
            if self.acked_upto >= ACK_EVERY or not self.unconfirmed:
                self.acked_upto = 0
                with contextlib.suppress(*TRANSIENT):
                    await raw.basic_ack(last, multiple=True)

    async def keep(self, exchanges: Iterable[str]) -> None:
        """Bind the feed to ``exchanges`` (once per process; the binding is durable):
        every message they get from now on is kept. ``NotKept`` for one outside the
        patterns; ``ExchangeMissing`` for one that does not exist."""
        exchanges = set(exchanges)
        why = self.unkept(exchanges)
        if why is not None:
            raise NotKept(why)
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

    async def replay(
        self,
        since: int,
        on_delivery: Callable[[int, Message | None], None],
        on_lost: Callable[[], None],
        outbox: Outbox,
    ) -> Reader:
        """A reader of the stream after ``since``, paced by ``outbox``: at most
        ``history.max_replays`` at once in a process (each costs the broker open files);
        the others wait their turn."""
        await self.replays.acquire()
        try:
            reader = await self._reader(since, on_delivery, on_lost, outbox)
        except BaseException:
            self.replays.release()
            raise
        reader.holds_a_turn = True
        return reader

    async def _reader(
        self,
        since: int | None,
        on_delivery: Callable[[int, Message | None], None],
        on_lost: Callable[[], None],
        outbox: Outbox | None,
    ) -> Reader:
        if self.connection is None:
            raise BrokerUnavailable("the history is not reachable")
        reader = Reader(self, since, on_delivery, on_lost, outbox)
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

    async def _start_tail(self) -> None:
        """The process's one reader of what is written from now on: every resumable
        subscription that has caught up hears it from here."""
        if self.tail is None or self.tail.stopped:
            # It reads on from a message at the stream's end, so a replay that has read
            # that one is caught up (resume.py hands over by ``tail_offset``); on an
            # empty stream, from the next message on (-1: nothing known yet).
            end = await self._end_offset()
            self.tail_offset = -1 if end is None else end
            self.tail = await self._reader(end, self._from_tail, self._tail_lost, None)

    async def _end_offset(self) -> int | None:
        """The offset of a message in the stream's last chunk (the broker sends that
        chunk first to a consumer from ``last``), or ``None`` when nothing comes soon:
        an empty stream. AMQP has no call that says where a stream ends."""
        link = await self._link()
        channel = await link.connection.channel()
        try:
            raw = await channel.get_underlay_channel()
            await raw.basic_qos(prefetch_count=1)
            found: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            async def seen(delivery: DeliveredMessage) -> None:
                offset = (delivery.header.properties.headers or {}).get(OFFSET)
                if isinstance(offset, int) and not found.done():
                    found.set_result(offset)

            await raw.basic_consume(self.stream_name, seen, arguments={OFFSET: "last"})
            try:
                return await asyncio.wait_for(found, END_WAIT)
            except TimeoutError:
                return None
        finally:
            await _close(channel)

    def _from_tail(self, offset: int, message: Message | None) -> None:
        self.tail_offset = offset
        if message is not None:
            for listener in self.bound.match(message.exchange, message.routing_key, message.cc):
                listener.from_tail(message)

    def _tail_lost(self) -> None:
        """Live subscriptions cannot go on without it: they end (and come back)."""
        self.tail = None
        self.connected.clear()
        for listener in list(self.live):
            listener.lost()
        self._reconnect_soon()

    def listen(self, listener: Listener, bindings: list[Binding]) -> None:
        self.live[listener] = bindings
        for binding in bindings:
            self.bound.add(binding.exchange, binding.routing_key_pattern, listener)

    def unlisten(self, listener: Listener) -> None:
        for binding in self.live.pop(listener, ()):
            self.bound.discard(binding.exchange, binding.routing_key_pattern, listener)

    def unkept(self, exchanges: Iterable[str]) -> str | None:
        """Why these exchanges cannot be resumed (the first one not kept), or ``None``."""
        for exchange in exchanges:
            if not self.keeps(exchange):
                return f"No history is kept for exchange `{exchange}`"
        return None

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
    """A consumer of the stream queue from a position (or from the next message): the
    process's tail, or one resumed subscription's replay, paced by its outbox. On
    aiormq's channel: no object per delivery beyond aiormq's own, acknowledgements in
    batches."""

    def __init__(
        self,
        history: History,
        since: int | None,
        on_delivery: Callable[[int, Message | None], None],
        on_lost: Callable[[], None],
        outbox: Outbox | None,
    ) -> None:
        self.history = history
        self.since = since
        self.on_delivery, self.on_lost = on_delivery, on_lost
        self.outbox = outbox
        self.channel: AbstractChannel | None = None
        self.raw: aiormq.abc.AbstractChannel | None = None
        self.held = 0  # read, not yet acknowledged
        self.read_bytes = self.read_count = 0  # bodies read: their mean size sizes its window
        self.last_tag = 0  # the delivery tag of the last one read
        self.pacer: asyncio.TimerHandle | None = None
        self.paced = False  # waiting for its client to take what it has
        self.heard_at = time.monotonic()  # the last delivery
        self.stopped = False
        self.link: ReaderLink | None = None
        self.holds_a_turn = False  # one of ``history.max_replays``

    async def start(self, connection: AbstractConnection) -> None:
        self.channel = await connection.channel()
        # Closed by the broker (the stream deleted, say): it ends, to come back.
        self.channel.close_callbacks.add(lambda *_: self.lost())
        self.raw = await self.channel.get_underlay_channel()
        await self.raw.basic_qos(prefetch_count=PREFETCH)
        offset: int | str = "next" if self.since is None else self.since + 1
        await self.raw.basic_consume(
            self.history.stream_name, self._on_delivery, arguments={OFFSET: offset}
        )

    async def _on_delivery(self, delivery: DeliveredMessage) -> None:
        if self.stopped:
            return
        self.held += 1
        self.read_count += 1
        self.read_bytes += len(delivery.body)
        self.heard_at = time.monotonic()
        self.last_tag = delivery.delivery_tag or self.last_tag
        headers = delivery.header.properties.headers or {}
        offset = headers.get(OFFSET)
        # (an offset at or before the position: the chunk it is in starts before it)
        if isinstance(offset, int) and (self.since is None or offset > self.since):
            self.on_delivery(offset, _message_of(headers, delivery.body, offset))
        if self.held >= ACK_EVERY:
            self._acknowledge()

    def _acknowledge(self) -> None:
        """Acknowledge what was read while the client's outbox has room for all the
        broker may send next; else look again soon (the broker sends nothing more
        meanwhile)."""
        outbox = self.outbox
        if self.stopped or not self.held:
            return
        if outbox is None or self._room(outbox):
            assert self.raw is not None
            self.held, self.paced = 0, False  # it and every one before it
            self.history.later(_ack(self.raw, self.last_tag))
        else:
            self.paced = True
            if self.pacer is None and not outbox.finished:
                self.pacer = asyncio.get_running_loop().call_later(PACE, self._paced)

    def _room(self, outbox: Outbox) -> bool:
        """Whether its outbox holds, besides what waits in it, a whole window of the
        broker's (``PREFETCH`` messages, as large as the mean so far) within ``ROOM``;
        an empty one always does (messages larger than the window allows: one window
        at a time, and past the bound the client is too slow and resumes)."""
        if not outbox.frames:
            return True
        window = PREFETCH * (self.read_bytes // max(1, self.read_count) + FRAMING)
        return (
            len(outbox.frames) + PREFETCH <= outbox.max_frames * ROOM
            and outbox.buffered_bytes + window <= outbox.max_bytes * ROOM
        )

    def _paced(self) -> None:
        self.pacer = None
        self._acknowledge()

    def lost(self) -> None:
        if not self.stopped:
            self.stop()
            self.on_lost()

    def stop(self) -> None:
        """Its consumer goes with its channel; its turn goes to the next replay."""
        if self.stopped:
            return
        self.stopped = True
        history = self.history
        history.readers.discard(self)
        if self.holds_a_turn:
            history.replays.release()
        if self.link is not None:
            self.link.readers.discard(self)
            self.link = None
        if self.pacer is not None:
            self.pacer.cancel()
        channel, self.channel = self.channel, None
        self.raw = None
        if channel is not None and not channel.is_closed:
            history.later(_close(channel))


async def _ack(channel: aiormq.abc.AbstractChannel, tag: int) -> None:
    with contextlib.suppress(*TRANSIENT):
        await channel.basic_ack(tag, multiple=True)


async def _close(channel: AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        await channel.close()


def _message_of(headers: Mapping[str, Any], body: bytes, position: int) -> Message | None:
    """The message as it was published, from the writer's string headers."""
    exchange, key, cc = headers.get(EXCHANGE), headers.get(ROUTING_KEY), headers.get(CC)
    if not isinstance(exchange, str) or not isinstance(key, str) or not isinstance(cc, str):
        return None
    try:
        keys = json.loads(cc)
    except ValueError:
        keys = []
    redelivered = headers.get(REDELIVERED) == "1"
    return Message(exchange, key, redelivered, body, {"CC": keys}, position=position)
