"""Taskcluster's 2026 events WebSocket (`/subscription/raw`, `/subscription/named`), end to
end: a real server process, the real broker, a `websockets` client that speaks as
Taskcluster's UI does (`ui/src/utils/pulseListener.js`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket as pysocket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import httpx
import pytest
import taskcluster
import websockets
from helpers import AMQP_URL, JSON_VALUES, EventsServer, SSEReader, free_port, publish, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tcp_proxy import TcpProxy
from websockets.asyncio.client import ClientConnection
from websockets.typing import Origin
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Request, TextMessage

pytestmark = pytest.mark.broker

Frame = dict[str, Any]
QUEUE = "exchange/taskcluster-queue/v1/"
EVIL = Origin("https://evil.example")
DOTTED = {"taskId": "a.b"}  # a dot in a single-word field cannot be encoded
FIELDS = ["type", "bindings", "service", "subscriptions", "routingKey", "subscriptionId"]


class Socket:
    """One client socket: frames in order, as JSON; the close when it came."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def send(self, frame: Frame | str) -> None:
        await self.connection.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 10) -> Frame:
        frame: Frame = json.loads(await asyncio.wait_for(self.connection.recv(), timeout))
        return frame

    async def closed(self, timeout: float = 20) -> tuple[int, str]:
        """The server's close: (code, reason), whatever frames came before it."""
        try:
            while True:
                await asyncio.wait_for(self.connection.recv(), timeout)
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None, "closed without a close frame"
            return closed.rcvd.code, closed.rcvd.reason

    async def subscribe(self, bindings: list[dict[str, str]]) -> str:
        """Subscribe (raw) and wait for its ack; the subscription's id."""
        await self.send({"type": "subscribe", "bindings": bindings})
        ack = await self.recv()
        assert ack["type"] == "subscribe_ack", ack
        subscription_id: str = ack["subscriptionId"]
        return subscription_id


@asynccontextmanager
async def socket(
    server: EventsServer, shape: str = "raw", init: bool = True, **options: Any
) -> AsyncIterator[Socket]:
    url = f"ws://127.0.0.1:{server.port}/subscription/{shape}"
    async with websockets.connect(url, **options) as connection:
        client = Socket(connection)
        if init:
            await client.send({"type": "connection_init"})
            assert await client.recv() == {"type": "connection_ack"}
        yield client


def binding(exchange: str, pattern: str = "#") -> dict[str, str]:
    return {"exchange": exchange, "pattern": pattern}


async def test_subscribe_ack_comes_once_the_bindings_are_in_effect(
    server: EventsServer, exchange_name: str
) -> None:
    """A message published right after the ack arrives: the bindings were bound by
    then (upstream acknowledges before binding). Several subscriptions on one socket."""
    async with socket(server) as client:
        ids = []
        for n in range(10):
            ids.append(await client.subscribe([binding(exchange_name, f"k{n}.#")]))
            await publish(exchange_name, f"k{n}.x", json.dumps({"n": n}).encode())
            data = await client.recv()
            assert data["type"] == "data" and data["subscriptionId"] == ids[-1]
            assert data["message"]["payload"] == {"n": n}
        assert len(set(ids)) == 10


async def test_data_frames_carry_the_whole_cc_and_match_routes_once_per_subscription(
    server: EventsServer, exchange_name: str
) -> None:
    async with socket(server) as client:
        routes = await client.subscribe(
            [binding(exchange_name, "route.index.#"), binding(exchange_name, "primary.#")]
        )
        other = await client.subscribe([binding(exchange_name, "primary.#")])
        cc = ["route.index.project.a", "route.notify.b"]
        await publish(exchange_name, "primary.task", b'{"n": 1}', headers={"CC": cc})
        frames = [await client.recv(), await client.recv()]
        assert sorted(f["subscriptionId"] for f in frames) == sorted([routes, other])
        for frame in frames:
            assert frame["message"] == {
                "payload": {"n": 1},
                "exchange": exchange_name,
                "routingKey": "primary.task",
                "redelivered": False,
                "cc": cc,
            }
        await publish(exchange_name, "other.key", b'{"n": 2}', headers={"CC": cc[:1]})
        only = await client.recv()
        assert only["subscriptionId"] == routes and only["message"]["payload"] == {"n": 2}
        assert only["message"]["cc"] == cc[:1]
        await publish(exchange_name, "primary.none", b"not json")
        for _ in range(2):
            frame = await client.recv()
            assert frame["message"]["payload"] == "not json" and frame["message"]["cc"] == []


