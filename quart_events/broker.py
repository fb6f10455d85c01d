"""The AMQP side: one connection, an exclusive queue per bound exchange, binds on their own channel.

Deliveries go to the listener (the hub) as ``Message`` values; nothing is decoded
here (a message is decoded only when a subscriber wants it). Binds run on a channel of their
own: a bind to a missing exchange makes the broker close the channel it came on,
and that must never be the consuming one. Bindings are kept out of aio-pika's
robust bookkeeping on purpose (it replays every binding after a reconnect and
loops when one exchange is gone); ``shared_bindings`` owns them, and binds only on
the connection it means (``generation``).

The supervisor never dies and never waits for anyone: whatever a connect attempt
raises is logged and retried with backoff, and the listener's ``reconnected`` is a
plain call that only starts the restore, so a loss during a restore is met by reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import random
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic as _Basic

from .bindings import Binding
from .errors import BindFailed, BrokerError, BrokerUnavailable, ExchangeMissing, NotConnected
from .message import Message
from .settings import PulseSettings

log = logging.getLogger(__name__)


CONFIRMED_FOR = 1.0  # seconds an answer of the broker confirms the link for
DEFAULT_PROBE_TIMEOUT = 30.0  # seconds, when the heartbeat is off
# The dropped messages the broker keeps for a stalled process to count (count and
# bytes): drops beyond are still reported, as at least this many.
DROPPED_KEPT, DROPPED_KEPT_BYTES = 100_000, 16 * 2**20
# A delivery is three frames (method, header, body) when its body fits in one frame.
FRAMES_PER_MESSAGE = 3
# What a lost connection or a closed channel raises from aiormq; worth a retry.
TRANSIENT = (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)


def project_error(error: BaseException, exchange: str) -> BrokerError:
    """An AMQP error of a bind or an unbind, as the project's (the one place they are
    mapped): the broker's refusals name the exchange; anything else means the
    connection or its channel went, and the work is tried again."""
    if isinstance(error, BrokerError):
        return error
    if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity):
        return BindFailed.missing(exchange)
    if isinstance(error, aiormq.exceptions.ChannelAccessRefused):
        return BindFailed.refused(exchange)
    return NotConnected(f"interrupted: {type(error).__name__}")


def _raise_if_cancelled() -> None:
    """aiormq may swallow the cancellation of an RPC (or turn it into a channel error):
    a cancelled caller must still stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def describe_connect_error(
    settings: PulseSettings, error: BaseException, node: tuple[str, int]
) -> str:
    """One line for an operator: where, and why, without the password."""
    where = f"RabbitMQ at {node[0]}:{node[1]}"
    if isinstance(
        error, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError
    ):
        reason = f"login refused for user {settings.username!r} on vhost {settings.vhost!r}"
    elif isinstance(error, ConnectionRefusedError) or (
        isinstance(error, OSError)
        and (error.errno == errno.ECONNREFUSED or "Connect call failed" in str(error))
    ):
        reason = "connection refused"
    elif isinstance(error, socket.gaierror):
        reason = "host name not found"
    elif isinstance(error, TimeoutError | asyncio.TimeoutError):
        reason = f"no answer within {settings.connect_timeout:g} s"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = type(error).__name__
    return f"cannot reach {where}: {reason}"


async def open_connection(
    settings: PulseSettings, node: tuple[str, int], name: str
) -> AbstractConnection:
    """One AMQP connection to ``node``, with the settings' credentials and TLS;
    ``BrokerUnavailable`` (one line for the operator, no password) if it fails."""
    host, port = node
    try:
        context = None
        if settings.tls:
            cafile = str(settings.tls_ca_file) if settings.tls_ca_file else None
            context = ssl.create_default_context(cafile=cafile)
        return await aio_pika.connect(
            host=host,
            port=port,
            login=settings.username,
            password=settings.password.get_secret_value(),
            virtualhost=settings.vhost,
            ssl=settings.tls,
            ssl_context=context,
            timeout=settings.connect_timeout,
            heartbeat=settings.heartbeat,
            client_properties={"connection_name": name},
        )
    except Exception as error:  # anything: the caller retries or says one line
        raise BrokerUnavailable(describe_connect_error(settings, error, node)) from error


