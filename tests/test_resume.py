"""Resumable streams (``resume=true``), end to end: real server processes sharing one
history (a RabbitMQ stream queue), the real broker, an independent SSE client."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import httpx
import pytest
from helpers import AMQP_URL, EventsServer, SSEReader, connect_target, publish

pytestmark = pytest.mark.broker

KEPT = {"TC_EVENTS_HISTORY__EXCHANGES": '["exchange/test/*"]'}


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    """A namespace of its own, and its history (durable queues) deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (f"queue/{name}/events/history", f"queue/{name}/events/history-feed"):
            await channel.queue_delete(queue)


@pytest.fixture
def kept_server(namespace: str) -> Iterator[EventsServer]:
    server = EventsServer.start(KEPT, namespace=namespace)
    try:
        yield server
    finally:
        server.stop()


def resume_url(server: EventsServer, bindings: list[dict[str, str]], extra: str = "") -> str:
    return f"{server.base}{connect_target(bindings)}&resume=true{extra}"


def bound(exchange: str, pattern: str) -> dict[str, str]:
    return {"exchange": exchange, "routingKeyPattern": pattern}


def messages(reader: SSEReader) -> list[tuple[int, Any, list[str]]]:
    """(position, payload, routes) of each message event."""
    return [
        (int(event.id), json.loads(event.data)["payload"], json.loads(event.data)["routes"])
        for event in reader.named("message")
    ]


async def test_a_stream_resumes_from_its_last_event_id_without_gap_or_duplicate(
    kept_server: EventsServer, exchange_name: str
) -> None:
    """Messages published while the client was away come after ``ready``, in order,
    once, route bindings (``CC``) included, then the live ones; positions go up."""
    bindings = [bound(exchange_name, "primary.#"), bound(exchange_name, "route.index.#")]
    url = resume_url(kept_server, bindings)
    cc = {"CC": ["route.index.project.x"]}
    async with SSEReader(url) as first:
        await first.wait_for("ready")
        await publish(exchange_name, "primary.a", b'{"n": 1}')
        await publish(exchange_name, "other", b'{"n": 2}', headers=cc)
        await publish(exchange_name, "unmatched", b'{"n": 0}')
        await first.wait_for("message", 2)
    heard = messages(first)
    assert [(payload, routes) for _, payload, routes in heard] == [
        ({"n": 1}, []),
        ({"n": 2}, ["index.project.x"]),
    ]
    last = heard[0][0]  # as if it had missed the second
    await publish(exchange_name, "primary.b", b'{"n": 3}')
    await publish(exchange_name, "primary.both", b'{"n": 4}', headers=cc)  # matches twice
    async with SSEReader(url, headers={"Last-Event-ID": str(last)}) as again:
        await again.wait_for("ready")
        await again.wait_for("message", 3)
        await publish(exchange_name, "primary.c", b'{"n": 5}')
        await again.wait_for("message", 4)
    resumed = messages(again)
    assert [payload for _, payload, _ in resumed] == [{"n": n} for n in (2, 3, 4, 5)]
    assert resumed[0][2] == ["index.project.x"] and resumed[2][2] == ["index.project.x"]
    positions = [position for position, _, _ in resumed]
    assert positions == sorted(set(positions)) and positions[0] > last
    assert positions[0] == heard[1][0]  # the same position on every read
    assert not again.named("gap")


async def test_positions_are_valid_on_another_instance(
    kept_server: EventsServer, namespace: str, exchange_name: str
) -> None:
    """A stream that resumes on another server of the deployment (the same history)
    gets what it missed: ``since=`` on a first request there."""
    url = resume_url(kept_server, [bound(exchange_name, "#")])
    async with SSEReader(url) as first:
        await first.wait_for("ready")
        await publish(exchange_name, "k", b'"before"')
        await first.wait_for("message")
    position = messages(first)[0][0]
    await publish(exchange_name, "k", b'"missed"')
    other = EventsServer.start(KEPT, namespace=namespace)
    try:
        since = f"&since={position}"
        async with SSEReader(resume_url(other, [bound(exchange_name, "#")], since)) as there:
            await there.wait_for("message")
            assert [payload for _, payload, _ in messages(there)] == ["missed"]
    finally:
        other.stop()


async def test_only_messages_carry_ids(kept_server: EventsServer, exchange_name: str) -> None:
    """``ready`` and pings have no ``id:`` line: the browser's last id stays the last
    message's (a ping would otherwise reset it)."""
    url = resume_url(kept_server, [bound(exchange_name, "#")])
    async with httpx.AsyncClient(timeout=10) as client, client.stream("GET", url) as response:
        chunks = response.aiter_text()
        text = ""
        while "event: ready" not in text or "event: ping" not in text:
            text += await anext(chunks)
        await publish(exchange_name, "k", b"{}")
        while "event: message" not in text:
            text += await anext(chunks)
    frames = [frame for frame in text.split("\n\n") if frame.strip()]
    for frame in frames:
        has_id = "\nid:" in frame
        assert has_id == frame.startswith("event: message"), frame


@pytest.mark.parametrize(
    ("extra", "headers", "message"),
    [
        ("&since=abc", {}, "`since` must be a position: a whole number from a message's id"),
        ("", {"Last-Event-ID": "12x"}, "Last-Event-ID must be a position"),
    ],
)
async def test_a_position_that_is_not_a_number_gets_a_clear_error(
    kept_server: EventsServer,
    exchange_name: str,
    extra: str,
    headers: dict[str, str],
    message: str,
) -> None:
    async with SSEReader(resume_url(kept_server, [bound(exchange_name, "#")], extra), headers) as r:
        await r.wait_ended()
    assert [event.event for event in r.events] == ["error"]
    assert r.data("error")[0].startswith(message)


async def test_an_exchange_without_history_gets_an_error_naming_it(
    kept_server: EventsServer, exchange_name: str
) -> None:
    other = "exchange/other/" + uuid.uuid4().hex[:8]
    url = resume_url(kept_server, [bound(exchange_name, "#"), bound(other, "#")])
    async with SSEReader(url) as reader:
        await reader.wait_ended()
    assert reader.data("error") == [f"No history is kept for exchange `{other}`"]


async def test_without_history_resume_is_refused_and_other_streams_are_as_before(
    server: EventsServer, exchange_name: str
) -> None:
    async with SSEReader(resume_url(server, [bound(exchange_name, "#")])) as reader:
        await reader.wait_ended()
    assert reader.data("error") == ["This server keeps no history: `resume=true` is not available"]
    # A stream without resume=true still gets 204 for any Last-Event-ID.
    plain = f"{server.base}{connect_target([])}"
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(plain, headers={"Last-Event-ID": "5"})
    assert response.status_code == 204


async def test_a_resumable_stream_after_its_error_gets_204(
    kept_server: EventsServer, exchange_name: str
) -> None:
    """An error ends a stream with id ``-``: the EventSource's reconnect sends that and
    is stopped with 204, instead of resuming into the same error."""
    url = resume_url(kept_server, [bound(exchange_name, "#")])
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url, headers={"Last-Event-ID": "-"})
    assert response.status_code == 204
