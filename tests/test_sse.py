"""SSE framing, byte for byte."""

from __future__ import annotations

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
    frame = sse.message({"a": "x\ny", "b": "é"}, "exchange/e", "k.1", False, ["r"])
    assert (
        frame
        == (
            'event: message\ndata: {"payload":{"a":"x\\ny","b":"é"},"exchange":"exchange/e",'
            '"routingKey":"k.1","redelivered":false,"routes":["r"]}\nid: -\n\n'
        ).encode()
    )


@pytest.mark.parametrize("text", ["\u2028\u2029", "\r", "\x00", "\ud800"])
def test_data_never_breaks_the_frame(text: str) -> None:
    frame = sse.message(text, "e", "k", False, [])
    body = frame.decode("utf-8")
    assert body.count("\n") == 4 and "\r" not in body


def test_goodbye_empties_the_id_and_sets_retry() -> None:
    assert sse.goodbye(2500) == b"id:\nretry: 2500\n\n"
