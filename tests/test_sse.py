"""SSE framing, byte for byte."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from quart_events import sse


def test_ready() -> None:
    assert sse.READY == b"event: ready\ndata: {}\nid: -\n\n"


def test_ping_is_iso_8601_utc_with_milliseconds() -> None:
    moment = datetime(2026, 11, 27, 10, 4, 5, 678_900, tzinfo=UTC)
    assert sse.ping(moment) == b'event: ping\ndata: {"time":"2026-11-27T10:04:05.678Z"}\nid: -\n\n'
    other_zone = moment.astimezone(timezone(timedelta(hours=2)))
    assert sse.ping(other_zone) == sse.ping(moment)


def test_error_data_is_a_json_string() -> None:
    assert sse.error('bad "input"\nhere') == (
        b'event: error\ndata: "bad \\"input\\"\\nhere"\nid: -\n\n'
    )


def test_message_is_one_line_in_contract_order() -> None:
    frame, is_json = sse.message(
        b'{"a": "x\\ny", "b": "\xc3\xa9"}', "exchange/e", "k.1", False, ["route.r", "other"]
    )
    assert is_json
    assert (
        frame
        == (
            'event: message\ndata: {"payload":{"a": "x\\ny", "b": "é"},"exchange":"exchange/e",'
            '"routingKey":"k.1","redelivered":false,"routes":["r"]}\nid: -\n\n'
        ).encode()
    )


@pytest.mark.parametrize(
    "body",
    [
        "\u2028\u2029".encode(),
        b"\r",
        b"\x00",
        b"\xed\xa0\x80",  # a lone surrogate, as UTF-8 would write it
        b'{"a":\r\n  [1,\n 2]\n}',  # JSON spread over lines
        b'"\\ud800"',  # JSON naming a lone surrogate
    ],
)
def test_data_is_always_one_line_of_json(body: bytes) -> None:
    frame, _ = sse.message(body, "e", "k", False, [])
    text = frame.decode("utf-8")
    assert text.count("\n") == 4 and "\r" not in text
    json.loads(text.split("\n")[1].removeprefix("data: "))


@pytest.mark.parametrize(
    ("body", "payload", "is_json"),
    [
        (b'{"n": 1e400}', {"n": math.inf}, True),  # valid JSON, passed on as written
        (b'{"n": NaN}', '{"n": NaN}', False),  # not JSON: its text
        (b"[Infinity, -Infinity]", "[Infinity, -Infinity]", False),
        (b"[" * 100_000 + b"]" * 100_000, "[" * 100_000 + "]" * 100_000, False),
        (b"not json \xff", "not json \ufffd", False),
        (b"", "", False),
    ],
)
def test_every_body_gives_strict_json_data(body: bytes, payload: object, is_json: bool) -> None:
    frame, was_json = sse.message(body, "e", "k", False, [])
    data = frame.split(b"\n")[1].removeprefix(b"data: ").decode()

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} on the wire")

    assert json.loads(data, parse_constant=refuse)["payload"] == payload
    assert was_json is is_json


def test_deep_json_that_parses_is_framed_as_it_is() -> None:
    body = b"[" * 900 + b"]" * 900  # parses; re-encoding it once failed with RecursionError
    frame, is_json = sse.message(body, "e", "k", False, [])
    assert is_json and b'data: {"payload":' + body + b"," in frame


def test_goodbye_empties_the_id_and_sets_retry() -> None:
    assert sse.goodbye(2500) == b"event: reconnect\ndata: {}\nid:\nretry: 2500\n\n"
