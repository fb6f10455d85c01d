"""The app: in process through Quart's test client, and as a real server for its plain
routes (health, version, ping, metrics) and its logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
import urllib.parse
import uuid
from importlib import metadata
from typing import Any

import aio_pika
import httpx
import pytest
from helpers import EventsServer, SSEReader, free_port, wait_until
from tcp_proxy import TcpProxy

from quart_events import create_app, load_settings
from quart_events.app import service_of
from quart_events.broker import Broker
from quart_events.health import STALLED_AFTER, Health, WorkersHealth
from quart_events.liveness import Pulse

EMPTY = urllib.parse.quote('{"bindings": []}')

pytestmark = pytest.mark.broker


async def test_ready_then_message_through_the_test_client(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:

    settings = load_settings(
        "test", overrides={"pulse": {"namespace": f"test-{uuid.uuid4().hex[:8]}"}}
    )
    app = create_app(settings)
    bindings = json.dumps({"bindings": [{"exchange": exchange.name, "routingKeyPattern": "#"}]})
    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with client.request(
            "/api/events/v1/connect/?" + urllib.parse.urlencode({"bindings": bindings})
        ) as connection:
            await connection.send_complete()
            received = b""
            while b"event: ready" not in received:
                received += await connection.receive()
            await exchange.publish(aio_pika.Message(b'{"x": 1}'), routing_key="a.b")
            while b"event: message" not in received:
                received += await connection.receive()
            await connection.disconnect()
    message = received.split(b"event: message\ndata: ")[1].split(b"\n")[0]
    assert json.loads(message)["payload"] == {"x": 1}
    answered: Any = connection  # quart's protocol type leaves out what the response holds
    assert answered.status_code == 200
    assert answered.headers["Content-Type"] == "text/event-stream"


async def test_a_stream_requested_once_shutdown_began_gets_the_reconnect_frame_at_once() -> None:
    settings = load_settings(
        "test", overrides={"pulse": {"namespace": f"test-{uuid.uuid4().hex[:8]}"}}
    )
    app = create_app(settings)
    async with app.test_app() as test_app:
        service_of(app).hub.begin_shutdown()
        client = test_app.test_client()
        async with client.request("/api/events/v1/connect/?bindings=" + EMPTY) as connection:
            await connection.send_complete()
            received = b""
            with contextlib.suppress(Exception):  # the response ends: nothing more to receive
                while not received.endswith(b"\n\n"):
                    received += await asyncio.wait_for(connection.receive(), 5)
    assert getattr(connection, "status_code") == 200  # noqa: B009  (not in quart's protocol type)
    assert re.fullmatch(rb"event: reconnect\ndata: {}\nid:\nretry: \d+\n\n", received), received


async def test_health_endpoints(server: EventsServer) -> None:
    async with httpx.AsyncClient(base_url=server.base, timeout=5) as client:
        assert (await client.get("/__lbheartbeat__")).status_code == 200
        heartbeat = await client.get("/__heartbeat__")
        assert heartbeat.status_code == 200
        assert heartbeat.json() == {"broker": "connected", "node": "localhost"}
        version = (await client.get("/__version__")).json()
        assert version["version"] == metadata.version("quart_events") and version["source"]
        first = (await client.get("/api/events/v1/ping")).json()
        await asyncio.sleep(0.2)
        second = (await client.get("/api/events/v1/ping")).json()
        assert first["alive"] is True and second["uptime"] > first["uptime"] >= 0


async def test_heartbeat_says_503_while_the_broker_is_away() -> None:
    with (
        TcpProxy.running() as proxy,
        EventsServer.running({"PULSE_PORT": str(proxy.port)}) as server,
    ):
        proxy.cut()
        async with httpx.AsyncClient(base_url=server.base, timeout=5) as client:
            await wait_until(lambda: not server.stats()["broker_connected"])
            down = await client.get("/__heartbeat__")
            assert down.status_code == 503 and down.json()["broker"].startswith("disconnected")
            assert (await client.get("/__lbheartbeat__")).status_code == 200
            proxy.restore()
            await wait_until(lambda: server.stats()["broker_connected"], timeout=20)
            assert (await client.get("/__heartbeat__")).status_code == 200


async def test_health_probes_are_answered_on_a_port_of_their_own_too() -> None:
    """``server.health_port``: the probes there (a crowd of new streams waits in the main
    port's listen queue, not in this one), with the broker's state; nothing else there."""
    health_port = free_port()
    with (
        TcpProxy.running() as proxy,
        EventsServer.running(
            {"PULSE_PORT": str(proxy.port), "TC_EVENTS_SERVER__HEALTH_PORT": str(health_port)}
        ) as server,
    ):
        side = f"http://127.0.0.1:{health_port}"
        # (the main port may be open a moment before the line is written)
        await wait_until(lambda: f"health probes on {side}" in server.output())
        async with httpx.AsyncClient(base_url=side, timeout=5) as client:
            assert (await client.get("/__lbheartbeat__")).status_code == 200
            heartbeat = await client.get("/__heartbeat__")
            assert heartbeat.json() == {"broker": "connected", "node": "localhost"}
            assert (await client.get("/__version__")).json()["source"] == "quart_events"
            assert (await client.get("/api/events/v1/ping")).json()["alive"] is True
            for elsewhere in ("/metrics", "/api/events/v1/connect/?bindings=" + EMPTY, "/"):
                assert (await client.get(elsewhere)).status_code == 404, elsewhere
            assert (await client.get(f"{server.base}/__heartbeat__")).status_code == 200
            assert (await client.get(f"{server.base}/metrics")).status_code == 200
            proxy.cut()
            await wait_until(lambda: not server.stats()["broker_connected"])
            assert (await client.get("/__heartbeat__")).status_code == 503
            assert (await client.get("/__lbheartbeat__")).status_code == 200


def test_the_health_port_says_when_the_event_loop_has_stalled() -> None:
    """Its thread answers whatever the loop does, so it must tell a loop that never
    yields (that process serves nobody) from a busy one."""
    broker = Broker(load_settings("test").pulse)
    health = Health(broker, time.monotonic())
    assert health.answer("/__lbheartbeat__") == (200, {})
    health.last_turn -= STALLED_AFTER + 1
    status, body = health.answer("/__lbheartbeat__")
    assert status == 503 and body["event_loop"].startswith("stalled for 1")
    assert health.answer("/__heartbeat__") == (503, {"broker": "disconnected: reconnecting"})


async def test_a_stream_that_ends_is_logged_in_one_line_without_the_client_address(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    for with_address in (False, True):
        env = {"TC_EVENTS_SERVER__LOG_CLIENT_ADDRESS": str(with_address).lower()}
        with EventsServer.running(env) as server:
            bindings = [
                {"exchange": exchange.name, "routingKeyPattern": "a.#"},
                {"exchange": exchange.name, "routingKeyPattern": "b.#"},
            ]
            async with SSEReader(server.url(bindings)) as reader:
                await reader.wait_for("ready")
                await exchange.publish(aio_pika.Message(b"{}"), routing_key="a.x")
                await reader.wait_for("message")
            await wait_until(lambda s=server: "stream ended" in s.output())
            (line,) = [x for x in server.output().splitlines() if "stream ended" in x]
            assert re.fullmatch(
                r"tc-events: stream ended: client left, 2 bindings, \d+\.\d s, 1 messages"
                + (r", client 127\.0\.0\.1:\d+" if with_address else ""),
                line,
            ), line


async def test_production_logs_are_json_lines_and_the_settings_show_no_secret() -> None:
    env = {"TC_EVENTS_SERVER__HOST": "127.0.0.1", "PULSE_PASSWORD": "guest"}
    server = EventsServer.start(env, args=["--profile", "production"])
    try:
        async with SSEReader(server.url([])) as reader:
            await reader.wait_for("ready")
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.output().splitlines()]
    messages = [line["message"] for line in lines]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    settings_line = next(m for m in messages if m.startswith("settings: "))
    assert '"password": "**********"' in settings_line
    assert '"password": "guest"' not in server.output()
    assert any(m.startswith("stream ended: client left") for m in messages)


def test_metrics_can_be_turned_off_or_moved_to_a_port_of_their_own() -> None:
    with EventsServer.running({"TC_EVENTS_SERVER__METRICS": "false"}) as server:
        assert httpx.get(f"{server.base}/metrics").status_code == 404
    metrics_port = free_port()
    env = {"TC_EVENTS_SERVER__METRICS_PORT": str(metrics_port)}
    with EventsServer.running(env) as server:
        assert httpx.get(f"{server.base}/metrics").status_code == 404
        moved = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert moved.status_code == 200 and "tc_events_streams_open 0.0" in moved.text
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/__heartbeat__").status_code == 404


async def test_log_level_warning_leaves_out_the_info_lines() -> None:
    with EventsServer.running(args=["--log-level", "warning"]) as server:
        async with SSEReader(server.url([])) as reader:
            await reader.wait_for("ready")
    assert "listening on" not in server.output() and "stream ended" not in server.output()


def test_the_health_port_answers_bad_requests_and_outlasts_a_silent_client() -> None:
    health_port = free_port()
    with EventsServer.running({"TC_EVENTS_SERVER__HEALTH_PORT": str(health_port)}):

        def ask(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", health_port), 10) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
                return answer

        assert ask(b"POST /__heartbeat__ HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert ask(b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert ask(b"GET /" + b"x" * 9000).startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", health_port), 10):  # says nothing
            answer = ask(b"GET /__lbheartbeat__?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = answer.split(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and json.loads(body) == {}
        assert b"Python" not in head


def test_the_parents_health_answers_count_the_workers_that_beat() -> None:
    pulses = [Pulse(time.monotonic()) for _ in range(2)]
    try:
        health = WorkersHealth(lambda: [*pulses, None])  # a third worker is down
        assert health.answer("/__lbheartbeat__") == (503, {"workers": 0})
        for pulse, beat in zip(pulses, (b"..+", b"+-"), strict=True):
            os.write(pulse.write_end, beat)
            pulse.silent_for(time.monotonic())
        counts = {"workers": 2, "workers_connected": 1}
        assert health.answer("/__lbheartbeat__") == (200, {"workers": 2})
        assert health.answer("/__heartbeat__") == (
            503,
            {"broker": "disconnected: reconnecting", **counts},
        )
        os.write(pulses[1].write_end, b"+")
        pulses[1].silent_for(time.monotonic())
        assert health.answer("/__heartbeat__")[0] == 200
        pulses[0].last_beat -= STALLED_AFTER + 1
        assert health.answer("/__lbheartbeat__") == (200, {"workers": 1})
    finally:
        for pulse in pulses:
            pulse.close()
            os.close(pulse.write_end)
