"""Behind a real nginx (Debian's package), configured with the file in docs/deploying.md.

The configuration is read from the document and only its ports (a server line per
instance), its access log's place and, for one test, its read timeout are changed, so
the document cannot drift from what is tested.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest
import websockets
from browser import Browser, Inspector, driven_chromium
from helpers import (
    EventsServer,
    NodeClient,
    SSEReader,
    connect_target,
    free_port,
    npm_modules,
    publish,
    taskcluster_style_target,
    wait_until,
)
from nginx_proxy import nginx

pytestmark = pytest.mark.broker


async def test_headers_through_nginx_are_as_direct(server: EventsServer) -> None:
    with nginx(server.port) as proxied:
        async with httpx.AsyncClient(timeout=5) as client:
            heads = []
            for base in (server.base, proxied):
                async with client.stream("GET", base + connect_target([])) as response:
                    assert response.status_code == 200
                    heads.append(
                        {
                            name: response.headers.get(name)
                            for name in (
                                "content-type",
                                "cache-control",
                                "x-accel-buffering",
                                "access-control-allow-origin",
                            )
                        }
                    )
    direct, through = heads
    assert through == direct and direct["x-accel-buffering"] == "no"


async def test_a_message_arrives_at_once_with_nginx_buffering_at_its_default(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    binding = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
    with nginx(server.port) as proxied:
        async with SSEReader(proxied + connect_target(binding)) as reader:
            await reader.wait_for("ready")
            delays = []
            for n in range(5):
                sent = time.monotonic()
                await publish(exchange, "k", json.dumps({"n": n}).encode())
                await reader.wait_for("message", n + 1, timeout=5)
                delays.append(time.monotonic() - sent)
            # A buffered stream holds small messages until nginx's buffer fills (8 KiB:
            # never, for these five) or the response ends: each came on the open stream.
            assert not reader.ended.is_set()
    print(f"delays through nginx: {delays}")  # figures belong in bench/: shown only


async def test_a_stream_outlives_nginx_read_timeout_because_pings_come_more_often(
    server: EventsServer,
) -> None:
    # The test profile pings every second; nginx gives up on a silent upstream after 2 s.
    with nginx(server.port, read_timeout="2s") as proxied:
        async with SSEReader(proxied + connect_target([])) as reader:
            await reader.wait_for("ready")
            await asyncio.sleep(5)
            assert not reader.ended.is_set() and len(reader.named("ping")) >= 4


async def test_a_32_kib_request_line_passes_through_nginx(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    target = taskcluster_style_target(exchange.name, 32 * 1024 - len("GET  HTTP/1.1"))
    with nginx(server.port) as proxied:
        async with SSEReader(proxied + target) as reader:
            await reader.wait_for("ready")
            await publish(exchange, "p3.x", b"{}")
            await reader.wait_for("message")


@pytest.mark.browser
async def test_sigterm_reaches_the_browser_through_nginx_as_the_reconnect_frame(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    port = free_port()
    # The browser comes back after 4 to 5 s: the next instance is up by then (else
    # nginx would answer 502, and an EventSource stops for good on that).
    env = {"TC_EVENTS_SERVER__RETRY_MIN_MS": "4000", "TC_EVENTS_SERVER__RETRY_MAX_MS": "5000"}
    first = EventsServer.start(env, port=port)
    second = None
    try:
        with nginx(port) as proxied:
            binding = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
            with Browser.following(proxied + connect_target(binding)) as browser:
                await browser.wait_for("ready")
                assert await asyncio.to_thread(first.stop) == 0
                second = EventsServer.start(port=port)  # the next instance behind nginx
                await browser.wait_for("ready", 2)
                assert browser.kinds().count("open") == 2  # it came back by itself
                await publish(exchange, "after", b'"through nginx"')
                await browser.wait_for("message")
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.browser
async def test_the_inspector_page_works_under_a_path_prefix(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    """docs/deploying.md's prefix location: the page, its files and its stream all go
    through /events/, and a message published reaches the page's table."""
    with nginx(server.port, path_prefix="/events/") as proxied, driven_chromium() as driver:
        page = Inspector(driver, server, base=proxied + "/events")
        page.open()
        page.set_binding(0, exchange.name, "#")
        assert page.copied("copy-url").startswith(proxied + "/events/api/events/v1/connect/")
        page.click("connect")
        page.wait_state("ready")
        await publish(exchange, "through.the.prefix", b'{"via": "nginx"}')
        page.wait(lambda: [row[2] for row in page.rows()] == ["through.the.prefix"])