SIZES = [10, 300, 70_000]  # bodies whose frames have each header form (7, 16, 64-bit length)


async def test_whole_frames_and_deflated_frames_carry_the_same_data(
    server: EventsServer, exchange_name: str
) -> None:
    """Sockets that negotiated no extension get frames the server builds whole (one per
    message and subscription id, shared by those sockets); one with permessage-deflate
    gets wsproto's. Each gets every message once per matching subscription, intact."""
    async with (
        socket(server, compression=None) as plain,
        socket(server, compression=None) as other_plain,
        socket(server) as deflated,
    ):
        plain_answer, deflated_answer = plain.connection.response, deflated.connection.response
        assert plain_answer is not None and deflated_answer is not None
        assert "sec-websocket-extensions" not in plain_answer.headers
        assert "permessage-deflate" in deflated_answer.headers["sec-websocket-extensions"]
        clients = [plain, other_plain, deflated]
        patterns: list[dict[str, str]] = []  # per client: subscription id -> pattern
        for client in clients:
            ids = {}
            for pattern in ("a.#", "#.b"):
                ids[await client.subscribe([binding(exchange_name, pattern)])] = pattern
            assert len(ids) == 2
            patterns.append(ids)
        expected = []
        for size in SIZES:
            for key, matching in (("a.b", ["a.#", "#.b"]), ("a.x", ["a.#"]), ("x.b", ["#.b"])):
                body = {"key": key, "pad": "x" * size}
                await publish(exchange_name, key, json.dumps(body).encode())
                expected += [(pattern, key, body) for pattern in matching]
        for client, ids in zip(clients, patterns, strict=True):
            heard = []
            for _ in expected:
                frame = await client.recv()
                assert frame["type"] == "data" and frame["message"]["exchange"] == exchange_name
                message, pattern = frame["message"], ids[frame["subscriptionId"]]
                heard.append((pattern, message["routingKey"], message["payload"]))
            assert sorted(heard, key=repr) == sorted(expected, key=repr)


async def test_one_queue_binding_for_a_websocket_and_a_stream_with_the_same_binding(
    server: EventsServer, exchange_name: str
) -> None:
    async with socket(server) as client:
        await client.subscribe([binding(exchange_name, "shared.#")])
        async with SSEReader(
            server.url([{"exchange": exchange_name, "routingKeyPattern": "shared.#"}])
        ) as reader:
            await reader.wait_for("ready")
            assert server.broker_bindings() == [(exchange_name, "shared.#")]
            assert server.stats()["bindings"] == 1
            await publish(exchange_name, "shared.x", b'"both"')
            assert (await client.recv())["message"]["payload"] == "both"
            (message,) = await reader.wait_for("message")
            assert json.loads(message.data)["payload"] == "both"


