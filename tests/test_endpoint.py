"""The SSE endpoint in process: ASGI ``send``/``receive`` driven by the test, a
recording binder for the broker (admission, headers and refusals need no broker;
what RabbitMQ does is checked end to end in test_connect.py)."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from binder import RecordingBinder, settle
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, HTTPScope, Scope

from quart_events import sse
from quart_events.connect import ConnectEndpoint
from quart_events.history import History
from quart_events.hub import Hub
from quart_events.metrics import Counts, Metrics
from quart_events.settings import load_settings
from quart_events.shared_bindings import SharedBindings
from quart_events.subscribers import Subscribers


def query(*bindings: dict[str, str]) -> str:
    return "bindings=" + urllib.parse.quote(json.dumps({"bindings": list(bindings)}))


BOUND = query({"exchange": "exchange/a", "routingKeyPattern": "#"})
NONE = query()


@dataclass
class Exchange:
    """One request: what the endpoint sent, and the client's side of ``receive``."""

    sent: list[dict[str, Any]] = field(default_factory=list)
    inbox: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    stall: asyncio.Event | None = None  # set: each send, once recorded, waits for it

    async def send(self, message: ASGISendEvent) -> None:
        self.sent.append(dict(message))
        if self.stall is not None:
            await self.stall.wait()

    async def receive(self) -> ASGIReceiveEvent:
        return cast(ASGIReceiveEvent, await self.inbox.get())

    def leave(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    @property
    def complete(self) -> bool:
        return bool(self.sent) and self.sent[-1].get("more_body") is False


@dataclass
class Served:
    endpoint: ConnectEndpoint
    hub: Hub
    binder: RecordingBinder

    def request(
        self,
        query: str = "",
        method: str = "GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        path: str = "/api/events/v1/connect/",
    ) -> Exchange:
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": headers or [],
            "client": ("127.0.0.1", 1),
        }
        exchange = Exchange()
        exchange.task = asyncio.ensure_future(
            self.endpoint(cast(HTTPScope, scope), exchange.receive, exchange.send)
        )
        return exchange


