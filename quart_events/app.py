"""The Quart application: the connect route, its lifecycle, and ``run`` under hypercorn.

Streams end themselves on shutdown: the shutdown trigger finishes every stream
with a reconnect frame before hypercorn waits for connections, because hypercorn
would otherwise wait for open streams (or cut them) instead of ending them cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart, Response, request

from . import sse
from .bindings import BindingError, parse_bindings
from .broker import Broker
from .hub import Hub, Stream
from .settings import Settings

log = logging.getLogger(__name__)

CONNECT_PATHS = ("/api/events/v1/connect/", "/events/v1/connect/")
STATS_PATH = "/api/events/v1/__stats__"
STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass
class Service:
    """What the app holds between requests."""

    settings: Settings
    broker: Broker
    hub: Hub
    started: bool = False

    async def start(self) -> None:
        """Connect to the broker and start pinging; raise ``BrokerUnavailable``. Idempotent."""
        if self.started:
            return
        await self.broker.start(wait=self.settings.pulse.start_without_broker)
        self.hub.start()
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        self.hub.begin_shutdown()
        await self.hub.stop()
        await self.broker.close()


def service_of(app: Quart) -> Service:
    service: Service = app.extensions["tc_events"]
    return service


def create_app(settings: Settings, reload: Callable[[], Settings] | None = None) -> Quart:
    """The service; ``reload`` reads the settings again (credentials on each reconnect)."""
    app = Quart(__name__)
    broker = Broker(settings.pulse, (lambda: reload().pulse) if reload else None)
    service = Service(settings, broker, Hub(settings.server, broker))
    app.extensions["tc_events"] = service
    server = settings.server

    app.before_serving(service.start)
    app.after_serving(service.stop)

    def cors(headers: dict[str, str]) -> dict[str, str]:
        return {**headers, "Access-Control-Allow-Origin": server.cors_allow_origin}

    async def connect() -> Response:
        if "Last-Event-ID" in request.headers:
            # An EventSource reconnecting after the stream ended: tell it to stop.
            return Response(b"", status=204, headers=cors({}))
        request_line = len(request.scope["raw_path"]) + len(request.scope["query_string"])
        if request_line > server.max_request_line:
            return Response(
                f"Request line too long: at most {server.max_request_line} bytes.\n",
                status=414,
                headers=cors({"Content-Type": "text/plain"}),
            )
        try:
            bindings = parse_bindings(request.args.get("bindings"), server.limits())
        except BindingError as error:
            return _stream_response(_one_frame(sse.error(str(error))), cors(STREAM_HEADERS))
        if len(service.hub.streams) >= server.max_streams:
            retry_after = str(random.randint(5, 30))  # jittered, so refused clients spread out
            return Response(
                "Too many streams on this server; retry later.\n",
                status=503,
                headers=cors({"Content-Type": "text/plain", "Retry-After": retry_after}),
            )
        return _stream_response(_events(service.hub, bindings), cors(STREAM_HEADERS))

    async def stats() -> Response:
        """Counts for operators and tests; nothing about the broker's address or users."""
        body = {
            **service.hub.stats(),
            "broker_connected": broker.is_connected,
            "tasks": len(asyncio.all_tasks()),
            "rss_bytes": _rss_bytes(),
        }
        return Response(json.dumps(body), headers={"Content-Type": "application/json"})

    app.add_url_rule(STATS_PATH, view_func=stats, methods=["GET"], strict_slashes=False)
    for path in CONNECT_PATHS:
        app.add_url_rule(
            path, view_func=connect, methods=["GET"], strict_slashes=False, endpoint=path
        )
    return app


def _rss_bytes() -> int:
    """Resident memory of this process (Linux), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _stream_response(body: AsyncIterator[bytes], headers: dict[str, str]) -> Response:
    response = Response(body, status=200)
    response.headers.update(headers)  # exactly text/event-stream: no charset appended
    response.timeout = None  # Quart would otherwise cut the stream after 60 s, silently
    return response


async def _one_frame(frame: bytes) -> AsyncIterator[bytes]:
    yield frame


async def _events(hub: Hub, bindings: list) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
    # The stream is opened inside the generator: if the client leaves before the
    # body starts, nothing was registered and nothing can leak.
    stream: Stream = hub.open(bindings)
    stream.task = asyncio.current_task()  # so a stuck write can be cancelled
    try:
        while (chunk := await stream.next_chunk()) is not None:
            yield chunk
    finally:
        hub.close(stream)


def hypercorn_config(settings: Settings, listener: socket.socket) -> HypercornConfig:
    config = HypercornConfig()
    # hypercorn closes the socket it is given: give it its own descriptor of ours.
    config.bind = [f"fd://{os.dup(listener.fileno())}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = settings.server.shutdown_grace
    # Room for a long request line (Taskcluster clients' bindings are ~2 KB each) plus headers.
    config.h11_max_incomplete_size = settings.server.max_request_line + 16 * 1024
    return config


async def serve_app(app: Quart) -> None:
    """Serve until SIGTERM or SIGINT, then end every stream and stop.

    The broker is connected and the socket bound before hypercorn starts, so an
    unreachable broker or a taken port surfaces here (``BrokerUnavailable``,
    ``OSError``) rather than as hypercorn's ``LifespanFailureError``, and the
    "listening" line is only printed when it is true.
    """
    service = service_of(app)
    server, pulse = service.settings.server, service.settings.pulse
    await service.start()
    try:
        listener = socket.create_server((server.host, server.port))
    except OSError:
        await service.stop()
        raise
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # Accepted sockets inherit it (Linux): a client that vanished, or that stopped
        # reading for good, makes writes fail after write_timeout, and the kernel
        # frees the connection that hypercorn would otherwise keep waiting to flush.
        timeout_ms = int(server.write_timeout * 1000)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
    with listener:
        host, port = listener.getsockname()[:2]
        log.info(
            "listening on http://%s:%s, RabbitMQ at %s:%s vhost %s, queue %s",
            host,
            port,
            pulse.hostname,
            pulse.port,
            pulse.vhost,
            service.broker.queue_name,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        async def shutdown_trigger() -> None:
            await stop.wait()
            log.info("shutting down: ending %d streams", len(service.hub.streams))
            service.hub.begin_shutdown()

        config = hypercorn_config(service.settings, listener)
        await serve(app, config, shutdown_trigger=shutdown_trigger)