async def test_unsubscribe_ends_one_subscription_and_is_idempotent(
    server: EventsServer, exchange_name: str
) -> None:
    async with socket(server) as client:
        gone = await client.subscribe([binding(exchange_name, "gone.#")])
        kept = await client.subscribe([binding(exchange_name, "kept.#")])
        for _ in range(2):
            await client.send({"type": "unsubscribe", "subscriptionId": gone})
        await client.send({"type": "unsubscribe", "subscriptionId": "no-such-id"})
        await client.send({"type": "unsubscribe"})
        await wait_until(lambda: server.broker_bindings() == [(exchange_name, "kept.#")])
        await publish(exchange_name, "gone.x", b'"not for anyone"')
        await publish(exchange_name, "kept.x", b'"kept"')
        frame = await client.recv()
        assert frame["subscriptionId"] == kept and frame["message"]["payload"] == "kept"
    await wait_until(lambda: not server.broker_bindings())


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"type": "subscribe"}, "subscribe requires a non-empty array of bindings"),
        ({"type": "subscribe", "bindings": []}, "subscribe requires a non-empty array of bindings"),
        (
            {"type": "subscribe", "bindings": [{"exchange": "x"}]},
            "each binding requires an `exchange` and a `pattern` string",
        ),
        (
            {"type": "subscribe", "bindings": [binding("exchange/x")] * 101},
            "subscribe allows at most 100 bindings",
        ),
        (
            {"type": "subscribe", "bindings": [binding("amq.topic")]},
            "bindings[0]: exchange `amq.topic` is not allowed",
        ),
        ({"type": "nonsense"}, "Unknown frame type: nonsense"),
    ],
)
async def test_a_bad_frame_gets_a_protocol_error_and_the_socket_stays_open(
    server: EventsServer, exchange_name: str, frame: Frame, message: str
) -> None:
    async with socket(server) as client:
        await client.send(frame)
        assert await client.recv() == {"type": "error", "code": "ProtocolError", "message": message}
        await client.subscribe([binding(exchange_name)])  # still served


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        ("{not json", "Protocol error: malformed JSON"),
        ('{"kind": "connection_init"}', "Protocol error: missing frame type"),
        ('["connection_init"]', "Protocol error: missing frame type"),
        (
            '{"type": "subscribe", "bindings": []}',
            "Protocol error: first frame must be connection_init",
        ),
    ],
)
async def test_a_bad_start_closes_with_4400(server: EventsServer, first: str, reason: str) -> None:
    async with socket(server, init=False) as client:
        await client.send(first)
        assert await client.closed() == (4400, reason)


async def test_no_connection_init_within_ten_seconds_closes_with_4400(
    server: EventsServer,
) -> None:
    async with socket(server, init=False) as client:
        assert await client.closed(timeout=30) == (
            4400,
            "Protocol error: no connection_init frame received",
        )


async def test_an_authorization_is_accepted_as_anonymous(server: EventsServer) -> None:
    credentials = json.dumps({"clientId": "someone", "accessToken": "secret"}).encode()
    token = "Bearer " + __import__("base64").b64encode(credentials).decode()
    async with socket(server, init=False) as client:
        await client.send({"type": "connection_init", "authorization": token})
        assert await client.recv() == {"type": "connection_ack"}
    assert "secret" not in server.output()


async def test_a_refused_binding_ends_its_subscription_only(
    server: EventsServer, exchange_name: str
) -> None:
    async with socket(server) as client:
        good = await client.subscribe([binding(exchange_name, "good.#")])
        await client.send({"type": "subscribe", "bindings": [binding("exchange/test/none-such")]})
        error = await client.recv()
        assert error["type"] == "error" and error["code"] == "SubscriptionError"
        assert error["message"] == "exchange `exchange/test/none-such` does not exist"
        assert error["subscriptionId"] and error["subscriptionId"] != good
        await publish(exchange_name, "good.x", b'"still"')
        assert (await client.recv())["subscriptionId"] == good


@pytest.fixture
async def queue_exchanges() -> AsyncIterator[list[str]]:
    """Two of the Taskcluster queue's exchanges on the broker, as the queue declares them
    (made here where missing, and removed again)."""
    names = [QUEUE + "task-completed", QUEUE + "task-failed"]
    made = []
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in names:
            channel = await connection.channel()
            try:
                await channel.get_exchange(name)  # passive: it is there
            except aio_pika.exceptions.ChannelNotFoundEntity:
                channel = await connection.channel()
                await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
                made.append(name)
        try:
            yield names
        finally:
            channel = await connection.channel()
            for name in made:
                await channel.exchange_delete(name)


