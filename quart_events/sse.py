"""Server-Sent Events framing: bytes out, no I/O.

Every event carries ``id: -`` like the original service: an EventSource that
reconnects after the stream ended then sends ``Last-Event-ID`` and is answered
204, so it stops instead of retrying bad input forever. The shutdown frame
empties the id, so that reconnect is a fresh one. Data is always one line of
JSON; JSON escapes every newline a payload may hold.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def to_json(value: Any) -> str:
    """Compact JSON as JavaScript's ``JSON.stringify`` writes it (UTF-8, not escaped)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only the escaped form is valid UTF-8
        text = json.dumps(value, separators=(",", ":"))
    return text


def event(name: str, data: str) -> bytes:
    """One event frame; ``data`` is already one line of JSON."""
    return f"event: {name}\ndata: {data}\nid: -\n\n".encode()


READY = event("ready", "{}")


def ping(now: datetime | None = None) -> bytes:
    now = now or datetime.now(UTC)
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    return event("ping", to_json({"time": stamp}))


def message(
    payload: Any, exchange: str, routing_key: str, redelivered: bool, routes: list[str]
) -> bytes:
    data = {
        "payload": payload,
        "exchange": exchange,
        "routingKey": routing_key,
        "redelivered": redelivered,
        "routes": routes,
    }
    return event("message", to_json(data))


def error(message: str) -> bytes:
    return event("error", to_json(message))


def goodbye(retry_ms: int) -> bytes:
    """Last frame on shutdown: empty the event id and ask for a reconnect after ``retry_ms``."""
    return f"id:\nretry: {int(retry_ms)}\n\n".encode()
