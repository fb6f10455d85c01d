"""The app through Quart's own test client, in process, against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.parse
import uuid

import aio_pika
import pytest

from quart_events import create_app, load_settings
from quart_events.app import service_of

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
    assert connection.status_code == 200
    assert connection.headers["Content-Type"] == "text/event-stream"


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
    assert connection.status_code == 200
    assert re.fullmatch(rb"id:\nretry: \d+\n\n", received), received