async def test_named_subscriptions_bind_what_taskclusters_queue_events_give(
    server: EventsServer, queue_exchanges: list[str]
) -> None:
    """``QueueEvents().taskCompleted({"taskGroupId": ...})``, exactly, bound on the
    broker; a routing key Taskcluster's queue would publish reaches it."""
    group = uuid.uuid4().hex[:22]
    events = taskcluster.QueueEvents({"rootUrl": "https://tc.example"})
    key = {"taskGroupId": group}
    expected = sorted(
        (b["exchange"], b["routingKeyPattern"])
        for b in (events.taskCompleted(key), events.taskFailed(key))
    )
    async with socket(server, shape="named") as client:
        await client.send(
            {
                "type": "subscribe",
                "service": "queue",
                "subscriptions": ["taskCompleted", "taskFailed"],
                "routingKey": key,
            }
        )
        assert (await client.recv())["type"] == "subscribe_ack"
        assert server.broker_bindings() == expected
        routing_key = f"primary.task.0.wg.w1.prov.type.sched.{group}.my.route"
        await publish(QUEUE + "task-completed", routing_key, b'{"status": {}}')
        frame = await client.recv()
        assert frame["message"]["routingKey"] == routing_key
        assert frame["message"]["exchange"] == QUEUE + "task-completed"


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"subscriptions": ["taskCompleted"]}, "subscribe requires a `service` string"),
        ({"service": "hooks", "subscriptions": ["x"]}, "unknown events service: hooks"),
        (
            {"service": "queue", "subscriptions": []},
            "subscribe requires a non-empty array of subscriptions",
        ),
        ({"service": "queue", "subscriptions": ["nope"]}, "unknown queue event: nope"),
        (
            {"service": "queue", "subscriptions": ["taskCompleted"], "routingKey": [1]},
            "routingKey must be an object of routing-key fields",
        ),
        (
            {"service": "queue", "subscriptions": ["taskCompleted"], "routingKey": DOTTED},
            "invalid routingKey for queue event taskCompleted: "
            "Cannot have periods in single word keys",
        ),
    ],
)
async def test_bad_named_subscriptions_get_a_protocol_error(
    server: EventsServer, frame: Frame, message: str
) -> None:
    async with socket(server, shape="named") as client:
        await client.send({"type": "subscribe", **frame})
        assert await client.recv() == {"type": "error", "code": "ProtocolError", "message": message}


async def test_unknown_paths_get_404_and_a_listed_origin_is_needed() -> None:
    env = {"TC_EVENTS_SERVER__WEBSOCKET_ALLOWED_ORIGINS": '["https://ui.example"]'}
    with EventsServer.running(env) as server:
        base = f"ws://127.0.0.1:{server.port}"
        with pytest.raises(websockets.InvalidStatus) as missing:
            async with websockets.connect(f"{base}/subscription/other"):
                pass
        assert missing.value.response.status_code == 404
        with pytest.raises(websockets.InvalidStatus) as foreign:
            async with websockets.connect(f"{base}/subscription/raw", origin=EVIL):
                pass
        assert foreign.value.response.status_code == 403
        for origin in (Origin("https://ui.example"), None):
            async with websockets.connect(f"{base}/subscription/raw", origin=origin) as connection:
                await connection.send('{"type": "connection_init"}')
                assert json.loads(await connection.recv()) == {"type": "connection_ack"}


async def test_over_the_stream_limit_the_upgrade_gets_503_with_retry_after(
    exchange_name: str,
) -> None:
    """A socket counts as one stream until it subscribes, then as its subscriptions (a
    socket with one subscription as much as an SSE stream)."""
    env = {"TC_EVENTS_SERVER__MAX_STREAMS": "2", "TC_EVENTS_SERVER__RETRY_MIN_MS": "2000"}
    with EventsServer.running(env) as server:
        async with socket(server) as first, socket(server) as second:
            await first.subscribe([binding(exchange_name)])
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"ws://127.0.0.1:{server.port}/subscription/raw"):
                    pass
            response = refused.value.response
            assert response.status_code == 503
            assert 2 <= int(response.headers["Retry-After"]) <= 10
            # The open socket's first subscription takes the socket's place.
            taken = await second.subscribe([binding(exchange_name, "y")])
            # One more, on a socket already open, is over the limit and told so.
            await first.send({"type": "subscribe", "bindings": [binding(exchange_name, "x")]})
            error = await first.recv()
            assert error["code"] == "SubscriptionError"
            assert error["message"] == "Too many streams on this server; retry later."
            # A socket left without subscriptions counts again; once it closes, one fits.
            await second.send({"type": "unsubscribe", "subscriptionId": taken})
            await wait_until(lambda: server.stats()["streams"] == 1)
            await first.send({"type": "subscribe", "bindings": [binding(exchange_name, "x")]})
            assert (await first.recv())["code"] == "SubscriptionError"
            await second.connection.close()
            await wait_until(lambda: server.stats()["connections"] == 1)
            await first.subscribe([binding(exchange_name, "x")])


