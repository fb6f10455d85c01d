"""Every common SSE client comes back after a shutdown, and no `message` handler sees
the shutdown frame: the npm `eventsource` package (2.x and 3.x, installed from the
npm registry into a temporary directory) and Python's httpx-sse (through
`tc-events listen`, in test_tools.py). Browsers: test_shutdown.py.

The server is stopped (SIGTERM) and a new one started on the same port; the client
must reconnect by itself, get a fresh `ready`, and then the next message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from helpers import EventsServer, NodeClient, free_port, npm_modules, publish, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def node_modules() -> Iterator[Path]:
    """npm `eventsource` 2.x and 3.x, side by side (as es2 and es3)."""
    with npm_modules("es2@npm:eventsource@2", "es3@npm:eventsource@3") as modules:
        yield modules


@pytest.mark.parametrize("module", ["es2", "es3"])
async def test_npm_eventsource_comes_back_after_a_shutdown(
    node_modules: Path, module: str, exchange: aio_pika.abc.AbstractExchange
) -> None:
    port = free_port()
    env = {"TC_EVENTS_SERVER__RETRY_MIN_MS": "1500", "TC_EVENTS_SERVER__RETRY_MAX_MS": "2000"}
    first = EventsServer.start(env, port=port)
    second = None
    client = NodeClient(
        node_modules, module, first.url([{"exchange": exchange.name, "routingKeyPattern": "#"}])
    )
    reading = asyncio.ensure_future(client.collect())
    try:
        await wait_until(lambda: "ready" in client.kinds(), timeout=20)
        assert await asyncio.to_thread(first.stop) == 0
        second = EventsServer.start(port=port)  # the next instance, on the same address
        await wait_until(lambda: client.kinds().count("ready") == 2, timeout=20)
        await publish(exchange, "after", b'{"after": "restart"}')
        await wait_until(lambda: "message" in client.kinds(), timeout=10)
        (message,) = [line for line in client.lines if line["kind"] == "message"]
        assert json.loads(message["data"])["payload"] == {"after": "restart"}
        # `onmessage` hears the message events (their type is "message"), never the shutdown.
        assert client.kinds().count("onmessage") == 1
        assert client.kinds().count("open") == 2
    finally:
        client.stop()
        first.stop()
        if second is not None:
            second.stop()
        await asyncio.gather(reading, return_exceptions=True)
