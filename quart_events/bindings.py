"""Parse and check the ``bindings`` JSON: the one parser for the HTTP route and the CLI.

The first five messages are the original taskcluster-events service's, word for
word, because clients match on them. Checks beyond the original (types, lengths,
counts, the exchange allow-list) name the offending binding by its index.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from .topic import pattern_words

MAX_NAME_BYTES = 255  # AMQP short string: routing keys
# Exchange names as AMQP 0-9-1 defines them, which the AMQP library enforces.
MAX_EXCHANGE_CHARS = 127
EXCHANGE_NAME = re.compile(r"[A-Za-z0-9\-_.:@#,/+ ]*")

MISSING = "The `bindings` query parameter is required."
NOT_JSON = "The `bindings` query parameter is not valid JSON."
ONE_KEY = "The json query should have only one key i.e. `bindings`."
NOT_ARRAY = "Bindings must be an array of {exchange, routingKeyPattern}"
NEED_FIELDS = "Binding must include `exchange` and `routingKeyPattern` fields"


class BindingError(ValueError):
    """Bad bindings input; ``str(error)`` is exactly what the client is told."""


@dataclass(frozen=True, slots=True)
class Binding:
    """One (exchange, routing-key pattern) pair, hashable so streams can share it."""

    exchange: str
    routing_key_pattern: str


@dataclass(frozen=True)
class Limits:
    """What a deployment accepts beyond the original contract."""

    max_bindings: int = 100
    max_words: int = 2000  # routing-key pattern words of one stream, its bindings together
    allowed_exchanges: Sequence[str] = ("*",)
    denied_exchanges: Sequence[str] = field(default=("amq.*",))

    def exchange_allowed(self, exchange: str) -> bool:
        if any(fnmatchcase(exchange, pattern) for pattern in self.denied_exchanges):
            return False
        return any(fnmatchcase(exchange, pattern) for pattern in self.allowed_exchanges)


def _reject_constant(name: str) -> Any:
    # JSON has no NaN or Infinity; JavaScript's JSON.parse refuses them too.
    raise ValueError(name)


def _load_json(raw: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise BindingError(NOT_JSON) from None


def _check_name(index: int, field_name: str, value: Any, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise BindingError(f"bindings[{index}]: `{field_name}` must be a string")
    if not value and not allow_empty:
        raise BindingError(f"bindings[{index}]: `{field_name}` must not be empty")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BindingError(
            f"bindings[{index}]: `{field_name}` is longer than {MAX_NAME_BYTES} bytes"
        )
    return value


def _check_exchange_name(index: int, exchange: str) -> None:
    if len(exchange) > MAX_EXCHANGE_CHARS:
        raise BindingError(
            f"bindings[{index}]: `exchange` is longer than {MAX_EXCHANGE_CHARS} characters"
        )
    if not EXCHANGE_NAME.fullmatch(exchange):
        raise BindingError(
            f"bindings[{index}]: `exchange` may hold only letters, digits, spaces and -_.:@#,/+"
        )


def parse_bindings(raw: str | None, limits: Limits | None = None) -> list[Binding]:
    """Turn the ``bindings`` query parameter into bindings, or raise ``BindingError``."""
    limits = limits or Limits()
    if not raw:
        raise BindingError(MISSING)
    document = _load_json(raw)
    if not isinstance(document, dict) or list(document) != ["bindings"]:
        raise BindingError(ONE_KEY)
    items = document["bindings"]
    if not isinstance(items, list):
        raise BindingError(NOT_ARRAY)
    for item in items:
        if not isinstance(item, dict) or "exchange" not in item or "routingKeyPattern" not in item:
            raise BindingError(NEED_FIELDS)
    if len(items) > limits.max_bindings:
        raise BindingError(
            f"Too many bindings: {len(items)} given, at most {limits.max_bindings} allowed"
        )
    return checked(
        [(item["exchange"], item["routingKeyPattern"]) for item in items],
        limits,
        "routingKeyPattern",
    )


def checked(
    pairs: Sequence[tuple[Any, Any]], limits: Limits, pattern_field: str = "routingKeyPattern"
) -> list[Binding]:
    """(exchange, pattern) pairs as bindings, each checked as the connect endpoint checks
    them (the WebSocket protocols too; ``pattern_field`` is the pattern's name on their
    wire); ``BindingError`` names the first one that fails."""
    result = []
    for index, (raw_exchange, raw_pattern) in enumerate(pairs):
        exchange = _check_name(index, "exchange", raw_exchange, allow_empty=False)
        _check_exchange_name(index, exchange)
        pattern = _check_name(index, pattern_field, raw_pattern, allow_empty=True)
        if not limits.exchange_allowed(exchange):
            raise BindingError(f"bindings[{index}]: exchange `{exchange}` is not allowed")
        result.append(Binding(exchange, pattern))
    # What the patterns cost to keep and to match grows with their words (topic.py).
    words = sum(pattern_words(binding.routing_key_pattern) for binding in set(result))
    if words > limits.max_words:
        raise BindingError(
            f"Too many routing-key words: {words} given in all, at most {limits.max_words} allowed"
        )
    return result