async def test_the_lifetime_ends_a_socket_with_4408() -> None:
    with EventsServer.running({"TC_EVENTS_SERVER__WEBSOCKET_LIFETIME": "1"}) as server:
        async with socket(server) as client:
            assert await client.closed() == (4408, "Connection lifetime exceeded")


async def test_sigterm_closes_every_socket_with_1012(exchange_name: str) -> None:
    server = EventsServer.start()
    try:
        async with socket(server) as idle, socket(server) as busy:
            await busy.subscribe([binding(exchange_name)])
            server.process.send_signal(signal.SIGTERM)
            assert await idle.closed() == (1012, "Service Restart")
            assert await busy.closed() == (1012, "Service Restart")
        assert await asyncio.to_thread(server.process.wait, 20) == 0
    finally:
        server.stop()


class StalledSocket:
    """A raw client (wsproto on a blocking socket with a small receive buffer) that
    subscribes, then reads nothing until told to read to the end."""

    def __init__(self, port: int, exchange: str) -> None:
        self.sock = pysocket.socket()
        self.sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host="x", target="/subscription/raw")))
        self.texts: list[str] = []
        self._until(lambda: self.ws.state is ConnectionState.OPEN)
        self._say({"type": "connection_init"})
        self._say({"type": "subscribe", "bindings": [binding(exchange)]})
        self._until(lambda: any("subscribe_ack" in text for text in self.texts))

    def _say(self, frame: Frame) -> None:
        self.sock.sendall(self.ws.send(TextMessage(json.dumps(frame))))

    def _until(self, done: Any) -> CloseConnection | None:
        while not done():
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self.texts.append(event.data)
                elif isinstance(event, CloseConnection):
                    return event
        return None

    def read_to_close(self) -> CloseConnection | None:
        """Everything, until the server's close (``None``: the connection just ended)."""
        self.sock.settimeout(60)
        try:
            return self._until(lambda: False)
        finally:
            self.sock.close()


async def test_a_socket_that_does_not_read_is_closed_with_4429(exchange_name: str) -> None:
    env = {"TC_EVENTS_SERVER__BUFFER_MESSAGES": "20", "TC_EVENTS_SERVER__WRITE_TIMEOUT": "60"}
    with EventsServer.running(env) as server:
        stalled = await asyncio.to_thread(StalledSocket, server.port, exchange_name)
        payload = json.dumps({"pad": "x" * 20_000}).encode()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange_name)
            for n in range(1_000):
                await target.publish(aio_pika.Message(payload), routing_key=f"k.{n}")
        await wait_until(lambda: server.stats()["too_slow"] == 1, timeout=30)
        # Held meanwhile: at most the bound (20 frames) and the write in flight.
        assert server.stats()["held_bytes"] <= 21 * (len(payload) + 200)
        close = await asyncio.to_thread(stalled.read_to_close)
        assert close is not None and close.code == 4429
        assert close.reason == "The stream was closed because the client read it too slowly."
        assert len(stalled.texts) < 1_000  # what had been written before, then the close
        await wait_until(lambda: server.stats()["streams"] == 0, timeout=20)
        assert server.stats()["held_bytes"] == 0


