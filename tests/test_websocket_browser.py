"""Chromium's own WebSocket speaks Taskcluster's 2026 protocol to the server, from a page of
the server's origin (its `Origin` header is the browser's, as the UI's is), and one from
an origin the server does not list is refused."""

from __future__ import annotations

import time
from typing import Any

import aio_pika
import pytest
from browser import driven_chromium
from helpers import EventsServer, publish

pytestmark = [pytest.mark.broker, pytest.mark.browser]

OPEN = """
const [url, exchange] = arguments;
window.heard = [];
const socket = new WebSocket(url);
window.socket = socket;
socket.onopen = () => socket.send(JSON.stringify({type: "connection_init"}));
socket.onclose = (event) => window.heard.push({type: "close", code: event.code});
socket.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  window.heard.push(frame);
  if (frame.type === "connection_ack") {
    socket.send(JSON.stringify({type: "subscribe", bindings: [{exchange, pattern: "#"}]}));
  }
};
"""


def heard(driver: Any, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        frames: list[dict[str, Any]] = driver.execute_script("return window.heard")
        if len(frames) >= count or time.monotonic() > deadline:
            return frames
        time.sleep(0.1)


async def test_chromiums_websocket_subscribes_and_gets_messages(
    server: EventsServer, exchange: aio_pika.abc.AbstractExchange
) -> None:
    with driven_chromium() as driver:
        driver.get(server.base + "/")  # a page of the server's own origin
        driver.execute_script(OPEN, f"ws://127.0.0.1:{server.port}/subscription/raw", exchange.name)
        frames = heard(driver, 2)
        assert [frame["type"] for frame in frames] == ["connection_ack", "subscribe_ack"], frames
        await publish(exchange, "from.the.broker", b'{"to": "chromium"}', {"CC": ["route.x"]})
        frames = heard(driver, 3)
        assert frames[2]["type"] == "data"
        assert frames[2]["subscriptionId"] == frames[1]["subscriptionId"]
        assert frames[2]["message"]["payload"] == {"to": "chromium"}
        assert frames[2]["message"]["cc"] == ["route.x"]


async def test_a_page_of_an_origin_not_listed_cannot_open_one(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    env = {"TC_EVENTS_SERVER__WEBSOCKET_ALLOWED_ORIGINS": '["https://ui.example"]'}
    with EventsServer.running(env) as server, driven_chromium() as driver:
        driver.get(server.base + "/")  # Origin: http://127.0.0.1:<port>, not listed
        driver.execute_script(OPEN, f"ws://127.0.0.1:{server.port}/subscription/raw", exchange.name)
        frames = heard(driver, 1)
        assert frames == [{"type": "close", "code": 1006}]  # the upgrade got 403
        assert server.stats()["connections"] == 0
