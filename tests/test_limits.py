"""Limits and hostile input: clear answers, never a 5xx, a crash, a hang or a traceback."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Iterator

import aio_pika
import httpx
import pytest
from browser import Browser
from click.testing import CliRunner
from helpers import EventsServer, SSEReader, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quart_events.cli import main

pytestmark = pytest.mark.broker


LEAKS = ("Traceback", "guest", "localhost", "127.0.0.1", "aiormq", "quart_events", 'File "')


@pytest.fixture(scope="module")
def limited() -> Iterator[EventsServer]:
    with EventsServer.running(
        {"TC_EVENTS_SERVER__MAX_STREAMS": "3", "TC_EVENTS_SERVER__MAX_BINDINGS_PER_STREAM": "5"}
    ) as server:
        yield server


async def test_streams_beyond_the_limit_get_503_with_a_jittered_retry_after(
    limited: EventsServer,
) -> None:
    readers = [SSEReader(limited.url([])) for _ in range(3)]
    for reader in readers:
        await reader.__aenter__()
        await reader.wait_for("ready")
    try:
        retry_after = set()
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(8):
                response = await client.get(limited.url([]))
                assert response.status_code == 503
                assert "Too many streams" in response.text
                retry_after.add(int(response.headers["retry-after"]))
        assert len(retry_after) > 1 and all(r > 0 for r in retry_after)
    finally:
        for reader in readers:
            await reader.close()


async def test_too_many_bindings(limited: EventsServer) -> None:
    bindings = [{"exchange": "exchange/x", "routingKeyPattern": str(i)} for i in range(6)]
    async with SSEReader(limited.url(bindings)) as reader:
        await reader.wait_ended()
    assert reader.data("error") == ["Too many bindings: 6 given, at most 5 allowed"]


@pytest.mark.parametrize(
    ("size", "status"), [(33 * 1024, 414), (40 * 1024, 414), (100 * 1024, 431)]
)
async def test_a_request_line_over_32_kib_is_refused_clearly(
    limited: EventsServer, size: int, status: int
) -> None:
    # A raw request: HTTP clients refuse to send such URLs themselves.
    target = "/api/events/v1/connect/?bindings=" + "a" * size
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert int(answer.split(b" ", 2)[1]) == status
    if status == 414:
        assert answer.endswith(b"Request line too long: at most 32768 bytes.\n")
    assert not any(leak.encode() in answer for leak in LEAKS)


async def test_default_allow_list_refuses_internal_exchanges(server: EventsServer) -> None:
    for name in ("amq.rabbitmq.trace", "amq.rabbitmq.log", "amq.topic", ""):
        async with SSEReader(server.url([{"exchange": name, "routingKeyPattern": "#"}])) as r:
            await r.wait_ended()
        (message,) = r.data("error")
        assert message.startswith("bindings[0]: ")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=20,
)
binding_like = st.fixed_dictionaries(
    {
        "exchange": st.one_of(st.text(max_size=300), json_values),
        "routingKeyPattern": st.one_of(st.text(max_size=300), json_values),
    },
    optional={"routingKeyReference": json_values},
)
bindings_values = st.one_of(
    st.text(max_size=500),
    json_values.map(json.dumps),
    st.lists(binding_like, max_size=8).map(lambda b: json.dumps({"bindings": b})),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    raw=bindings_values,
    extra=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3),
)
def test_the_endpoint_answers_anything_cleanly(
    server: EventsServer, raw: str, extra: dict[str, str]
) -> None:

    query = urllib.parse.urlencode({**extra, "bindings": raw})
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{server.base}/api/events/v1/connect/?{query}") as response,
    ):
        assert response.status_code in (200, 204, 414), response.status_code
        if response.status_code != 200:
            return
        first = b""
        for chunk in response.iter_raw():
            first += chunk
            if b"\n\n" in first:
                break
    frame = first.split(b"\n\n")[0].decode()
    lines = frame.split("\n")
    assert lines[0] in ("event: ready", "event: error") and lines[2] == "id: -", frame
    data = json.loads(lines[1].removeprefix("data: "))
    if lines[0] == "event: error":
        assert isinstance(data, str) and data
        assert not any(leak in data for leak in LEAKS if leak not in raw)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(raw=bindings_values)
def test_check_bindings_answers_anything_cleanly(raw: str) -> None:
    result = CliRunner().invoke(main, ["check-bindings", "--", raw])
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


@pytest.mark.browser
async def test_an_event_source_over_the_limit_comes_back_by_itself_and_gets_in() -> None:
    env = {
        "TC_EVENTS_SERVER__MAX_STREAMS": "1",
        "TC_EVENTS_SERVER__RETRY_MIN_MS": "500",
        "TC_EVENTS_SERVER__RETRY_MAX_MS": "800",
    }
    with EventsServer.running(env) as full:
        async with SSEReader(full.url([])) as holder:
            await holder.wait_for("ready")
            with Browser.following(full.url([])) as browser:
                await browser.wait_for("error", 2)  # turned away twice, and it came back
                assert "ready" not in browser.kinds()
                await holder.close()  # a place frees up
                await browser.wait_for("ready", timeout=10)
                assert browser.reports[-1]["lastEventId"] == "-"


async def test_a_process_holds_a_bounded_number_of_pattern_words(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    """What one process binds is bounded in pattern words (what matching costs, and
    memory): past it, new bindings are turned away like streams over the limit, while
    bindings it holds already are still taken; patterns with an inner `#` have a tighter
    bound, and bindings that could never fit are told why."""
    env = {
        "TC_EVENTS_SERVER__MAX_BINDING_WORDS": "12",
        "TC_EVENTS_SERVER__MAX_INNER_HASH_WORDS": "4",
    }
    name = exchange.name

    def of(*patterns: str) -> list[dict[str, str]]:
        return [{"exchange": name, "routingKeyPattern": p} for p in patterns]

    with EventsServer.running(env) as bounded:
        first = of("a.b.c.d", "a.b.*.#")  # 8 words
        async with SSEReader(bounded.url(first)) as holder:
            await holder.wait_for("ready")
            async with httpx.AsyncClient(timeout=5) as client:
                over = await client.get(bounded.url(of("x.y.z", "x.y")))  # 5 more: 13
                assert over.status_code == 503
                assert over.text == "Too many bindings on this server; retry later.\n"
                assert int(over.headers["retry-after"]) > 0
                as_event_source = await client.get(
                    bounded.url(of("x.y.z", "x.y")), headers={"Accept": "text/event-stream"}
                )
                assert as_event_source.status_code == 200
                assert as_event_source.text.startswith("event: reconnect\n")
                never = await client.get(bounded.url(of("#.a.#.b.c")))  # alone over 4
                assert never.status_code == 200
                assert never.text == (
                    'event: error\ndata: "Too many words in patterns with a `#` before their '
                    'last word: 5 given, at most 4 allowed"\nid: -\n\n'
                )
            async with SSEReader(bounded.url(first)) as same:  # held already: no more words
                await same.wait_for("ready")
            async with SSEReader(bounded.url(of("x.y", "#.q"))) as fits:  # 2 + 2: 12
                await fits.wait_for("ready")
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="p.q")
                message = (await fits.wait_for("message"))[0]
                assert json.loads(message.data)["routingKey"] == "p.q"
        # Once the streams are gone (the server has seen them go, and unbound), their
        # words are free again.
        await wait_until(lambda: bounded.stats()["streams"] == 0, timeout=20)
        await wait_until(lambda: bounded.stats()["bindings"] == 0, timeout=20)
        async with SSEReader(bounded.url(of("x.y.z", "x.y", "k.l.m.n"))) as later:
            await later.wait_for("ready")