async def not_found(scope: Scope, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def serve(**server: Any) -> Served:
    settings = load_settings("test", overrides={"server": server})
    binder = RecordingBinder()
    shared = SharedBindings(binder)
    metrics, counts = Metrics(), Counts()
    hub = Hub(settings.server, shared, settings.pulse, metrics, counts)
    shared.attach(hub)
    shared.start()
    subscribers = Subscribers(hub, settings.server, metrics)
    history = History(settings.pulse, settings.history)  # none kept: never connects
    endpoint = ConnectEndpoint(not_found, subscribers, settings.server, counts, history)
    return Served(endpoint, hub, binder)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    served = serve()
    yield served
    await served.hub.shared.stop()


async def finished(exchange: Exchange) -> None:
    assert exchange.task is not None
    await asyncio.wait_for(exchange.task, 5)


async def test_the_headers_go_out_alone_before_any_event(served: Served) -> None:
    """While the bind is in flight the client has the headers and nothing else: an
    EventSource's ``open`` fires before ``ready``, not with it."""
    served.binder.release.clear()
    stream = served.request(BOUND)
    await settle()
    assert [m["type"] for m in stream.sent] == ["http.response.start"]
    assert stream.status == 200 and stream.headers[b"content-type"] == b"text/event-stream"
    served.binder.release.set()
    await settle()
    assert stream.body == sse.READY and not stream.complete
    stream.leave()
    await finished(stream)
    await settle()
    assert served.hub.stats()["streams"] == 0 and served.binder.bound == set()


async def test_other_methods_get_405_with_allow(served: Served) -> None:
    answer = served.request(BOUND, method="POST")
    await finished(answer)
    assert answer.status == 405 and answer.headers[b"allow"] == b"GET"
    assert answer.body == b"Only GET is served here.\n"
    assert served.hub.stats()["streams"] == 0


async def test_a_configured_cors_origin_is_on_every_answer() -> None:
    served = serve(cors_allow_origin="https://ui.example", max_streams=1)
    origin = b"https://ui.example"
    stream = served.request(NONE)
    refused = served.request(NONE)  # over the limit
    wrong = served.request(NONE, method="PUT")
    reconnect = served.request(NONE, headers=[(b"last-event-id", b"-")])
    for answer in (refused, wrong, reconnect):
        await finished(answer)
    await settle()
    for answer in (stream, refused, wrong, reconnect):
        assert answer.headers[b"access-control-allow-origin"] == origin
    assert (refused.status, wrong.status, reconnect.status) == (503, 405, 204)
    stream.leave()
    await finished(stream)
    await served.hub.shared.stop()


async def test_over_the_limit_the_delay_is_jittered_inside_the_retry_window() -> None:
    """An EventSource gets a stream that ends with ``retry:`` in the window; other
    clients a 503 whose ``Retry-After`` (seconds, rounded up) is in it too."""
    served = serve(max_streams=1, retry_min_ms=2_000, retry_max_ms=4_000)
    held = served.request(NONE)
    await settle()
    retries, retry_afters = set(), set()
    for _ in range(40):
        browser = served.request(NONE, headers=[(b"accept", b"text/event-stream")])
        other = served.request(NONE)
        await finished(browser)
        await finished(other)
        assert browser.status == 200 and browser.body.startswith(b"event: reconnect\n")
        retries.add(int(browser.body.split(b"retry: ")[1]))
        assert other.status == 503
        assert other.body == b"Too many streams on this server; retry later.\n"
        retry_afters.add(int(other.headers[b"retry-after"]))
    assert all(2_000 <= retry <= 4_000 for retry in retries) and len(retries) > 1
    assert retry_afters <= {2, 3, 4} and len(retry_afters) > 1
    held.leave()
    await finished(held)
    await served.hub.shared.stop()


async def test_a_stream_asked_for_while_shutting_down_is_sent_elsewhere_at_once(
    served: Served,
) -> None:
    open_before = served.request(NONE)
    await settle()
    served.hub.begin_shutdown()
    during = served.request(BOUND)
    await finished(during)
    await finished(open_before)  # its response ended with the same frame
    for stream in (open_before, during):
        assert stream.body.endswith(b"\n\n") and b"event: reconnect\ndata: {}\nid:\nretry: " in (
            stream.body
        )
    assert served.binder.calls == []  # nothing was bound for the late one
    assert served.hub.stats()["streams"] == 0


async def test_bad_input_and_long_request_lines_are_answered_without_a_stream(
    served: Served,
) -> None:
    bad = served.request("bindings=nope")
    long = served.request("bindings=" + "x" * 70_000)
    await finished(bad)
    await finished(long)
    assert bad.status == 200 and bad.body.startswith(b"event: error\ndata: ")
    data = json.loads(bad.body.split(b"data: ")[1].split(b"\n")[0])
    assert data == "The `bindings` query parameter is not valid JSON."
    assert long.status == 414 and long.body.startswith(b"Request line too long")
    assert served.hub.stats()["streams"] == 0


async def test_a_reader_that_falls_behind_gets_the_error_and_the_response_ends() -> None:
    """The writer's ``send`` never returns (the client takes nothing): past the bound
    the outbox ends with the too-slowly error, and a stuck write is given up."""
    served = serve(buffer_messages=5, write_timeout=0.05)
    stream = served.request(NONE)
    await settle()
    stream.stall = asyncio.Event()  # never set: the client takes nothing more
    await served.hub.ping_streams()  # its write hangs now
    for _ in range(6):
        await served.hub.ping_streams()
    (subscriber,) = served.hub.subscribers
    assert subscriber.outbox.finished and subscriber.outbox.end_reason == "too_slow"
    await asyncio.sleep(0.1)
    served.hub.drop_stuck_streams()
    await finished(stream)
    assert served.hub.stats()["streams"] == 0 and served.hub.stats()["held_bytes"] == 0
    await served.hub.shared.stop()
