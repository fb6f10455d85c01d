"""The app through Quart's own test client, in process, against the real broker."""

from __future__ import annotations

import json
import urllib.parse
import uuid

import aio_pika
import pytest

from quart_events import create_app, load_settings

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
    assert b'"payload":{"x":1}' in received
    assert connection.status_code == 200
    assert connection.headers["Content-Type"] == "text/event-stream"
