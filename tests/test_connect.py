"""The wire contract, end to end: a real server process, the real broker, an httpx-sse client."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import urllib.parse
import uuid
from datetime import UTC, datetime

import aio_pika
import httpx
import pytest
from helpers import EventsServer, SSEReader, publish, taskcluster_style_target, wait_until

pytestmark = pytest.mark.broker


async def test_headers_are_sent_before_any_event(server: EventsServer) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        async with client.stream("GET", server.url([])) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    "path",
    [
        "/api/events/v1/connect/",
        "/api/events/v1/connect",
        "/events/v1/connect/",
        "/events/v1/connect",
    ],
)
async def test_both_paths_with_and_without_slash_become_ready(
    server: EventsServer, path: str
) -> None:
    async with SSEReader(server.url([], path=path) + "&cachebust=123") as reader:
        assert await reader.wait_for("ready") and reader.data("ready") == [{}]


async def test_ready_frame_is_byte_exact(server: EventsServer) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        async with client.stream("GET", server.url([])) as response:
            received = b""
            async for chunk in response.aiter_raw():
                received += chunk
                if b"\n\n" in received:
                    break
    assert received.startswith(b"event: ready\ndata: {}\nid: -\n\n")


async def test_message_shape(server: EventsServer, exchange: aio_pika.abc.AbstractExchange) -> None:
    bindings = [{"exchange": exchange.name, "routingKeyPattern": "primary.*.#"}]
    async with SSEReader(server.url(bindings)) as reader:
        await reader.wait_for("ready")
        payload = {"status": {"taskId": "abc", "runs": [1, 2]}, "text": "two\nlines é"}
        await publish(
            exchange,
            "primary.abc.x.y",
            json.dumps(payload, indent=2).encode(),
            headers={"CC": ["route.index.project.foo", "other.bar", "route.notify.x"]},
        )
        await publish(exchange, "secondary.abc", b'{"skipped": true}')  # does not match
        await publish(exchange, "primary.def", b"[1,2,3]")  # no CC header
        events = await reader.wait_for("message", 2)
    first, second = (json.loads(event.data) for event in events)
    assert first == {
        "payload": payload,
        "exchange": exchange.name,
        "routingKey": "primary.abc.x.y",
        "redelivered": False,
        "routes": ["index.project.foo", "notify.x"],
    }
    assert list(first) == ["payload", "exchange", "routingKey", "redelivered", "routes"]
    assert "\n" not in events[0].data
    assert second["payload"] == [1, 2, 3] and second["routes"] == []
    assert all(event.id == "-" for event in reader.events)


async def test_pings_follow_at_the_configured_interval(server: EventsServer) -> None:
    # The test profile pings every second.
    async with SSEReader(server.url([])) as reader:
        pings = await reader.wait_for("ping", 5, timeout=20)
    stamps = []
    for ping in pings:
        stamp = json.loads(ping.data)["time"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
        stamps.append(datetime.fromisoformat(stamp.replace("Z", "+00:00")))
        age = datetime.now(UTC) - stamps[-1]
        assert abs(age.total_seconds()) < 10
    # The interval itself, by the server's own stamps: the median gap of four is the
    # configured second (not 0.1 s, not 2.4 s), whatever one late tick did.
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(stamps)]
    assert 0.5 <= statistics.median(gaps) <= 1.9, gaps


async def test_a_message_matching_two_bindings_arrives_once(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    bindings = [
        {"exchange": exchange.name, "routingKeyPattern": "a.#"},
        {"exchange": exchange.name, "routingKeyPattern": "*.b"},
        {"exchange": exchange.name, "routingKeyPattern": "a.b"},
    ]
    async with SSEReader(server.url(bindings)) as reader:
        await reader.wait_for("ready")
        await publish(exchange, "a.b", b'{"n": 1}')
        await publish(exchange, "a.c", b'{"n": 2}')
        await reader.wait_for("message", 2)
        await asyncio.sleep(0.3)
    assert [m["payload"]["n"] for m in reader.data("message")] == [1, 2]


async def test_streams_sharing_a_binding_each_get_the_message(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    bindings = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
    readers = [SSEReader(server.url(bindings)) for _ in range(5)]
    for reader in readers:
        await reader.__aenter__()
    try:
        for reader in readers:
            await reader.wait_for("ready")
        assert server.broker_bindings() == [(exchange.name, "#")]
        await publish(exchange, "x", b'"hello"')
        for reader in readers:
            await reader.wait_for("message")
            assert [m["payload"] for m in reader.data("message")] == ["hello"]
    finally:
        for reader in readers:
            await reader.close()
    await wait_until(lambda: not server.broker_bindings(), timeout=15, interval=0.5)


async def test_messages_published_before_ready_elsewhere_do_not_leak_to_other_exchanges(
    server: EventsServer,
    amqp: aio_pika.abc.AbstractChannel,
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    other = await amqp.declare_exchange(f"exchange/test/{uuid.uuid4().hex[:12]}", "topic")
    try:
        async with (
            SSEReader(server.url([{"exchange": exchange.name, "routingKeyPattern": "#"}])) as a,
            SSEReader(server.url([{"exchange": other.name, "routingKeyPattern": "#"}])) as b,
        ):
            await a.wait_for("ready")
            await b.wait_for("ready")
            await publish(exchange, "k", b"1")
            await publish(other, "k", b"2")
            await a.wait_for("message")
            await b.wait_for("message")
            await asyncio.sleep(0.2)
        assert [m["payload"] for m in a.data("message")] == [1]
        assert [m["payload"] for m in b.data("message")] == [2]
    finally:
        await other.delete()


async def test_a_body_that_is_not_json_arrives_as_text(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    async with SSEReader(server.url([{"exchange": exchange.name, "routingKeyPattern": "#"}])) as r:
        await r.wait_for("ready")
        await publish(exchange, "k", b"not json \xff\nline")
        (message,) = await r.wait_for("message")
    assert json.loads(message.data)["payload"] == "not json \ufffd\nline"
    assert server.stats()["non_json"] >= 1  # and counted


BAD_INPUTS = [
    (None, "The `bindings` query parameter is required."),
    ("", "The `bindings` query parameter is required."),
    ("{not json", "The `bindings` query parameter is not valid JSON."),
    ('{"bindings": [], "foo": "bar"}', "The json query should have only one key i.e. `bindings`."),
    ("[1, 2]", "The json query should have only one key i.e. `bindings`."),
    (
        '{"bindings": {"exchange": "e", "routingKeyPattern": "#"}}',
        "Bindings must be an array of {exchange, routingKeyPattern}",
    ),
    (
        '{"bindings": [{"exchange": "e"}]}',
        "Binding must include `exchange` and `routingKeyPattern` fields",
    ),
    (
        '{"bindings": [{"exchange": "e", "routingKeyPattern": 5}]}',
        "bindings[0]: `routingKeyPattern` must be a string",
    ),
    (
        '{"bindings": [{"exchange": "amq.rabbitmq.trace", "routingKeyPattern": "#"}]}',
        "bindings[0]: exchange `amq.rabbitmq.trace` is not allowed",
    ),
]


@pytest.mark.parametrize(("raw", "message"), BAD_INPUTS)
async def test_bad_input_gets_one_error_event_and_the_stream_ends(
    server: EventsServer, raw: str | None, message: str
) -> None:
    url = f"{server.base}/api/events/v1/connect/"
    if raw is not None:
        url += "?" + urllib.parse.urlencode({"bindings": raw})
    async with SSEReader(url) as reader:
        await reader.wait_ended()
    assert reader.response is not None and reader.response.status_code == 200
    assert [(e.event, json.loads(e.data)) for e in reader.events] == [("error", message)]


@pytest.mark.parametrize("with_bindings", [True, False])
async def test_last_event_id_gets_204(server: EventsServer, with_bindings: bool) -> None:
    url = server.url([]) if with_bindings else f"{server.base}/api/events/v1/connect/"
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url, headers={"Last-Event-ID": "-"})
    assert response.status_code == 204 and response.content == b""


async def test_missing_exchange_ends_only_that_stream(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    good = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
    missing = f"exchange/test/missing-{uuid.uuid4().hex[:8]}"
    async with SSEReader(server.url(good)) as healthy:
        await healthy.wait_for("ready")
        async with SSEReader(
            server.url([*good, {"exchange": missing, "routingKeyPattern": "#"}])
        ) as bad:
            await bad.wait_ended()
        assert [e.event for e in bad.events] == ["error"]
        assert json.loads(bad.events[0].data) == f"exchange `{missing}` does not exist"
        await publish(exchange, "still.works", b"{}")
        (message,) = await healthy.wait_for("message")
        assert json.loads(message.data)["routingKey"] == "still.works"
        assert not healthy.ended.is_set()
        # A new stream on the good exchange still becomes ready (the bind channel was reopened).
        async with SSEReader(
            server.url([{"exchange": exchange.name, "routingKeyPattern": "x.*"}])
        ) as r:
            await r.wait_for("ready")


async def test_errors_reveal_nothing_internal(server: EventsServer) -> None:
    missing = [{"exchange": "exchange/test/none", "routingKeyPattern": "#"}]
    async with SSEReader(server.url(missing)) as reader:
        await reader.wait_ended()
    text = " ".join(e.data for e in reader.events)
    for secret in ("guest", "Traceback", "127.0.0.1", "localhost", "aiormq", "NOT_FOUND"):
        assert secret not in text


async def test_clients_leaving_before_ready_leave_no_binding(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    async def open_and_drop(n: int) -> None:
        bindings = [{"exchange": exchange.name, "routingKeyPattern": f"k{n}.#"}]
        async with httpx.AsyncClient(timeout=5) as client:
            async with client.stream("GET", server.url(bindings)) as response:
                assert response.status_code == 200  # headers only: the binds are in flight

    await asyncio.gather(*(open_and_drop(n) for n in range(30)))
    await wait_until(lambda: not server.broker_bindings(), timeout=20, interval=0.5)


async def test_no_binding_is_left_after_streams_close(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    patterns = ["a.*", "b.#", "#"]
    readers = [
        SSEReader(
            server.url(
                [{"exchange": exchange.name, "routingKeyPattern": p} for p in patterns[: i + 1]]
            )
        )
        for i in range(3)
    ]
    for reader in readers:
        await reader.__aenter__()
        await reader.wait_for("ready")
    assert server.broker_bindings() == sorted((exchange.name, p) for p in patterns)
    await readers[2].close()
    await wait_until(
        lambda: server.broker_bindings() == sorted((exchange.name, p) for p in patterns[:2]),
        15,
        0.5,
    )
    for reader in readers[:2]:
        await reader.close()
    await wait_until(lambda: not server.broker_bindings(), timeout=15, interval=0.5)


async def test_a_32_kib_request_line_is_served(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    # "GET " + target + " HTTP/1.1" is 32 KiB.
    url = server.base + taskcluster_style_target(exchange.name, 32 * 1024 - len("GET  HTTP/1.1"))
    async with SSEReader(url) as reader:
        await reader.wait_for("ready")
        await publish(exchange, "p25.z", b"{}")
        await reader.wait_for("message")


async def test_empty_bindings_only_ping(server: EventsServer) -> None:
    async with SSEReader(server.url([])) as reader:
        await reader.wait_for("ping", 1, timeout=5)
    assert {e.event for e in reader.events} == {"ready", "ping"}
    assert reader.events[0].event == "ready"


async def test_taskcluster_client_bindings_match_taskcluster_routing_keys(
    server: EventsServer, amqp: aio_pika.abc.AbstractChannel
) -> None:

    import taskcluster

    prefix = f"exchange/test-{uuid.uuid4().hex[:8]}/taskcluster-queue/v1/"
    events = taskcluster.QueueEvents(
        {"rootUrl": "https://tc.example.com", "exchangePrefix": prefix}
    )
    binding = events.taskCompleted({"taskId": "fN1kYkcFQXKUBy2dSlZ4XA"})
    binding["routingKeyReference"] = [
        {"name": "taskId", "multipleWords": False}
    ]  # as the JS client
    exchange = await amqp.declare_exchange(binding["exchange"], aio_pika.ExchangeType.TOPIC)
    try:
        async with SSEReader(server.url([binding])) as reader:
            await reader.wait_for("ready")
            tail = "0.wg.wid.proj-prov.wt.sched.groupid._"
            await publish(exchange, f"primary.OTHERtaskIdAAAAAAAAAAA.{tail}", b'{"n": 0}')
            await publish(exchange, f"primary.fN1kYkcFQXKUBy2dSlZ4XA.{tail}", b'{"n": 1}')
            (message,) = await reader.wait_for("message")
        data = json.loads(message.data)
        assert data["payload"] == {"n": 1}
        assert data["exchange"] == f"{prefix}task-completed"
    finally:
        await exchange.delete()


async def test_route_bindings_get_messages_by_their_cc_routes_as_taskcluster_publishes(
    server: EventsServer, amqp: aio_pika.abc.AbstractChannel
) -> None:
    """Taskcluster publishes a task's routes as ``CC: ["route.<route>", ...]`` on the same
    exchange; clients bind ``route.index.#`` and the like (here through the client library)."""
    import taskcluster

    prefix = f"exchange/test-{uuid.uuid4().hex[:8]}/taskcluster-queue/v1/"
    events = taskcluster.QueueEvents(
        {"rootUrl": "https://tc.example.com", "exchangePrefix": prefix}
    )
    by_route = events.taskCompleted("route.index.project.foo.#")
    by_task = events.taskCompleted({"taskId": "fN1kYkcFQXKUBy2dSlZ4XA"})
    exchange = await amqp.declare_exchange(by_route["exchange"], aio_pika.ExchangeType.TOPIC)
    primary = "primary.fN1kYkcFQXKUBy2dSlZ4XA.0.wg.wid.proj-prov.wt.sched.groupid._"
    cc = ["route.index.project.foo.bar", "route.index.project.foo.latest", "route.notify.x"]
    try:
        async with (
            SSEReader(server.url([by_route])) as routes,
            SSEReader(server.url([by_route, by_task])) as both,
            SSEReader(server.url([by_task])) as task,
        ):
            for reader in (routes, both, task):
                await reader.wait_for("ready")
            await publish(exchange, primary, b'{"n": 1}', headers={"CC": cc})
            await publish(exchange, "primary.other.x", b'{"n": 2}', headers={"CC": ["route.x"]})
            await publish(exchange, "primary.other.y", b'{"n": 3}', headers={"CC": cc[1:2]})
            await routes.wait_for("message", 2)
            await both.wait_for("message", 2)
            await task.wait_for("message")
            await asyncio.sleep(0.3)
        first = routes.data("message")[0]
        assert first["routingKey"] == primary  # the primary key, as the original sent it
        assert first["routes"] == ["index.project.foo.bar", "index.project.foo.latest", "notify.x"]
        assert [m["payload"]["n"] for m in routes.data("message")] == [1, 3]
        assert [m["payload"]["n"] for m in both.data("message")] == [1, 3]  # once each
        assert [m["payload"]["n"] for m in task.data("message")] == [1]
    finally:
        await exchange.delete()


async def test_a_message_larger_than_the_buffer_reaches_a_client_that_keeps_up(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    with EventsServer.running({"TC_EVENTS_SERVER__BUFFER_BYTES": "65536"}) as small:
        bindings = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
        async with SSEReader(small.url(bindings)) as reader:
            await reader.wait_for("ready")
            large = json.dumps({"pad": "x" * 200_000}).encode()
            await publish(exchange, "large", large)
            await publish(exchange, "small", b'"after"')
            await reader.wait_for("message", 2)
        assert [m["routingKey"] for m in reader.data("message")] == ["large", "small"]
        assert not reader.named("error")
