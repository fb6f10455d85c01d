"""The health probes' answers, and a port of their own (``server.health_port``) served
by a thread of each process.

On the main port a probe waits behind whatever came before it: a crowd of new streams
in the listen queue (seconds, measured), one message written to 16,000 streams in one
loop turn. On the health port a thread answers it within the interpreter's switch
interval (5 ms) of whatever the event loop is doing, and tells whether that loop still
turns: ``/__lbheartbeat__`` answers ``503`` once it has not for ``STALLED_AFTER``
seconds (a loop that never yields serves nobody, however alive its thread is).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import metadata
from typing import Any

from .broker import Broker

PATHS = ("/__lbheartbeat__", "/__heartbeat__", "/__version__", "/api/events/v1/ping")
VERSION = {"version": metadata.version("quart_events"), "source": "quart_events"}
TURN_INTERVAL = 0.5  # seconds between two marks of the event loop's turning
STALLED_AFTER = 10.0  # seconds without a mark before the loop counts as stalled
REQUEST_TIMEOUT = 2.0  # seconds a probe's connection may take to send its request


class Health:
    """What each probe answers (status and JSON body), on either port."""

    def __init__(self, broker: Broker, started_at: float) -> None:
        self.broker = broker
        self.started_at = started_at
        self.last_turn = time.monotonic()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/__lbheartbeat__":  # a load balancer's: the process serves
            stalled = time.monotonic() - self.last_turn
            if stalled > STALLED_AFTER:
                return 503, {"event_loop": f"stalled for {stalled:.0f} s"}
            return 200, {}
        if path == "/__heartbeat__":  # readiness: 503 while the broker connection is down
            if self.broker.is_connected:
                return 200, {"broker": "connected", "node": self.broker.node}
            return 503, {"broker": "disconnected: reconnecting"}
        if path == "/__version__":
            return 200, VERSION
        # /api/events/v1/ping, as every Taskcluster service answers it
        return 200, {"alive": True, "uptime": time.monotonic() - self.started_at}

    async def mark_turns(self) -> None:
        """On the event loop: note that it turns, for the health port's thread."""
        while True:
            self.last_turn = time.monotonic()
            await asyncio.sleep(TURN_INTERVAL)


class _ProbeHandler(BaseHTTPRequestHandler):
    server: _ProbeServer
    timeout = REQUEST_TIMEOUT

    def version_string(self) -> str:
        return "tc-events"  # nothing about the interpreter in the Server header

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in PATHS:
            self.send_error(404)
            return
        status, body = self.server.health.answer(path)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # probes are not logged


class _ProbeServer(HTTPServer):
    def __init__(self, listener: socket.socket, health: Health) -> None:
        super().__init__(listener.getsockname()[:2], _ProbeHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener  # bound and listening already (SO_REUSEPORT with workers)
        self.health = health


class HealthPort:
    """The health port's thread: one probe at a time, each given ``REQUEST_TIMEOUT``."""

    def __init__(self, listener: socket.socket, health: Health) -> None:
        self.server = _ProbeServer(listener, health)
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.2,), name="health-port", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
