"""The events service's WebSocket of 2014-2018 (`/api/events/v1/listen/websocket`), end
to end: the unmodified `WebListener` of npm `taskcluster-client-web@9.0.0` under Node
(installed from the npm registry into a temporary directory, `ws` as its WebSocket),
a real server process and the real broker; hostile frames from a `websockets` client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from helpers import (
    JSON_VALUES,
    ROOT,
    EventsServer,
    SSEReader,
    free_port,
    npm_modules,
    publish,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tcp_proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CLIENT = ROOT / "tests" / "weblistener_client.cjs"


@pytest.fixture(scope="module")
def node_modules() -> Iterator[Path]:
    """The unmodified WebListener and `ws` as its WebSocket."""
    with npm_modules("taskcluster-client-web@9.0.0", "ws@8") as modules:
        yield modules


def bound(exchange: str, pattern: str) -> dict[str, str]:
    return {"exchange": exchange, "routingKeyPattern": pattern}


class WebListener:
    """The npm client in a Node process: what it heard, one line each."""

    def __init__(self, node_modules: Path, root_url: str, first: dict[str, str]) -> None:
        self.lines: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            ["node", str(CLIENT), root_url, json.dumps(first)],
            env={**os.environ, "NODE_MODULES": str(node_modules)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.reading = asyncio.ensure_future(self._collect())

    async def _collect(self) -> None:
        assert self.process.stdout is not None
        while line := await asyncio.to_thread(self.process.stdout.readline):
            self.lines.append(json.loads(line))

    def heard(self, kind: str) -> list[Any]:
        return [line["payload"] for line in self.lines if line["kind"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 20) -> list[Any]:
        try:
            await wait_until(lambda: len(self.heard(kind)) >= count, timeout)
        except AssertionError:
            raise AssertionError(f"no {count} {kind!r} in {timeout} s: {self.lines}") from None
        return self.heard(kind)

    def bind(self, binding: dict[str, str]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(binding) + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.reading.cancel()


async def test_weblistener_binds_before_and_on_a_live_socket_and_gets_messages(
    node_modules: Path, server: EventsServer, exchange_name: str
) -> None:
    listener = WebListener(node_modules, server.base, bound(exchange_name, "a.#"))
    try:
        await listener.wait_for("connected")
        async with SSEReader(server.url([bound(exchange_name, "a.#")])) as reader:
            await reader.wait_for("ready")
            cc = ["route.index.x"]
            await publish(exchange_name, "a.x", b'{"n": 1}', headers={"CC": cc})
            (sse_message,) = await reader.wait_for("message")
            (message,) = await listener.wait_for("message")
            assert message == json.loads(sse_message.data)  # the SSE message's data
            assert message["routes"] == ["index.x"]
        listener.bind(bound(exchange_name, "a.*"))  # overlaps a.#: still once per socket
        (answer,) = await listener.wait_for("bound")
        assert answer == {"options": bound(exchange_name, "a.*")}
        await publish(exchange_name, "a.y", b'{"n": 2}')
        await listener.wait_for("message", 2)
        await asyncio.sleep(1)
        assert [m["payload"] for m in listener.heard("message")] == [{"n": 1}, {"n": 2}]
        listener.bind(bound("exchange/test/none-such", "#"))
        (refused,) = await listener.wait_for("bind-error")
        assert refused["message"] == "exchange `exchange/test/none-such` does not exist"
        await publish(exchange_name, "a.z", b'{"n": 3}')  # the socket goes on
        await listener.wait_for("message", 3)
        assert not listener.heard("close")
    finally:
        listener.stop()


async def test_weblistener_hears_ready_again_after_the_broker_came_back(
    node_modules: Path, exchange_name: str
) -> None:
    with TcpProxy.running() as proxy:
        with EventsServer.running({"PULSE_PORT": str(proxy.port)}) as server:
            listener = WebListener(node_modules, server.base, bound(exchange_name, "#"))
            try:
                await listener.wait_for("connected")
                listener.bind(bound(exchange_name, "b.#"))
                await listener.wait_for("bound")
                readies = len(listener.heard("ready"))
                proxy.cut()
                proxy.restore()
                await listener.wait_for("ready", readies + 1, timeout=30)
                await publish(exchange_name, "b.x", b'"after"')
                (message,) = await listener.wait_for("message")
                assert message["payload"] == "after"
                await asyncio.sleep(1)
                assert len(listener.heard("ready")) == readies + 1  # once per socket
                assert len(listener.heard("message")) == 1
            finally:
                listener.stop()


async def test_sigterm_closes_with_1012_and_weblistener_comes_back_to_the_next_server(
    node_modules: Path, exchange_name: str
) -> None:
    port = free_port()
    first = EventsServer.start(port=port)
    second = None
    listener = WebListener(node_modules, first.base, bound(exchange_name, "#"))
    try:
        await listener.wait_for("connected")
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/listen/websocket") as raw:
            first.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(raw.recv(), 20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        assert await asyncio.to_thread(first.process.wait, 20) == 0
        await listener.wait_for("close")
        second = EventsServer.start(port=port)
        await listener.wait_for("reconnect", timeout=30)
        await wait_until(lambda: second is not None and bool(second.broker_bindings()), 20)
        await publish(exchange_name, "k", b'"on the next server"')
        (message,) = await listener.wait_for("message")
        assert message["payload"] == "on the next server"
    finally:
        listener.stop()
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_messages_are_intact_in_whole_frames_and_deflated(
    server: EventsServer, exchange_name: str, compression: str | None
) -> None:
    """Without an extension the server builds each message's frame whole (once for every
    such socket); with permessage-deflate wsproto frames it: the same events either way,
    for bodies of each frame header size."""
    url = f"ws://127.0.0.1:{server.port}/api/events/v1/listen/websocket"
    async with websockets.connect(url, compression=compression) as client:
        assert client.response is not None
        negotiated = client.response.headers.get("sec-websocket-extensions", "")
        assert ("permessage-deflate" in negotiated) == (compression == "deflate")
        request = {"method": "bind", "id": "b1", "options": bound(exchange_name, "k.#")}
        await client.send(json.dumps(request))
        for _ in range(2):  # ready (once the client spoke), then bound
            frame = json.loads(await asyncio.wait_for(client.recv(), 5))
            assert frame["event"] in {"ready", "bound"}
        cc = ["route.index.a", "other"]
        for size in (10, 300, 70_000):
            body = {"pad": "x" * size}
            await publish(exchange_name, "k.x", json.dumps(body).encode(), headers={"CC": cc})
            event = json.loads(await asyncio.wait_for(client.recv(), 5))
            assert event["event"] == "message" and isinstance(event["id"], str)
            assert event["payload"] == {
                "payload": body,
                "exchange": exchange_name,
                "routingKey": "k.x",
                "redelivered": False,
                "routes": ["index.a"],
            }


@pytest.mark.parametrize(
    ("frame", "answer"),
    [
        ("{nope", {"id": None, "message": "Message is not a JSON object"}),
        (
            '{"method": "listen", "id": "r1"}',
            {"id": "r1", "message": "Unknown method: only `bind` is served"},
        ),
        (
            '{"method": "bind", "id": "r2", "options": 7}',
            {"id": "r2", "message": "`options` must be an object"},
        ),
        (
            '{"method": "bind", "id": "r3", "options": {"exchange": "x", "routingKeyPattern": 5}}',
            {"id": "r3", "message": "`routingKeyPattern` must be a string"},
        ),
        (
            json.dumps({"method": "bind", "id": "r4", "options": bound("amq.topic", "#")}),
            {"id": "r4", "message": "exchange `amq.topic` is not allowed"},
        ),
    ],
)
async def test_bad_frames_get_an_error_with_their_id_and_the_socket_stays_open(
    server: EventsServer, exchange_name: str, frame: str, answer: dict[str, Any]
) -> None:
    url = f"ws://127.0.0.1:{server.port}/events/v1/listen/websocket"
    async with websockets.connect(url) as client:
        ready = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert ready["event"] == "ready" and ready["payload"] is None
        await client.send(frame)
        error = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert error["event"] == "error" and error["payload"]["message"] == answer["message"]
        if answer["id"] is None:
            assert isinstance(error["id"], str)  # WebListener needs a string id
        else:
            assert error["id"] == answer["id"]
        request = {"method": "bind", "id": "ok", "options": bound(exchange_name, "#")}
        await client.send(json.dumps(request))
        reply = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert reply == {
            "event": "bound",
            "id": "ok",
            "payload": {"options": bound(exchange_name, "#")},
        }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(max_size=200)
    | st.builds(json.dumps, JSON_VALUES)
    | st.builds(
        lambda options, request: json.dumps({"method": "bind", "id": request, "options": options}),
        JSON_VALUES,
        JSON_VALUES,
    )
)
async def test_hostile_frames_get_an_error_or_an_answer_and_never_close_the_socket(
    server: EventsServer, frame: str
) -> None:
    url = f"ws://127.0.0.1:{server.port}/v1/listen/websocket"
    async with websockets.connect(url) as client:
        assert json.loads(await asyncio.wait_for(client.recv(), 5))["event"] == "ready"
        await client.send(frame)
        answer = json.loads(await asyncio.wait_for(client.recv(), 5))
        assert answer["event"] in {"error", "bound"} and isinstance(answer["id"], str), answer
        probe = {"method": "probe", "id": "probe"}
        await client.send(json.dumps(probe))
        while (reply := json.loads(await asyncio.wait_for(client.recv(), 5)))["id"] != "probe":
            assert reply["event"] in {"error", "bound", "message"}
        assert reply["event"] == "error"