async def test_a_client_that_misses_a_pong_is_dropped(exchange_name: str) -> None:
    """Pings every second here: the raw client never reads, so never answers; the
    `websockets` client answers every ping and stays."""
    with EventsServer.running({"TC_EVENTS_SERVER__WEBSOCKET_PING_INTERVAL": "1"}) as server:
        async with socket(server) as answering:
            await answering.subscribe([binding(exchange_name)])
            await asyncio.to_thread(StalledSocket, server.port, exchange_name)
            assert server.stats()["connections"] == 2
            await wait_until(lambda: server.stats()["connections"] == 1, timeout=20)
            await asyncio.sleep(3)  # three more pings, answered
            assert server.stats()["connections"] == 1
            await publish(exchange_name, "k", b'"still here"')
            assert (await answering.recv())["message"]["payload"] == "still here"


async def test_a_frame_over_64_kib_closes_the_socket_with_1009(server: EventsServer) -> None:
    async with socket(server) as client:
        await client.send({"type": "unsubscribe", "subscriptionId": "x" * 70_000})
        code, _ = await client.closed()
        assert code == 1009


async def test_each_subscription_is_acknowledged_again_after_the_broker_came_back(
    exchange_name: str,
) -> None:
    with TcpProxy.running() as proxy:
        with EventsServer.running({"PULSE_PORT": str(proxy.port)}) as server:
            async with socket(server) as client:
                first = await client.subscribe([binding(exchange_name, "a.#")])
                second = await client.subscribe([binding(exchange_name, "b.#")])
                proxy.cut()
                proxy.restore()
                acks = [await client.recv(timeout=30), await client.recv(timeout=30)]
                assert {a["type"] for a in acks} == {"subscribe_ack"}
                assert {a["subscriptionId"] for a in acks} == {first, second}
                await publish(exchange_name, "b.x", b'"after"')
                frame = await client.recv()
                assert frame["subscriptionId"] == second and frame["message"]["payload"] == "after"


async def test_sockets_are_served_by_every_worker(exchange_name: str) -> None:
    with EventsServer.running(args=["--workers", "2"]) as server:
        await wait_until(lambda: server.output().count("listening on") == 2, 20, 0.1)
        async with contextlib.AsyncExitStack() as stack:
            opened = [await stack.enter_async_context(socket(server)) for _ in range(16)]
            ids = [await client.subscribe([binding(exchange_name)]) for client in opened]
            await publish(exchange_name, "k", b'"to all"')
            for client, subscription_id in zip(opened, ids, strict=True):
                frame = await client.recv()
                assert frame["subscriptionId"] == subscription_id

        def ended() -> list[str]:
            return [line for line in server.output().splitlines() if "websocket ended" in line]

        await wait_until(lambda: len(ended()) == 16)
        # The kernel spread them (SO_REUSEPORT): both workers served some.
        assert {line.split("]")[0] for line in ended()} == {"tc-events[1", "tc-events[2"}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from(["subscribe", "unsubscribe", "connection_init", "data", ""]) | st.text(),
    st.dictionaries(st.sampled_from(FIELDS[1:]), JSON_VALUES, max_size=5),
)
async def test_hostile_frames_after_the_start_never_close_the_socket(
    server: EventsServer, kind: str, fields: Frame
) -> None:
    """Any JSON object with a string ``type`` after ``connection_init``: an error frame,
    an ack or nothing, and the socket stays open (the server answers the next frame).
    (One without a string ``type`` closes it with 4400, as the contract says.)"""
    async with socket(server, shape="raw") as client:
        await client.send({"type": kind, **fields})
        await client.send({"type": "probe"})
        while True:
            answer = await client.recv()
            assert answer["type"] in {"error", "subscribe_ack", "data"}, answer
            if answer.get("message") == "Unknown frame type: probe":
                break
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{server.base}/__lbheartbeat__")).status_code == 200


async def test_stats_and_metrics_are_split_by_protocol(exchange_name: str) -> None:
    with EventsServer.running() as server:
        await counted_by_protocol(server, exchange_name)


