"""Resumable streams (``resume=true``), end to end: real server processes sharing one
history (a RabbitMQ stream queue), the real broker, an independent SSE client."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import websockets
from helpers import (
    AMQP_URL,
    EventsServer,
    NodeClient,
    SSEReader,
    arabbitmqctl,
    connect_target,
    declare_exchange,
    delete_exchange,
    npm_modules,
    publish,
    wait_until,
)
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.broker

KEPT = {"TC_EVENTS_HISTORY__EXCHANGES": '["exchange/test/*"]'}


@pytest.fixture(scope="module")
def node_modules() -> Iterator[Path]:
    with npm_modules("es3@npm:eventsource@3") as modules:
        yield modules


@pytest.fixture
def kept_server(history_namespace: str) -> Iterator[EventsServer]:
    server = EventsServer.start(KEPT, namespace=history_namespace)
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
    kept_server: EventsServer, history_namespace: str, exchange_name: str
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
    other = EventsServer.start(KEPT, namespace=history_namespace)
    try:
        since = f"&since={position}"
        async with SSEReader(resume_url(other, [bound(exchange_name, "#")], since)) as there:
            await there.wait_for("message")
            assert [payload for _, payload, _ in messages(there)] == ["missed"]
    finally:
        other.stop()


async def test_a_stream_that_missed_nothing_resumes_after_a_restart(
    history_namespace: str, exchange_name: str
) -> None:
    """Back on a restarted server from the newest position (nothing to read back): it
    goes live at once and gets the next message, once."""
    first = EventsServer.start(KEPT, namespace=history_namespace)
    try:
        url = resume_url(first, [bound(exchange_name, "#")])
        async with SSEReader(url) as reader:
            await reader.wait_for("ready")
            await publish(exchange_name, "k", b"0")
            await reader.wait_for("message")
    finally:
        first.stop()
    last = reader.named("message")[0].id
    second = EventsServer.start(KEPT, port=first.port, namespace=history_namespace)
    try:
        async with SSEReader(url, headers={"Last-Event-ID": last}) as again:
            await again.wait_for("ready")
            await publish(exchange_name, "k", b"1")
            await again.wait_for("message")
            await publish(exchange_name, "k", b"2")
            await again.wait_for("message", 2)
        assert [payload for _, payload, _ in messages(again)] == [1, 2]
        assert second.stats()["history"]["replaying"] == 0
    finally:
        second.stop()


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


async def test_retention_gives_a_gap_before_the_replay(
    history_namespace: str, exchange_name: str
) -> None:
    """A position older than what is kept: ``gap`` names what was asked and the oldest
    kept, then the replay from there."""
    env = {
        **KEPT,
        "TC_EVENTS_HISTORY__MAX_BYTES": "65536",
        "TC_EVENTS_HISTORY__SEGMENT_BYTES": "4096",
    }
    server = EventsServer.start(env, namespace=history_namespace)
    try:
        url = resume_url(server, [bound(exchange_name, "#")])
        async with SSEReader(url) as live:
            await live.wait_for("ready")
            for n in range(300):  # about 300 KiB: retention removes the first segments
                await publish(exchange_name, "k", json.dumps({"n": n, "pad": "x" * 1000}).encode())
            await live.wait_for("message", 300, timeout=30)
        first = messages(live)[0][0]
        async with SSEReader(
            resume_url(server, [bound(exchange_name, "#")], f"&since={first}")
        ) as r:
            await r.wait_for("message")
        (gap,) = r.data("gap")
        assert gap["from"] == first and gap["earliest"] > first + 1
        kinds = [event.event for event in r.events if event.event != "ping"]
        assert kinds[:3] == ["ready", "gap", "message"]
        assert int(r.named("message")[0].id) == gap["earliest"]
    finally:
        server.stop()


async def test_a_writer_killed_while_messages_flow_loses_none(
    history_namespace: str, exchange_name: str
) -> None:
    """The first instance writes the history (the broker's single active consumer of the
    feed); killed mid-flow, the broker hands the feed and what it had not acknowledged to
    the other: a resumed stream there gets every message (one in flight may come twice)."""
    writer = EventsServer.start(KEPT, namespace=history_namespace)
    other = EventsServer.start(KEPT, namespace=history_namespace)
    try:
        url = resume_url(other, [bound(exchange_name, "#")])
        async with SSEReader(url) as reader:
            await reader.wait_for("ready")
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                exchange = await channel.get_exchange(exchange_name)
                for n in range(400):
                    if n == 100:
                        writer.stop(signal.SIGKILL)
                    await exchange.publish(aio_pika.Message(str(n).encode()), routing_key="k")
            await wait_until(
                lambda: {payload for _, payload, _ in messages(reader)} == set(range(400)),
                timeout=60,
            )
        positions = [position for position, _, _ in messages(reader)]
        assert positions == sorted(positions)
    finally:
        writer.stop()
        other.stop()


async def test_an_event_source_resumes_after_the_broker_link_was_cut(
    history_namespace: str, exchange_name: str, node_modules: Path
) -> None:
    """The npm EventSource, unmodified: the link to the broker is cut (the history with
    it), messages are published meanwhile; the stream ends with a frame that keeps the
    last id, the client comes back with ``Last-Event-ID`` and gets what it missed, then
    the live ones: every message once, in order."""
    with TcpProxy.running() as proxy:
        server = EventsServer.start(
            {**KEPT, "PULSE_PORT": str(proxy.port)}, namespace=history_namespace
        )
        try:
            client = NodeClient(
                node_modules, "es3", resume_url(server, [bound(exchange_name, "#")])
            )
            collecting = asyncio.ensure_future(client.collect())
            try:
                await wait_until(lambda: "ready" in client.kinds(), timeout=20)
                for n in range(3):
                    await publish(exchange_name, "k", str(n).encode())
                await wait_until(lambda: client.kinds().count("message") == 3, timeout=20)
                proxy.cut()
                for n in range(3, 6):  # kept by the feed while the writer is away
                    await publish(exchange_name, "k", str(n).encode())
                await asyncio.sleep(1)
                proxy.restore()
                await wait_until(lambda: client.kinds().count("ready") == 2, timeout=40)
                for n in range(6, 9):
                    await publish(exchange_name, "k", str(n).encode())
                try:
                    await wait_until(lambda: client.kinds().count("message") >= 9, timeout=30)
                except AssertionError:
                    raise AssertionError(f"heard: {client.lines}") from None
            finally:
                client.stop()
                collecting.cancel()
            heard = [line for line in client.lines if line["kind"] == "message"]
            assert [json.loads(line["data"])["payload"] for line in heard] == list(range(9))
            ids = [int(line["lastEventId"]) for line in heard]
            assert ids == sorted(set(ids))
        finally:
            server.stop()


async def test_the_2026_websocket_resumes_with_since_and_positions(
    kept_server: EventsServer, exchange_name: str
) -> None:
    """The extension Taskcluster's UI client ignores: ``subscribe`` with ``since`` (a
    position, or ``null`` for from now on) gets ``data`` frames with their ``position``."""
    url = f"ws://127.0.0.1:{kept_server.port}/subscription/raw"
    binding = {"exchange": exchange_name, "pattern": "#"}

    async def subscribe(socket: Any, since: Any) -> dict[str, Any]:
        await socket.send(json.dumps({"type": "subscribe", "bindings": [binding], "since": since}))
        return dict(json.loads(await asyncio.wait_for(socket.recv(), 10)))

    async with websockets.connect(url) as socket:
        await socket.send('{"type": "connection_init"}')
        await socket.recv()
        bad = await subscribe(socket, "12")
        assert bad["code"] == "ProtocolError" and "since" in bad["message"]
        ack = await subscribe(socket, None)
        assert ack["type"] == "subscribe_ack"
        for n in range(3):
            await publish(exchange_name, "k", str(n).encode())
        frames = [json.loads(await asyncio.wait_for(socket.recv(), 10)) for _ in range(3)]
    assert [frame["message"]["payload"] for frame in frames] == [0, 1, 2]
    assert {frame["subscriptionId"] for frame in frames} == {ack["subscriptionId"]}
    positions = [frame["position"] for frame in frames]
    assert positions == sorted(positions)
    await publish(exchange_name, "k", b"3")
    async with websockets.connect(url) as socket:
        await socket.send('{"type": "connection_init"}')
        await socket.recv()
        assert (await subscribe(socket, positions[0]))["type"] == "subscribe_ack"
        again = [json.loads(await asyncio.wait_for(socket.recv(), 10)) for _ in range(3)]
    assert [frame["message"]["payload"] for frame in again] == [1, 2, 3]
    assert [frame["position"] for frame in again][:2] == positions[1:]


async def test_a_2026_websocket_whose_history_is_lost_closes_1012_and_resumes(
    history_namespace: str, exchange_name: str
) -> None:
    """The link to the broker is cut while a resumable subscription is live: the socket
    closes with 1012 (come back); subscribed again from its last position, it gets what
    was published while it was away, then the live ones."""
    with TcpProxy.running() as proxy:
        env = {**KEPT, "PULSE_PORT": str(proxy.port)}
        server = EventsServer.start(env, namespace=history_namespace)
        try:
            url = f"ws://127.0.0.1:{server.port}/subscription/raw"
            subscribe = {
                "type": "subscribe",
                "bindings": [{"exchange": exchange_name, "pattern": "#"}],
                "since": None,
            }
            async with websockets.connect(url) as socket:
                await socket.send('{"type": "connection_init"}')
                await socket.recv()
                await socket.send(json.dumps(subscribe))
                assert json.loads(await socket.recv())["type"] == "subscribe_ack"
                await publish(exchange_name, "k", b"0")
                first = json.loads(await asyncio.wait_for(socket.recv(), 10))
                proxy.cut()
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(socket.recv(), 30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
            for n in (1, 2):  # while the history is away: kept by the feed
                await publish(exchange_name, "k", str(n).encode())
            proxy.restore()
            await wait_until(lambda: server.stats()["history"]["connected"], timeout=30)
            async with websockets.connect(url) as socket:
                await socket.send('{"type": "connection_init"}')
                await socket.recv()
                await socket.send(json.dumps({**subscribe, "since": first["position"]}))
                assert json.loads(await socket.recv())["type"] == "subscribe_ack"
                again = [json.loads(await asyncio.wait_for(socket.recv(), 20)) for _ in range(2)]
                await publish(exchange_name, "k", b"3")
                again.append(json.loads(await asyncio.wait_for(socket.recv(), 20)))
            assert [frame["message"]["payload"] for frame in [first, *again]] == [0, 1, 2, 3]
            positions = [frame["position"] for frame in [first, *again]]
            assert positions == sorted(set(positions))
        finally:
            server.stop()


async def test_listen_resume_keeps_its_place_across_a_restart(
    history_namespace: str, exchange_name: str
) -> None:
    """``tc-events listen --resume``: the server is restarted while messages are
    published; listen comes back with the last position and prints every one, once."""
    env = {**KEPT, "TC_EVENTS_SERVER__RETRY_MIN_MS": "300", "TC_EVENTS_SERVER__RETRY_MAX_MS": "400"}
    first = EventsServer.start(env, namespace=history_namespace)
    second = None
    listening = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "quart_events", "listen", "--resume", "--count", "4"),
        *("--url", first.base, "-e", exchange_name, "-p", "#"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_until(lambda: first.stats()["history"]["live"] == 1, timeout=20)
        for n in range(2):
            await publish(exchange_name, "k", str(n).encode())
        assert listening.stdout is not None
        lines = [await asyncio.wait_for(listening.stdout.readline(), 20) for _ in range(2)]
        assert await asyncio.to_thread(first.stop) == 0
        for n in range(2, 4):  # while no server is up: kept by the feed
            await publish(exchange_name, "k", str(n).encode())
        second = EventsServer.start(env, port=first.port, namespace=history_namespace)
        stdout, stderr = await asyncio.wait_for(listening.communicate(), 60)
        assert listening.returncode == 0, stderr
        lines += stdout.splitlines()
        assert [json.loads(line)["payload"] for line in lines] == [0, 1, 2, 3]
    finally:
        if listening.returncode is None:
            listening.kill()
        first.stop()
        if second is not None:
            second.stop()


async def test_a_resumable_stream_turned_away_keeps_its_place(
    history_namespace: str, exchange_name: str
) -> None:
    """Over the stream limit, an EventSource is asked to come back later; a resumable
    one with a frame that keeps its last id (no ``id:`` line), so that it resumes from
    there instead of from now."""
    env = {**KEPT, "TC_EVENTS_SERVER__MAX_STREAMS": "1"}
    server = EventsServer.start(env, namespace=history_namespace)
    try:
        url = resume_url(server, [bound(exchange_name, "#")])
        async with SSEReader(url) as holder:
            await holder.wait_for("ready")
            headers = {"Accept": "text/event-stream", "Last-Event-ID": "7"}
            async with httpx.AsyncClient(timeout=10) as client:
                turned_away = await client.get(url, headers=headers)
        assert turned_away.status_code == 200
        assert turned_away.text.startswith("event: reconnect\ndata: {}\nretry: ")
        assert "\nid:" not in turned_away.text
    finally:
        server.stop()


async def kept_in_history(url: str, exchange: str, count: int, pad: int) -> list[int]:
    """Publish ``count`` messages ``{"n": n, "pad": ...}`` (``pad`` bytes of padding)
    while a resumable stream of ``url`` listens, until it has had each: their positions."""
    async with SSEReader(url) as live:
        await live.wait_for("ready")
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            target = await (await connection.channel()).get_exchange(exchange)
            for n in range(count):
                body = json.dumps({"n": n, "pad": "x" * pad}).encode()
                await target.publish(aio_pika.Message(body), routing_key=f"k.{n}")
        await live.wait_for("message", count, timeout=60)
    return [int(event.id) for event in live.named("message")]


class HeldReplay:
    """A resumable stream read over a small receive buffer: it reads a few messages,
    then nothing until told, so its replay is held half-way (paced by its outbox)."""

    def __init__(self, url: str, last_event_id: int, receive_buffer: int | None = 4096) -> None:
        self.url = httpx.URL(url)
        self.receive_buffer = receive_buffer
        self.last_event_id = last_event_id
        self.heard: list[tuple[int, Any]] = []  # (position, payload) of each message
        self.kinds: list[str] = []
        self.buffer = b""

    async def open(self) -> None:
        sock = socket.socket()
        if self.receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.url.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock)
        target = self.url.raw_path.decode()
        self.writer.write(
            f"GET {target} HTTP/1.0\r\nHost: x\r\nAccept: text/event-stream\r\n"
            f"Last-Event-ID: {self.last_event_id}\r\nConnection: close\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 20)
        assert head.startswith(b"HTTP/1.1 200"), head  # (not chunked: asked in 1.0)

    async def read(self, messages: int | None = None, timeout: float = 60) -> None:
        """Until ``messages`` more messages were heard, or (none) to the stream's end"""
        target = None if messages is None else len(self.heard) + messages
        async with asyncio.timeout(timeout):
            while target is None or len(self.heard) < target:
                chunk = await self.reader.read(4096)
                if not chunk:
                    return
                self.buffer += chunk
                *frames, self.buffer = self.buffer.split(b"\n\n")
                for frame in frames:
                    self._frame(frame.decode())

    def _frame(self, text: str) -> None:
        fields = dict(line.split(": ", 1) for line in text.split("\n") if ": " in line)
        kind = fields.get("event", "message")
        self.kinds.append(kind)
        if kind == "message":
            self.heard.append((int(fields["id"]), json.loads(fields["data"])["payload"]))

    def close(self) -> None:
        self.writer.close()


