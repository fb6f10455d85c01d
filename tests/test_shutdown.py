"""Shutdown, seen by a browser (headless Chromium and its EventSource).

On SIGTERM, SIGINT or SIGHUP every stream ends with an empty id and a jittered `retry`, the
process exits 0, and the browser reconnects by itself, without Last-Event-ID, to the
next server on the port and gets a fresh `ready`. A stream that ended with an
`error`, by contrast, is answered 204 on reconnect and the EventSource stops.

(The npm `eventsource` package is not used: its parser drops a frame that has an id
but no data, so it keeps the old id and would be answered 204 after a shutdown.)
"""

from __future__ import annotations

import asyncio
import json
import signal

import aio_pika
import pytest
from browser import Browser
from helpers import EventsServer, free_port, queues_of

pytestmark = [pytest.mark.broker, pytest.mark.browser]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_shutdown_sends_clients_to_the_next_server(
    exchange: aio_pika.abc.AbstractExchange, sig: signal.Signals
) -> None:

    port = free_port()
    env = {"TC_EVENTS_SERVER__RETRY_MIN_MS": "1500", "TC_EVENTS_SERVER__RETRY_MAX_MS": "2500"}
    first = EventsServer.start(env, port=port)
    second = None
    try:
        url = first.url([{"exchange": exchange.name, "routingKeyPattern": "#"}])
        with Browser.following(url) as client:
            await client.wait_for("ready")
            # A clean end (exit 0); a hang would be killed after the helper's 20 s (-9).
            code = await asyncio.to_thread(first.stop, sig)
            assert code == 0, first.output()
            assert not queues_of(first.namespace, every=True)  # the broker connection was closed
            second = EventsServer.start(port=port)  # "another instance", on the same address
            await client.wait_for("ready", 2)
            await exchange.publish(aio_pika.Message(b'{"after": "restart"}'), routing_key="x")
            await client.wait_for("message")
            assert client.kinds().count("open") == 2
            message = next(line for line in client.reports if line["kind"] == "message")
            assert json.loads(message["data"])["payload"] == {"after": "restart"}
            reconnect_gap = next(
                line["time"] for line in client.reports[::-1] if line["kind"] == "open"
            ) - next(line["time"] for line in client.reports if line["kind"] == "error")
            assert reconnect_gap >= 1000  # the client waited for the server's retry
        assert "Traceback" not in first.output()
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_stream_that_ended_with_an_error_is_not_retried(server: EventsServer) -> None:
    url = server.url([{"exchange": "exchange/test/none-such", "routingKeyPattern": "#"}])
    with Browser.following(url) as client:
        await client.wait_for("error", 2)  # the error event, then the end of the stream
        await asyncio.sleep(5)  # the browser's reconnect: Last-Event-ID "-" is answered 204
        closed = [line for line in client.reports if line["kind"] == "error"][-1]
        assert closed["readyState"] == 2  # CLOSED: the EventSource gave up
        # The error event, the end of the stream (CONNECTING), the 204 (CLOSED); no reopen.
        assert client.kinds() == ["open", "error", "error", "error"]
        assert "does not exist" in client.reports[1]["data"]