async def check_broker(settings: PulseSettings) -> None:
    """Connect once (to any node) and leave: ``BrokerUnavailable`` if no node answers."""
    broker = Broker(settings, name="tc-events check")
    await broker._connect_to_any_node()
    await broker._drop_connection()


class BrokerListener(Protocol):
    """Who hears from the broker connection (the hub)."""

    def deliver(self, message: Message) -> None:
        """A message came on one of the process's queues."""

    def reconnected(self) -> None:
        """A new connection (the first included): bindings must be made on it."""

    def dropped(self) -> None:
        """The broker dropped a message of an exchange queue (``queue_max_length``)."""

    def confirmed(self) -> None:
        """The broker answered a probe of the link."""


@dataclass
class ExchangeQueue:
    """The queue of one bound exchange on the current connection."""

    name: str
    consumer_tag: str
    bindings: int = 0  # bound on it now


class Broker:
    """The process's queue on RabbitMQ: connect and reconnect, consume, bind, unbind.

    Every connection gets a fresh queue name: after a cut, the broker may still hold
    the old exclusive queue for the dead connection until its heartbeat runs out.
    ``generation`` counts connections; the listener's ``reconnected`` is called after
    each one so the bindings made on an earlier one can be made again.
    """

    def __init__(
        self,
        settings: PulseSettings,
        settings_source: Callable[[], PulseSettings] | None = None,
        name: str = "tc-events",
    ) -> None:
        self.settings = settings
        self.name = name
        self._listener: BrokerListener | None = None
        self._answered_at = 0.0  # loop time the broker last answered a probe of the link
        self._probe_now = asyncio.Event()  # someone waits for the link to be confirmed
        self._heard = 0  # deliveries seen: the link lives while they come
        self._watchdog: asyncio.Task[None] | None = None
        self.queue_name = ""
        self.node = ""  # the host of the current connection (never credentials)
        self._next_node = random.randrange(len(settings.nodes))  # instances spread over nodes
        self.generation = 0
        self.reconnects = 0
        self._settings_source = settings_source
        self._connection: AbstractConnection | None = None
        self._consume_channel: aiormq.abc.AbstractChannel | None = None
        self._bind_channel: aiormq.abc.AbstractChannel | None = None
        # The queue of each exchange bound on the current connection (see ``bind``).
        self._exchange_queues: dict[str, ExchangeQueue] = {}
        self._queues_made = 0
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def link_confirmed(self) -> bool:
        """The broker answered a probe of this link within the last second: a stream is
        not told ``ready`` on a link that may have died in silence."""
        if self._watchdog is None or self._watchdog.done():
            return self.is_connected  # nothing probes the link: it is as good as connected
        now = asyncio.get_running_loop().time()
        return self.is_connected and now - self._answered_at < CONFIRMED_FOR

    def attach(self, listener: BrokerListener) -> None:
        """Who hears of deliveries and of the connection; before ``start``."""
        self._listener = listener

    @property
    def listener(self) -> BrokerListener:
        if self._listener is None:
            raise RuntimeError("Broker: no listener attached (attach the hub before start)")
        return self._listener

    def confirm_link(self) -> None:
        """Probe the link now; the listener's ``confirmed`` is called when the broker answers."""
        self._probe_now.set()

    async def start(self, *, connect_in_background: bool = False) -> None:
        """Connect now and raise ``BrokerUnavailable`` if that fails, or (with
        ``connect_in_background``) keep trying in the background; either way, reconnect
        whenever the connection is lost."""
        listener = self.listener  # none attached: fail before connecting
        if not connect_in_background:
            await self._connect_to_any_node()
            listener.reconnected()
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def close(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        self._connected.clear()
        await self._drop_connection()

    # -- connection ---------------------------------------------------------------

    def _current_settings(self) -> PulseSettings:
        """Settings read again (a rotated password takes effect on the next connect)."""
        if self._settings_source is not None:
            try:
                self.settings = self._settings_source()
            except Exception as error:  # keep the last good settings
                log.warning("could not read the settings again, keeping the old ones: %s", error)
        return self.settings

    async def _connect(self) -> None:
        """One attempt; whatever goes wrong is ``BrokerUnavailable``, nothing is left open."""
        settings = self._current_settings()
        nodes = settings.nodes
        host, port = node = nodes[self._next_node % len(nodes)]
        self._next_node += 1  # the next attempt, or the reconnect after a loss: another node
        queue_name = f"queue/{settings.namespace}/events/{uuid.uuid4().hex}"
        connection = await open_connection(settings, node, self.name)
        try:
            if connection.transport is None:
                raise ConnectionError("the connection closed while it was set up")
            # aiormq's own channel: aio-pika's cannot be given a frame buffer, and the
            # consumer reads ahead only as many frames as that buffer holds.
            channel = await connection.transport.connection.channel(
                publisher_confirms=False,
                frame_buffer_size=FRAMES_PER_MESSAGE * settings.read_ahead,
            )
            await self._declare_and_consume(channel, queue_name)
            if connection.is_closed:
                raise ConnectionError("the connection closed while it was set up")
        except Exception as error:  # anything: the supervisor retries, the CLI says one line
            with contextlib.suppress(Exception):
                await connection.close()
            raise BrokerUnavailable(describe_connect_error(settings, error, node)) from error
        self._connection, self._consume_channel = connection, channel
        self._bind_channel = None
        self._exchange_queues, self._queues_made = {}, 0
        self.queue_name = queue_name
        self.node = host
        self.generation += 1
        connection.close_callbacks.add(self._on_close)
        channel.closing.add_done_callback(lambda _: self._on_close(channel))
        self._lost.clear()
        self._connected.set()
        self._answered_at = asyncio.get_running_loop().time()  # it just answered us
        self._watchdog = asyncio.ensure_future(self._watch_link(connection, self.generation))
        log.info(
            "connected to RabbitMQ at %s:%s (connection %d), queue %s",
            host,
            port,
            self.generation,
            queue_name,
        )

    async def _connect_to_any_node(self) -> None:
        """One attempt on each node of the cluster in turn; ``BrokerUnavailable`` (the
        last node's reason) only when none answers."""
        for attempt in range(len(self.settings.nodes)):
            try:
                await self._connect()
                return
            except BrokerUnavailable as error:
                if attempt == len(self.settings.nodes) - 1:
                    raise
                log.warning("%s; trying the next node", error)

    async def _watch_link(self, connection: AbstractConnection, generation: int) -> None:
        """Probe the link every half heartbeat (and whenever ``confirm_link`` asks), and
        give it up when a probe is not answered within half a heartbeat: a link that died
        without a word (no FIN, no RST) is found within about one heartbeat, where aiormq
        waits three and more (49 s at 15). A probe is a passive declare of the process
        queue, on a channel of its own."""
        heartbeat = self.settings.heartbeat or DEFAULT_PROBE_TIMEOUT * 2
        every = max(heartbeat / 2, 0.5)
        loop = asyncio.get_running_loop()
        try:
            channel = await connection.channel(publisher_confirms=False)
            probe_channel = await channel.get_underlay_channel()
            while self.generation == generation and self._connected.is_set():
                self._probe_now.clear()
                await self._answered(
                    probe_channel.queue_declare(self.queue_name, passive=True), every
                )
                if self.generation != generation:
                    return
                self._answered_at = loop.time()
                self.listener.confirmed()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._probe_now.wait(), every)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            if self.generation == generation:
                log.warning(
                    "RabbitMQ at %s gave no answer for %.1f s: the link is dead; reconnecting",
                    self.node,
                    every,
                )
                self._on_close(connection)
        except Exception as error:  # the connection is going anyway; its close is seen
            log.debug("link watchdog stopped: %r", error)

    async def _answered(self, probe: Any, every: float) -> None:
        """Wait for the probe's answer; ``TimeoutError`` once nothing at all came from the
        broker for ``every`` seconds. Deliveries coming in are a sign of life too: behind
        a backlog of them (a process that falls behind) the answer waits its turn, and
        the link is not given up for that (it once was, four times in one benchmark)."""
        answer = asyncio.ensure_future(probe)
        try:
            while True:
                heard = self._heard
                done, _ = await asyncio.wait([answer], timeout=every)
                if done:
                    answer.result()
                    return
                if self._heard == heard:
                    raise TimeoutError
        finally:
            answer.cancel()

    def _on_close(self, sender: Any, error: BaseException | None = None) -> None:
        if sender is not self._connection and sender is not self._consume_channel:
            return  # an old connection, or our own close
        self._connected.clear()
        self._lost.set()

    async def _supervise(self) -> None:
        delay = self.settings.reconnect_min_delay
        while True:
            if self._connected.is_set():
                await self._lost.wait()
                log.warning("lost the connection to RabbitMQ; reconnecting")
                await self._drop_connection()
            try:
                await self._connect()
            except Exception as error:  # BrokerUnavailable, or anything else: retry
                pause = delay * random.uniform(0.75, 1.25)  # spread many instances out
                log.warning("%s; retrying in %.1f s", error, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
                continue
            delay = self.settings.reconnect_min_delay
            if self.generation > 1:
                self.reconnects += 1
            try:
                self.listener.reconnected()  # only starts the restore: never waits for it
            except Exception:
                log.exception("starting the restore of the bindings failed")

    async def _drop_connection(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not asyncio.current_task():
            watchdog.cancel()
        connection, self._connection = self._connection, None
        self._consume_channel = self._bind_channel = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _declare_and_consume(
        self, channel: aiormq.abc.AbstractChannel, queue_name: str
    ) -> None:
        """The process's own queue: what the exchange queues drop at their length limit
        is dead-lettered into it (through the default exchange), and only counted, so
        drops are seen, not silent. Exclusive and auto-delete: the queues live as long
        as this connection."""
        await channel.queue_declare(
            queue_name,
            exclusive=True,
            auto_delete=True,
            arguments={
                "x-max-length": DROPPED_KEPT,
                "x-max-length-bytes": DROPPED_KEPT_BYTES,
            },
        )
        await channel.basic_consume(queue_name, self._on_dropped, no_ack=True)

    async def _queue_of(
        self, exchange: str, bind_channel: aiormq.abc.AbstractChannel
    ) -> ExchangeQueue:
        """The queue that takes the messages of ``exchange``, made on its first binding.

        A queue per bound exchange, because a delivery names the exchange the message
        was *published* to: through an exchange-to-exchange binding (A bound to B, a
        stream bound to B) that is A, and only the queue it came on says it came
        through B, as a queue per client would have it. The length limit keeps a
        stalled process from growing the broker without end."""
        queue = self._exchange_queues.get(exchange)
        if queue is not None:
            return queue
        self._queues_made += 1
        name = f"{self.queue_name}/{self._queues_made}"
        await bind_channel.queue_declare(
            name,
            exclusive=True,
            auto_delete=True,  # gone when its consumer is cancelled (its last unbind)
            arguments={
                "x-max-length": self.settings.queue_max_length,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue_name,
            },
        )
        assert self._consume_channel is not None
        # No acknowledgements: the queue is exclusive and goes with this connection, so
        # a message the process received but did not deliver is lost either way; acks
        # would cost the broker and this process work per message and buy nothing.
        consumed = await self._consume_channel.basic_consume(
            name, functools.partial(self._on_message, exchange), no_ack=True
        )
        queue = ExchangeQueue(name, consumed.consumer_tag or "")
        self._exchange_queues[exchange] = queue
        return queue

    async def _drop_queue_if_unused(self, exchange: str) -> None:
        """Cancel the consumer of an exchange queue that holds no binding any more: the
        broker deletes it (auto-delete)."""
        queue = self._exchange_queues.get(exchange)
        if queue is None or queue.bindings:
            return
        del self._exchange_queues[exchange]
        if self._consume_channel is not None and not self._consume_channel.is_closed:
            with contextlib.suppress(*TRANSIENT):
                await self._consume_channel.basic_cancel(queue.consumer_tag)

    async def _on_dropped(self, message: DeliveredMessage) -> None:
        self._heard += 1
        self.listener.dropped()

    async def _on_message(self, bound: str, message: DeliveredMessage) -> None:
        self._heard += 1  # a sign of life of the link (``_answered``)
        delivery = message.delivery
        assert isinstance(delivery, _Basic.Deliver)  # a consumer only gets Basic.Deliver
        self.listener.deliver(
            Message(
                delivery.exchange or "",
                delivery.routing_key or "",
                bool(delivery.redelivered),
                message.body,
                message.header.properties.headers,
                bound,
            )
        )

    # -- bindings -------------------------------------------------------------------

    async def _binding_channel(self, generation: int) -> aiormq.abc.AbstractChannel:
        """The bind channel of connection ``generation`` (``NotConnected`` if that is gone)."""
        if not self._connected.is_set() or self.generation != generation:
            raise NotConnected("not connected to the message broker")
        if self._bind_channel is None or self._bind_channel.is_closed:
            assert self._connection is not None
            channel = await self._connection.channel(publisher_confirms=False)
            self._bind_channel = await channel.get_underlay_channel()
        return self._bind_channel

    async def bind(self, binding: Binding, generation: int) -> None:
        """Bind the queue of connection ``generation``.

        ``BindFailed`` (naming the exchange) when RabbitMQ refuses; ``NotConnected``
        when that connection is gone, or the bind was interrupted (try again).
        """
        try:
            channel = await self._binding_channel(generation)
            queue = await self._queue_of(binding.exchange, channel)
            await channel.queue_bind(
                queue.name,
                binding.exchange,
                routing_key=binding.routing_key_pattern,
                timeout=self.settings.connect_timeout,
            )
        except TRANSIENT as error:
            _raise_if_cancelled()
            failure = project_error(error, binding.exchange)
            if isinstance(failure, BindFailed):
                await self._drop_queue_if_unused(binding.exchange)
            else:
                log.info("bind to %s interrupted (%r); trying again", binding.exchange, error)
            raise failure from None
        _raise_if_cancelled()
        if self.generation != generation or not self._connected.is_set():
            raise NotConnected("the connection was lost during the bind")
        queue.bindings += 1

    async def unbind(self, binding: Binding, generation: int) -> None:
        """Unbind if connection ``generation`` is still up; the queue is exclusive, so
        whatever is left goes with that connection anyway."""
        queue = self._exchange_queues.get(binding.exchange)
        if queue is None or self.generation != generation:
            return  # never bound on this connection (or it is gone): nothing to undo
        try:
            channel = await self._binding_channel(generation)
            await channel.queue_unbind(
                queue.name,
                binding.exchange,
                routing_key=binding.routing_key_pattern,
                timeout=self.settings.connect_timeout,
            )
        except (*TRANSIENT, NotConnected) as error:
            if not isinstance(project_error(error, binding.exchange), ExchangeMissing):
                log.info("unbind from %s not done: %r", binding.exchange, error)
                _raise_if_cancelled()
                return
            # The exchange was deleted, and its bindings with it.
        queue.bindings -= 1
        await self._drop_queue_if_unused(binding.exchange)
        _raise_if_cancelled()
