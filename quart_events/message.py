"""A delivery from the broker in the neutral form every transport encodes from.

Nothing is decoded until a subscriber wants the message; then its ``CC`` keys and
its payload (the body as one line of strict JSON) are made once, and each
transport's frame is made once for all of that transport's subscribers
(``encoded``). No I/O.

A body that is strict JSON goes out as its own text (newlines, which JSON allows
only between tokens, become spaces), so a number such as ``1e400`` is passed on as
written and nothing is re-encoded; any other body (not UTF-8, not JSON, non-standard
constants such as ``NaN``, nested too deep to parse) goes out as a JSON string of
its text: a browser's ``JSON.parse`` takes every payload.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

ROUTE_PREFIX = "route."


class Encoder(Protocol):
    """A transport's encoding of a message (the same bytes for all its subscribers)."""

    def encode(self, message: Message) -> bytes: ...


class Message:
    """One delivery: where it was published, its keys, its body and headers as the
    broker gave them. ``via`` is the exchange whose queue it came on (it differs from
    ``exchange`` when it came through an exchange-to-exchange binding)."""

    __slots__ = (
        "_cc",
        "_is_json",
        "_payload",
        "_shared",
        "body",
        "exchange",
        "headers",
        "position",
        "redelivered",
        "routing_key",
        "via",
    )

    def __init__(
        self,
        exchange: str,
        routing_key: str,
        redelivered: bool,
        body: bytes,
        headers: Mapping[str, Any] | None = None,
        via: str | None = None,
        position: int | None = None,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.redelivered = redelivered
        self.body = body
        self.headers = headers
        self.via = via or exchange
        self.position = position  # its offset in the history, when read from there
        self._cc: list[str] | None = None
        self._payload: bytes | None = None
        self._is_json = False
        self._shared: dict[object, bytes] | None = None

    @property
    def cc(self) -> list[str]:
        """The ``CC`` header's routing keys: RabbitMQ routes a message by these too."""
        if self._cc is None:
            self._cc = cc_keys(self.headers)
        return self._cc

    @property
    def routes(self) -> list[str]:
        """The ``CC`` keys that begin with ``route.``, without it (Pulse's convention)."""
        return [key[len(ROUTE_PREFIX) :] for key in self.cc if key.startswith(ROUTE_PREFIX)]

    @property
    def payload(self) -> bytes:
        """The body as one line of strict JSON (a JSON string of its text if it is not)."""
        if self._payload is None:
            payload = json_body(self.body)
            self._is_json = payload is not None
            if payload is None:
                payload = to_json_bytes(self.body.decode("utf-8", "replace"))
            self._payload = payload
        return self._payload

    @property
    def is_json(self) -> bool:
        """Whether the body itself was strict JSON (else the payload is its text)."""
        self.payload  # noqa: B018 (made once: it tells)
        return self._is_json

    def encoded(self, encoder: Encoder) -> bytes:
        """``encoder.encode(self)``, made once for this message however often asked."""
        shared = self.shared
        frame = shared.get(encoder)
        if frame is None:
            frame = shared[encoder] = encoder.encode(self)
        return frame

    @property
    def shared(self) -> dict[object, bytes]:
        """Frames made of this message once for many subscribers, by the key a transport
        finds them by (its encoder; the 2026 WebSocket's subscription id)."""
        shared = self._shared
        if shared is None:
            shared = self._shared = {}
        return shared


def cc_keys(headers: Mapping[str, Any] | None) -> list[str]:
    """The ``CC`` header's routing keys (entries that are not strings are skipped)."""
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> Any:
    """``text`` parsed as strict JSON (no NaN or Infinity, which ``JSON.parse`` refuses);
    ``ValueError`` (or ``RecursionError``) when it is not."""
    return json.loads(text, parse_constant=_reject_constant)


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