@pytest.mark.slow
async def test_broker_restarts_during_replays_lose_nothing(history_namespace: str) -> None:
    """Two broker restarts, each while a replay is held half-way by its client: the
    stream ends with the frame that keeps its last id, the client resumes from it once
    the broker is back, and in the end it has had every message once, in order."""
    exchange = f"exchange/test/restart-{uuid.uuid4().hex[:6]}"
    await declare_exchange(exchange, durable=True)  # it outlives the restarts
    count = 3000
    env = {**KEPT, "TC_EVENTS_SERVER__BUFFER_BYTES": "262144"}
    server = EventsServer.start(env, namespace=history_namespace)
    try:
        url = resume_url(server, [bound(exchange, "#")])
        positions = await kept_in_history(url, exchange, count, pad=1000)
        heard: list[tuple[int, Any]] = []
        last = positions[0]  # resumed from the first: every later one is owed
        for _ in range(2):
            held = HeldReplay(url, last)
            await held.open()
            try:
                await held.read(messages=20)
                assert server.stats()["history"]["replaying"] == 1  # held, not done
                try:
                    await arabbitmqctl("stop_app")
                    await held.read()  # what was on its way, then the frame to come back
                finally:
                    await arabbitmqctl("start_app")
            finally:
                held.close()
            assert held.kinds[-1] == "reconnect" and 20 <= len(held.heard) < count - 1
            heard += held.heard
            last = held.heard[-1][0]
        async with SSEReader(url, headers={"Last-Event-ID": str(last)}) as rest:
            await rest.wait_for("message", count - 1 - len(heard), timeout=120)
            heard += [(int(e.id), json.loads(e.data)["payload"]) for e in rest.named("message")]
        assert [position for position, _ in heard] == positions[1:]
        assert [payload["n"] for _, payload in heard] == list(range(1, count))
    finally:
        server.stop()
        await arabbitmqctl("start_app")  # idempotent: the broker is up for whatever follows
        await delete_exchange(exchange)