async def counted_by_protocol(server: EventsServer, exchange_name: str) -> None:
    legacy_url = f"ws://127.0.0.1:{server.port}/api/events/v1/listen/websocket"
    async with socket(server) as one, socket(server) as two, websockets.connect(legacy_url) as old:
        await one.subscribe([binding(exchange_name, "a.#")])
        await one.subscribe([binding(exchange_name, "#")])
        await two.subscribe([binding(exchange_name, "b.#")])
        assert json.loads(await old.recv())["event"] == "ready"
        bind = {"exchange": exchange_name, "routingKeyPattern": "#"}
        await old.send(json.dumps({"method": "bind", "id": "r", "options": bind}))
        assert json.loads(await old.recv())["event"] == "bound"
        await publish(exchange_name, "a.x", b"{}")
        await one.recv()
        await one.recv()
        await old.recv()
        figures = server.stats()["websockets"]
        assert figures == {
            "subscription": {"open": 2, "subscriptions": 3, "frames": 2},
            "listen": {"open": 1, "subscriptions": 1, "frames": 1},
        }
    await wait_until(lambda: server.stats()["connections"] == 0)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.base}/metrics")).text
    for line in (
        'tc_events_websockets_open{protocol="subscription"} 0.0',
        'tc_events_websocket_frames_total{protocol="subscription"} 2.0',
        'tc_events_websocket_frames_total{protocol="listen"} 1.0',
        'tc_events_websockets_ended_total{protocol="subscription",reason="client_left"} 2.0',
        'tc_events_websockets_ended_total{protocol="listen",reason="client_left"} 1.0',
    ):
        assert line in text.splitlines(), line


class PulseListener:
    """A client that follows Taskcluster's `ui/src/utils/pulseListener.js` frame for
    frame: `connection_init` on open, its one subscribe frame on `connection_ack`, and
    after any close but 4401 and 4403 a reconnect with a backoff from 1 s doubling to
    30 s, reset by an ack."""

    def __init__(self, url: str, subscribe: Frame) -> None:
        self.url, self.subscribe = url, subscribe
        self.acks: list[str] = []
        self.messages: list[Frame] = []
        self.closes: list[int | None] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        attempts = 0
        while True:
            code: int | None = None
            try:
                async with websockets.connect(self.url) as ws:
                    await ws.send(json.dumps({"type": "connection_init"}))
                    async for text in ws:
                        frame = json.loads(text)
                        if frame["type"] == "connection_ack":
                            attempts = 0
                            await ws.send(json.dumps(self.subscribe))
                        elif frame["type"] == "subscribe_ack":
                            self.acks.append(frame["subscriptionId"])
                        elif frame["type"] == "data":
                            self.messages.append(frame["message"])
                    code = ws.close_code
            except (OSError, websockets.WebSocketException) as error:
                received = getattr(error, "rcvd", None)
                code = received.code if received is not None else None
            self.closes.append(code)
            if code in (4401, 4403):
                return
            await asyncio.sleep(min(1.0 * 2**attempts, 30.0))
            attempts += 1


async def test_a_pulse_listener_comes_back_after_1012_to_the_restarted_server(
    exchange_name: str,
) -> None:
    port = free_port()
    first, second = EventsServer.start(port=port), None
    subscribe = {"type": "subscribe", "bindings": [binding(exchange_name, "#")]}
    client = PulseListener(f"ws://127.0.0.1:{port}/subscription/raw", subscribe)
    try:
        await wait_until(lambda: len(client.acks) == 1)
        await publish(exchange_name, "k", b'"before"')
        await wait_until(lambda: len(client.messages) == 1)
        assert await asyncio.to_thread(first.stop) == 0
        await wait_until(lambda: bool(client.closes))
        assert client.closes[0] == 1012
        second = EventsServer.start(port=port)
        await wait_until(lambda: len(client.acks) == 2, timeout=40)
        await publish(exchange_name, "k", b'"after"')
        await wait_until(lambda: len(client.messages) == 2)
        assert [m["payload"] for m in client.messages] == ["before", "after"]
    finally:
        client.task.cancel()
        first.stop()
        if second is not None:
            second.stop()
