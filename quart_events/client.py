"""A client of the service, and a publisher the way Taskcluster publishes.

``listen`` follows a stream with an SSE client library (httpx-sse), the way an
EventSource does: it comes back after the server's reconnect frame (shutdown, or
the stream limit) and stops on an ``error`` event; with ``resume`` it comes back
with the last message's position (``Last-Event-ID``) and misses nothing.
``publish`` sends a JSON body to a topic exchange with the task's routes in the
``CC`` header.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.exceptions
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from .bindings import parse_bindings
from .broker import open_connection
from .errors import BindFailed, BrokerUnavailable
from .settings import PulseSettings

CONNECT_PATH = "/api/events/v1/connect/"
MISSED_PINGS = 3  # pings missed in a row before a silent stream is given up
FIRST_PING_WITHIN = 75.0  # seconds, before the interval is known (the default is 20 s)
MIN_INTERVAL = 0.5  # seconds: a ping interval is never taken as shorter
MIN_SILENCE = 10.0  # seconds: a busy machine may delay a ping or two, never give up sooner


class ServerError(Exception):
    """The server ended the stream with an ``error`` event, or could not be reached."""


@dataclass
class Listener:
    """Follow one stream until ``count`` messages came (0: no end)."""

    url: str
    bindings_json: str
    on_message: Callable[[dict[str, Any]], None]
    on_status: Callable[[str], None] = lambda _: None
    count: int = 0
    received: int = 0
    resume: bool = False  # ``resume=true``: come back after the last message seen
    position: int | None = None  # where it is (``since`` at first; the last message's id)

    async def run(self) -> None:
        parse_bindings(self.bindings_json)  # the server's own check, before any request
        self.received = 0
        url = self.url.rstrip("/") + CONNECT_PATH
        timeout = httpx.Timeout(30, read=None)
        async with httpx.AsyncClient(timeout=timeout) as client:
            while True:
                retry_ms = 1000
                try:
                    params = {"bindings": self.bindings_json}
                    headers = {}
                    if self.resume:
                        params["resume"] = "true"
                        if self.position is not None:  # as an EventSource's Last-Event-ID
                            headers["Last-Event-ID"] = str(self.position)
                    async with aconnect_sse(
                        client, "GET", url, params=params, headers=headers
                    ) as source:
                        if source.response.status_code != 200:
                            raise ServerError(f"the server answered {source.response.status_code}")
                        self.on_status("connected")
                        retry_ms = await self._follow(source.aiter_sse(), retry_ms)
                        if self.count and self.received >= self.count:
                            return
                except httpx.TransportError as error:
                    self.on_status(f"connection lost ({type(error).__name__}); reconnecting")
                except Silent as silence:
                    self.on_status(f"{silence}; reconnecting")
                # The stream ended without an error (shutdown, or the server was full):
                # come back after the delay the server asked for, as an EventSource does.
                self.on_status(f"reconnecting in {retry_ms / 1000:.1f} s")
                await asyncio.sleep(retry_ms / 1000)

    async def _follow(self, events: AsyncIterator[ServerSentEvent], retry_ms: int) -> int:
        """Read one stream until it ends (or ``count`` messages came); the last retry.

        A link that died without a word (no FIN, no RST: a laptop's suspend, a dropped
        NAT entry) would leave the read waiting for ever: the server pings at a steady
        interval, so a stream that stays silent for ``MISSED_PINGS`` intervals (the longest
        gap between two pings seen so far; ``FIRST_PING_WITHIN`` before two pings came)
        is given up."""
        last_ping: float | None = None
        interval: float | None = None  # the longest gap between two pings seen
        while True:
            wait = max(MISSED_PINGS * interval, MIN_SILENCE) if interval else FIRST_PING_WITHIN
            try:
                event = await asyncio.wait_for(anext(events), wait)
            except StopAsyncIteration:
                return retry_ms
            except TimeoutError:
                raise Silent(f"no ping for {wait:.0f} s") from None
            if event.retry is not None:
                retry_ms = event.retry
            if event.event == "ping":
                now = asyncio.get_running_loop().time()
                if last_ping is not None:
                    interval = max(interval or MIN_INTERVAL, now - last_ping)
                last_ping = now
            elif event.event == "ready":
                self.on_status("ready: waiting for messages")
            elif event.event == "error":
                raise ServerError(json.loads(event.data))
            elif event.event == "gap":
                gap = json.loads(event.data)
                self.on_status(
                    f"gap: messages after {gap['from']} are gone; replaying from {gap['earliest']}"
                )
            elif event.event == "message" and event.data:
                self.on_message(json.loads(event.data))
                if self.resume and event.id.isdigit():
                    self.position = int(event.id)
                self.received += 1
                if self.received == self.count:
                    return retry_ms


class Silent(Exception):
    """The stream sent nothing, not even a ping, for longer than its pings are apart."""


def bindings_document(pairs: Sequence[tuple[str, str]]) -> str:
    """The ``bindings`` JSON of (exchange, pattern) pairs."""
    bindings = [{"exchange": e, "routingKeyPattern": p} for e, p in pairs]
    return json.dumps({"bindings": bindings})


async def publish(
    settings: PulseSettings, exchange: str, routing_key: str, body: bytes, routes: Sequence[str]
) -> None:
    """Publish as Taskcluster does: JSON body, persistent, routes as ``CC: route.<r>``.

    Raises ``BrokerUnavailable`` when no node answers, ``ExchangeMissing`` naming the
    exchange when it does not exist.
    """
    connection = None
    for node in settings.nodes:  # the first node of the cluster that answers
        try:
            connection = await open_connection(settings, node, "tc-events publish")
            break
        except BrokerUnavailable:
            if node == settings.nodes[-1]:
                raise
    assert connection is not None
    async with connection:
        channel = await connection.channel()
        try:
            target = await channel.get_exchange(exchange, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise BindFailed.missing(exchange) from None
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"CC": [f"route.{route}" for route in routes]} if routes else None,
        )
        await target.publish(message, routing_key=routing_key)