@pytest.mark.slow
async def test_a_thousand_clients_resume_at_once_in_bounded_memory(
    history_namespace: str, exchange_name: str
) -> None:
    """After a restart, 1,000 streams resume at once, each 50 messages of 4 KiB back
    (200 MB, were the replays loaded whole): every one gets all it missed, in order,
    at most ``history.max_replays`` replays read at once, the server's memory bounded."""
    clients, owed, max_replays = 1000, 50, 20
    env = {**KEPT, "TC_EVENTS_HISTORY__MAX_REPLAYS": str(max_replays)}
    first = EventsServer.start(env, namespace=history_namespace)
    try:
        url = resume_url(first, [bound(exchange_name, "#")])
        since = (await kept_in_history(url, exchange_name, owed + 1, pad=4096))[0]
    finally:
        first.stop()
    server = EventsServer.start(env, port=first.port, namespace=history_namespace)
    try:
        before = server.stats()["rss_bytes"]
        peaks = {"rss_bytes": before, "replaying": 0}
        streams = [HeldReplay(url, since, receive_buffer=None) for _ in range(clients)]

        async def sample() -> None:
            while True:
                stats = await asyncio.to_thread(server.stats)
                peaks["rss_bytes"] = max(peaks["rss_bytes"], stats["rss_bytes"])
                peaks["replaying"] = max(peaks["replaying"], stats["history"]["replaying"])

                await asyncio.sleep(0.2)

        sampling = asyncio.ensure_future(sample())
        try:
            await asyncio.gather(*(stream.open() for stream in streams))
            await asyncio.gather(*(stream.read(messages=owed, timeout=240) for stream in streams))
        finally:
            sampling.cancel()
            for stream in streams:
                stream.close()
        for stream in streams:
            assert [payload["n"] for _, payload in stream.heard] == list(range(1, owed + 1))
        assert 0 < peaks["replaying"] <= max_replays
        assert peaks["rss_bytes"] - before < 120 * 2**20, peaks
        await wait_until(lambda: server.stats()["streams"] == 0, timeout=30)
        assert server.stats()["history"]["replaying"] == 0
    finally:
        server.stop()