async def test_both_websocket_protocols_pass_through_nginx(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    with nginx(server.port) as proxied:
        base = proxied.replace("http://", "ws://")
        async with websockets.connect(base + "/subscription/raw") as ws:
            await ws.send('{"type": "connection_init"}')
            assert json.loads(await ws.recv()) == {"type": "connection_ack"}
            bindings = [{"exchange": exchange.name, "pattern": "#"}]
            await ws.send(json.dumps({"type": "subscribe", "bindings": bindings}))
            assert json.loads(await ws.recv())["type"] == "subscribe_ack"
            async with websockets.connect(base + "/api/events/v1/listen/websocket") as old:
                assert json.loads(await old.recv())["event"] == "ready"
                bind = {"exchange": exchange.name, "routingKeyPattern": "#"}
                await old.send(json.dumps({"method": "bind", "id": "r", "options": bind}))
                assert json.loads(await old.recv())["event"] == "bound"
                await publish(exchange, "k", b'"through nginx"')
                data = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert data["message"]["payload"] == "through nginx"
                message = json.loads(await asyncio.wait_for(old.recv(), 10))
                assert message["event"] == "message"
                assert message["payload"]["payload"] == "through nginx"


@pytest.fixture(scope="module")
def node_modules() -> Iterator[Path]:
    with npm_modules("es3@npm:eventsource@3") as modules:
        yield modules


def settled(client: NodeClient, count: int) -> bool:
    """Every one of the ``count`` EventSources is open with a ``ready`` since its last
    error (none of them stopped)."""
    state: dict[int, str] = {}
    for line in client.lines:
        if line["kind"] in ("ready", "error"):
            state[line["source"]] = line["kind"]
    return len(state) == count and all(kind == "ready" for kind in state.values())


def streams_of(servers: list[EventsServer]) -> int:
    return sum(int(server.stats()["streams"]) for server in servers)


def heard_by(client: NodeClient) -> set[int]:
    """The EventSources that had a message."""
    return {line["source"] for line in client.lines if line["kind"] == "message"}


@pytest.mark.slow
async def test_a_rolling_restart_of_two_instances_behind_nginx_loses_no_client(
    exchange_name: str, node_modules: Path
) -> None:
    """1,000 EventSources (npm ``eventsource``) through the documented nginx to two
    instances; each instance is restarted in turn (SIGTERM, started again): every
    stream comes back with a fresh ``ready`` on one of them, nginx answers no 5xx,
    no EventSource stops for good, and every one gets the next message."""
    count = 1000
    env = {"TC_EVENTS_SERVER__RETRY_MIN_MS": "500", "TC_EVENTS_SERVER__RETRY_MAX_MS": "3000"}
    ports = [free_port(), free_port()]
    servers = [EventsServer.start(env, port=port) for port in ports]
    access_log: list[str] = []
    try:
        with nginx(ports, access_log=access_log) as proxied:
            url = proxied + connect_target([{"exchange": exchange_name, "routingKeyPattern": "#"}])
            client = NodeClient(node_modules, "es3", url, count=count, follow_s=170)
            collecting = asyncio.ensure_future(client.collect())
            try:
                await wait_until(lambda: settled(client, count), timeout=60)
                assert all(server.stats()["streams"] > 0 for server in servers)  # both serve
                for index, port in enumerate(ports):
                    assert await asyncio.to_thread(servers[index].stop) == 0
                    servers[index] = EventsServer.start(env, port=port)
                    await wait_until(lambda: settled(client, count), timeout=60)
                    await wait_until(lambda: streams_of(servers) == count, timeout=30)
                await publish(exchange_name, "after.restarts", b'"all here"')
                await wait_until(lambda: len(heard_by(client)) == count, timeout=30)
            finally:
                client.stop()
                collecting.cancel()
    finally:
        for server in servers:
            server.stop()
    readies = [0] * count
    for line in client.lines:
        if line["kind"] == "ready":
            readies[line["source"]] += 1
        assert not (line["kind"] == "error" and line["readyState"] == 2), line  # stopped
    assert min(readies) >= 2  # each was on an instance that restarted, and came back
    statuses = [int(line.split('"')[2].split()[0]) for line in access_log]
    assert len(statuses) >= count  # every stream that ended is logged
    assert not [status for status in statuses if status >= 500]


COME_BACK = r"event: reconnect\ndata: {}\nid:\nretry: (\d+)\n\n"  # nginx's, as tc-events'


@pytest.mark.slow
async def test_an_event_source_that_finds_no_instance_is_told_to_come_back(
    exchange_name: str, node_modules: Path
) -> None:
    """nginx's own 502 would stop an EventSource for good: with no instance up, the
    documented configuration answers it tc-events' reconnect frame (a resumable stream's
    keeps its id), any other client 502; once an instance is up, the EventSource is
    ready."""
    port = free_port()
    sse = {"Accept": "text/event-stream"}
    with nginx(port) as proxied:
        target = proxied + connect_target([{"exchange": exchange_name, "routingKeyPattern": "#"}])
        async with httpx.AsyncClient(timeout=10) as http:
            retries = set()
            for _ in range(20):  # spread over the window, as tc-events spreads its own
                told = await http.get(target, headers=sse)
                assert told.status_code == 200
                frame = re.fullmatch(
                    r"event: reconnect\ndata: {}\nid:\nretry: (\d+)\n\n", told.text
                )
                assert frame, told.text
                retries.add(int(frame.group(1)))
                assert told.headers["content-type"] == "text/event-stream"
                assert told.headers["access-control-allow-origin"] == "*"
            assert len(retries) > 1 and retries <= {1000, 3000, 5000, 7000, 10000}
            resumable = await http.get(target + "&resume=true", headers=sse)
            assert re.fullmatch(r"event: reconnect\ndata: {}\nretry: \d+\n\n", resumable.text)
            assert (await http.get(target)).status_code == 502
            assert (await http.get(f"{proxied}/__heartbeat__")).status_code == 502
        client = NodeClient(node_modules, "es3", target, follow_s=60)
        collecting = asyncio.ensure_future(client.collect())
        server = None
        try:
            await wait_until(lambda: "error" in client.kinds(), timeout=30)
            server = EventsServer.start(port=port)
            await wait_until(lambda: "ready" in client.kinds(), timeout=30)
        finally:
            client.stop()
            collecting.cancel()
            if server is not None:
                server.stop()
    assert not [line for line in client.lines if line.get("readyState") == 2], client.lines
