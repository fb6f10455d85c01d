"""The wire format: a delivery's content turned into Server-Sent Events frames. No I/O.

Every event carries ``id: -`` like the original service: an EventSource that
reconnects after the stream ended then sends ``Last-Event-ID`` and is answered
204, so it stops instead of retrying bad input forever. The shutdown frame (a
``reconnect`` event) empties the id, so that reconnect is a fresh one.

Data is always one line of strict JSON (no ``NaN`` or ``Infinity``, which a
browser's ``JSON.parse`` refuses); a message's payload is made as ``message.py`` says.
"""

from __future__ import annotations

from datetime import UTC, datetime

from .message import Message, to_json, to_json_bytes


def event(name: str, data: str) -> bytes:
    """One event frame; ``data`` is already one line of JSON."""
    return f"event: {name}\ndata: {data}\nid: -\n\n".encode()


READY = event("ready", "{}")


def ping(now: datetime | None = None) -> bytes:
    return event("ping", ping_data(now))


def ping_data(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    return to_json({"time": stamp})


def error(message: str) -> bytes:
    return event("error", to_json(message))


RECONNECT = "reconnect"


def goodbye(retry_ms: int) -> bytes:
    """Last frame on shutdown (and over the stream limit): come back after ``retry_ms``.

    It empties the event id, so the reconnect sends no ``Last-Event-ID`` and is not
    answered 204. It is a dispatched event of its own type, with data: clients that
    take the id only from a dispatched event (npm ``eventsource`` 3.x) take the empty
    one too, and no ``message`` handler sees it (its type is not ``message``).
    """
    return f"event: {RECONNECT}\ndata: {{}}\nid:\nretry: {int(retry_ms)}\n\n".encode()


def message(
    body: bytes, exchange: str, routing_key: str, redelivered: bool, cc: list[str]
) -> tuple[bytes, bool]:
    """The ``message`` frame of one delivery, and whether its body was JSON."""
    delivery = Message(exchange, routing_key, redelivered, body, {"CC": cc})
    return message_event(delivery), delivery.is_json


def message_event(message: Message) -> bytes:
    """The ``message`` frame of ``message``; its data is ``message_data``."""
    # One join: the body is copied once into the frame every matching stream shares.
    return b"".join((b"event: message\ndata: ", *message_data_parts(message), b"\nid: -\n\n"))


def message_data_parts(message: Message) -> tuple[bytes, ...]:
    """The SSE message object, in pieces to join: ``{"payload":<body>,`` and the other
    fields (the key order of the original)."""
    rest = to_json_bytes(
        {
            "exchange": message.exchange,
            "routingKey": message.routing_key,
            "redelivered": message.redelivered,
            "routes": message.routes,
        }
    )
    return b'{"payload":', message.payload, b",", rest[1:]


# -- resumable streams (``resume=true``): only messages carry an id, their position ----


def unnumbered(name: str, data: str) -> bytes:
    """An event of a resumable stream other than a message: no ``id:`` line, so the
    browser's last event id stays the last message's."""
    return f"event: {name}\ndata: {data}\n\n".encode()


RESUMABLE_READY = unnumbered("ready", "{}")


class Positioned:
    """A resumable stream's ``message`` frame: its id is the message's position (the
    same bytes for every resumable stream that gets it: ``Message.encoded``)."""

    def encode(self, message: Message) -> bytes:
        position = f"\nid: {message.position}\n\n".encode()
        return b"".join((b"event: message\ndata: ", *message_data_parts(message), position))


POSITIONED = Positioned()


def gap(asked: int, earliest: int) -> bytes:
    """What was asked for is gone (retention): the client should re-check its state."""
    return unnumbered("gap", to_json({"from": asked, "earliest": earliest}))


def come_back(retry_ms: int) -> bytes:
    """A resumable stream's last frame on shutdown: come back after ``retry_ms``, with
    the id kept (the reconnect sends it as ``Last-Event-ID`` and resumes from there)."""
    return f"event: {RECONNECT}\ndata: {{}}\nretry: {int(retry_ms)}\n\n".encode()
