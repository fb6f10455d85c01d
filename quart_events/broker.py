"""The AMQP side: one connection, one exclusive queue per process, binds on their own channel.

Deliveries go to ``on_delivery`` as plain values; nothing is decoded here until a
stream wants the message (see ``decode_payload`` and ``routes_of``). Binds run on
a channel of their own: a bind to a missing exchange makes the broker close the
channel it came on, and that must never be the consuming one. Bindings are kept
out of aio-pika's robust bookkeeping on purpose (it replays every binding after a
reconnect and loops when one exchange is gone); the hub owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import ssl
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
import aiormq.exceptions
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic as _Basic

from .bindings import Binding
from .settings import PulseSettings

log = logging.getLogger(__name__)

DeliveryHandler = Callable[[str, str, bool, bytes, "dict[str, Any] | None"], None]


class BrokerError(Exception):
    """A broker failure, worded so it can be shown to a client or an operator."""


class BrokerUnavailable(BrokerError):
    """RabbitMQ cannot be reached or refused us."""


class BindFailed(BrokerError):
    """A binding could not be made; the message names the exchange, nothing internal."""


def decode_payload(body: bytes) -> Any:
    """The body as JSON, or as text (invalid UTF-8 replaced) when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace")


def routes_of(headers: dict[str, Any] | None) -> list[str]:
    """The ``CC`` entries that begin with ``route.``, without that prefix (Pulse's convention)."""
    if not headers:
        return []
    cc = headers.get("CC")
    if not isinstance(cc, list | tuple):
        return []
    routes = []
    for entry in cc:
        if isinstance(entry, bytes):
            entry = entry.decode("utf-8", "replace")
        if isinstance(entry, str) and entry.startswith("route."):
            routes.append(entry[len("route.") :])
    return routes


def describe_connect_error(settings: PulseSettings, error: BaseException) -> str:
    """One line for an operator: where, and why, without the password."""
    where = f"RabbitMQ at {settings.hostname}:{settings.port}"
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


class Broker:
    """The process's queue on RabbitMQ: declare, consume, bind, unbind."""

    def __init__(self, settings: PulseSettings, name: str = "tc-events") -> None:
        self.settings = settings
        self.name = name
        self.on_delivery: DeliveryHandler = lambda *_: None
        self.queue_name = f"queue/{settings.namespace}/events/{uuid.uuid4().hex}"
        self._connection: AbstractConnection | None = None
        self._consume_channel: aiormq.abc.AbstractChannel | None = None
        self._bind_channel: aiormq.abc.AbstractChannel | None = None
        self._bind_lock = asyncio.Lock()
        self._unacked = 0

    @property
    def is_connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.settings.tls:
            return None
        context = ssl.create_default_context(
            cafile=str(self.settings.tls_ca_file) if self.settings.tls_ca_file else None
        )
        return context

    async def start(self) -> None:
        """Connect, declare the queue and start consuming; raise ``BrokerUnavailable``."""
        settings = self.settings
        try:
            self._connection = await aio_pika.connect(
                host=settings.hostname,
                port=settings.port,
                login=settings.username,
                password=settings.password.get_secret_value(),
                virtualhost=settings.vhost,
                ssl=settings.tls,
                ssl_context=self._ssl_context(),
                timeout=settings.connect_timeout,
                client_properties={"connection_name": self.name},
            )
            channel = await self._connection.channel(publisher_confirms=False)
            self._consume_channel = await channel.get_underlay_channel()
            await self._declare_and_consume(self._consume_channel)
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as error:
            await self.close()
            raise BrokerUnavailable(describe_connect_error(settings, error)) from error

    async def _declare_and_consume(self, channel: aiormq.abc.AbstractChannel) -> None:
        # Exclusive and auto-delete: the queue lives as long as this process's connection.
        # The length limit keeps a stalled process from growing the broker without end.
        await channel.queue_declare(
            self.queue_name,
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": self.settings.queue_max_length},
        )
        await channel.basic_qos(prefetch_count=self.settings.prefetch_count)
        self._unacked = 0
        await channel.basic_consume(self.queue_name, self._on_message)

    async def _on_message(self, message: DeliveredMessage) -> None:
        delivery = message.delivery
        assert isinstance(delivery, _Basic.Deliver)  # a consumer only gets Basic.Deliver
        self.on_delivery(
            delivery.exchange or "",
            delivery.routing_key or "",
            bool(delivery.redelivered),
            message.body,
            message.header.properties.headers,
        )
        # Ack in batches: half the prefetch window at a time keeps deliveries flowing.
        self._unacked += 1
        if self._unacked * 2 >= self.settings.prefetch_count:
            self._unacked = 0
            with contextlib.suppress(aiormq.exceptions.AMQPError, ConnectionError, RuntimeError):
                await message.channel.basic_ack(delivery.delivery_tag or 0, multiple=True)

    async def _binding_channel(self) -> aiormq.abc.AbstractChannel:
        if self._bind_channel is None or self._bind_channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                raise BrokerUnavailable("the message broker is not connected")
            channel = await self._connection.channel(publisher_confirms=False)
            self._bind_channel = await channel.get_underlay_channel()
        return self._bind_channel

    async def bind(self, binding: Binding) -> None:
        """Bind the queue; raise ``BindFailed`` naming the exchange when RabbitMQ refuses."""
        async with self._bind_lock:
            try:
                channel = await self._binding_channel()
                await channel.queue_bind(
                    self.queue_name, binding.exchange, routing_key=binding.routing_key_pattern
                )
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise BindFailed(f"exchange `{binding.exchange}` does not exist") from None
            except aiormq.exceptions.ChannelAccessRefused:
                raise BindFailed(f"access to exchange `{binding.exchange}` refused") from None
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as error:
                log.warning("bind to %s failed: %r", binding.exchange, error)
                raise BindFailed(
                    f"could not bind to exchange `{binding.exchange}`: "
                    "the message broker is unavailable"
                ) from None

    async def unbind(self, binding: Binding) -> None:
        async with self._bind_lock:
            try:
                channel = await self._binding_channel()
                await channel.queue_unbind(
                    self.queue_name, binding.exchange, routing_key=binding.routing_key_pattern
                )
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError, BrokerError) as e:
                # The queue is exclusive: whatever is left goes with the connection.
                log.info("unbind from %s failed: %r", binding.exchange, e)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._consume_channel = self._bind_channel = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
