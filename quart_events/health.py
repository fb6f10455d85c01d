"""The health probes' answers, and a port of their own (``server.health_port``).

On the main port a probe waits behind whatever came before it: a crowd of new streams
in the listen queue (4 s, measured with 100,000 streams coming), a message written to
16,000 streams in one loop turn. The health port has a queue of its own, and a thread
answers it, not the event loop:

- with several workers, a thread of the parent, which serves nothing else: it answers
  for all workers from their beats (``liveness.py``: each beat says whether that
  worker's broker link is up), whatever load the workers are under;
- with one process, a thread of that process. It must take the interpreter's lock
  from a busy loop for each system call (up to a switch interval, 5 ms, each), so it
  answers in milliseconds when the process has a core, and in up to 300 ms when six
  busy workers share two (measured): run several workers for large counts anyway.

Either tells whether the event loops still turn: ``/__lbheartbeat__`` answers ``503``
once no loop has for ``STALLED_AFTER`` seconds (a loop that never yields serves
nobody, however alive a thread is).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from importlib import metadata
from typing import Any, Protocol

from .broker import Broker
from .liveness import Pulse

PATHS = ("/__lbheartbeat__", "/__heartbeat__", "/__version__", "/api/events/v1/ping")
VERSION = {"version": metadata.version("quart_events"), "source": "quart_events"}
TURN_INTERVAL = 0.5  # seconds between two marks of the event loop's turning
STALLED_AFTER = 10.0  # seconds without a mark before the loop counts as stalled
ACCEPT_POLL = 0.2  # seconds between two looks at whether the port is closing
MAX_HEAD = 8192  # bytes of a probe's request head
REQUEST_TIMEOUT = 2.0  # seconds a probe's connection may take to send its request


class Answers(Protocol):
    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for a probe of ``path`` (one of ``PATHS``)."""
        ...


class Health:
    """What each probe of a serving process answers (status and JSON body), on either
    of its ports."""

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


class WorkersHealth:
    """What the parent of several workers answers on the health port, for all of them:
    from their beats (``pulses`` gives each worker's, ``None`` while it is down)."""

    def __init__(self, pulses: Callable[[], list[Pulse | None]]) -> None:
        self.pulses = pulses
        self.started_at = time.monotonic()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        beating = [
            pulse
            for pulse in self.pulses()
            if pulse is not None and pulse.beaten and now - pulse.last_beat <= STALLED_AFTER
        ]
        if path == "/__lbheartbeat__":
            return (200 if beating else 503), {"workers": len(beating)}
        if path == "/__heartbeat__":  # readiness: every serving worker's link is up
            connected = sum(pulse.connected for pulse in beating)
            counts = {"workers": len(beating), "workers_connected": connected}
            if beating and connected == len(beating):
                return 200, {"broker": "connected", **counts}
            return 503, {"broker": "disconnected: reconnecting", **counts}
        if path == "/__version__":
            return 200, VERSION
        return 200, {"alive": True, "uptime": now - self.started_at}


class HealthPort:
    """The health port's thread: one probe at a time, each in four system calls
    (accept, receive, send, close). In a worker every call gives the interpreter's lock
    back, and taking it again from a busy event loop can take a switch interval."""

    def __init__(self, listener: socket.socket, health: Answers) -> None:
        self.listener = listener
        self.health = health
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="health-port", daemon=True)

    def start(self) -> None:
        self.listener.settimeout(ACCEPT_POLL)
        self.thread.start()

    def stop(self) -> None:
        """Within ``ACCEPT_POLL``; the listener is closed."""
        self.stopping = True
        self.thread.join()
        self.listener.close()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # out of descriptors, or a connection reset before accept
                time.sleep(ACCEPT_POLL)
                continue
            with connection:
                connection.settimeout(REQUEST_TIMEOUT)
                with contextlib.suppress(OSError):  # gone, or silent for too long
                    connection.sendall(self._answer(connection))

    def _answer(self, connection: socket.socket) -> bytes:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = connection.recv(MAX_HEAD)
            head += chunk
            if not chunk or len(head) > MAX_HEAD:
                return _response(400, {"error": "incomplete request"})
        words = head.split(b"\r\n", 1)[0].split(b" ")
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return _response(400, {"error": "malformed request line"})
        if words[0] != b"GET":
            return _response(405, {"error": "only GET"})
        path = words[1].split(b"?", 1)[0].rstrip(b"/").decode("latin-1")
        if path not in PATHS:
            return _response(404, {"error": "not found"})
        return _response(*self.health.answer(path))


def _response(status: int, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s"
        % (status, HTTPStatus(status).phrase.encode(), len(data), data)
    )
