"""The wire format: a delivery's content turned into Server-Sent Events frames. No I/O.

Every event carries ``id: -`` like the original service: an EventSource that
reconnects after the stream ended then sends ``Last-Event-ID`` and is answered
204, so it stops instead of retrying bad input forever. The shutdown frame (a
``reconnect`` event) empties the id, so that reconnect is a fresh one.

Data is always one line of strict JSON (no ``NaN`` or ``Infinity``, which a
browser's ``JSON.parse`` refuses). A body that is strict JSON goes out as its own
text (newlines, which JSON allows only between tokens, become spaces), so a
number such as ``1e400`` is passed on as written and nothing is re-encoded; any
other body (not UTF-8, not JSON, non-standard constants, nested too deep to
parse) goes out as a JSON string of its text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

ROUTE_PREFIX = "route."


def to_json(value: Any) -> str:
    """Compact strict JSON as JavaScript's ``JSON.stringify`` writes it (UTF-8, not escaped)."""
    return to_json_bytes(value).decode()


def to_json_bytes(value: Any) -> bytes:
    """``to_json`` as UTF-8 bytes: orjson where it can (it refuses lone surrogates,
    NaN, and integers beyond 64 bits), the standard library otherwise."""
    try:
        return orjson.dumps(value)
    except (TypeError, ValueError):
        return _stdlib_json(value).encode()


def _stdlib_json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only the escaped form is valid UTF-8
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text


def event(name: str, data: str) -> bytes:
    """One event frame; ``data`` is already one line of JSON."""
    return f"event: {name}\ndata: {data}\nid: -\n\n".encode()


READY = event("ready", "{}")


def ping(now: datetime | None = None) -> bytes:
    now = now or datetime.now(UTC)
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    return event("ping", to_json({"time": stamp}))


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


# -- deliveries -------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_body(body: bytes) -> bytes | None:
    """The body as one line of strict JSON, or ``None`` when it is not strict JSON."""
    try:
        orjson.loads(body)  # fast, and strict: no NaN or Infinity, valid UTF-8 only
    except orjson.JSONDecodeError:
        # orjson also refuses some strict JSON (lone surrogate escapes such as "\ud800",
        # numbers beyond a double such as 1e400): the standard library decides those.
        try:
            json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError included
            return None
    if b"\n" in body or b"\r" in body:
        # Outside strings only (JSON strings hold no raw line breaks): plain whitespace.
        body = body.replace(b"\r", b" ").replace(b"\n", b" ")
    return body


def cc_keys(headers: Mapping[str, Any] | None) -> list[str]:
    """The ``CC`` header's routing keys: RabbitMQ routes a message by these too."""
    if not headers:
        return []
    cc = headers.get("CC")
    if not isinstance(cc, list | tuple):
        return []
    keys = []
    for entry in cc:
        if isinstance(entry, bytes):
            entry = entry.decode("utf-8", "replace")
        if isinstance(entry, str):
            keys.append(entry)
    return keys


def routes(cc: list[str]) -> list[str]:
    """The CC keys that begin with ``route.``, without that prefix (Pulse's convention)."""
    return [key[len(ROUTE_PREFIX) :] for key in cc if key.startswith(ROUTE_PREFIX)]


def message(
    body: bytes, exchange: str, routing_key: str, redelivered: bool, cc: list[str]
) -> tuple[bytes, bool]:
    """The ``message`` frame of one delivery, and whether its body was JSON."""
    payload = json_body(body)
    is_json = payload is not None
    if payload is None:
        payload = to_json_bytes(body.decode("utf-8", "replace"))
    rest = to_json_bytes(
        {
            "exchange": exchange,
            "routingKey": routing_key,
            "redelivered": redelivered,
            "routes": routes(cc),
        }
    )
    # {"payload":<body>, + the rest without its opening brace: the key order of the original.
    # One join: the body is copied once into the frame every matching stream shares.
    parts = (b'event: message\ndata: {"payload":', payload, b",", rest[1:], b"\nid: -\n\n")
    return b"".join(parts), is_json
