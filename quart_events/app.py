"""The application: the service's parts wired together, its lifecycle, and serving under hypercorn.

Streams end themselves on shutdown: the shutdown trigger finishes every stream
with a reconnect frame before hypercorn waits for connections, because hypercorn
would otherwise wait for open streams (or cut them) instead of ending them cleanly.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart, Response, send_file

from . import mends
from .broker import Broker
from .connect import ConnectEndpoint
from .descriptors import DescriptorWatch
from .errors import ListenFailed
from .hub import Hub
from .liveness import LIVENESS_FD, beat
from .metrics import CONTENT_TYPE, Metrics
from .settings import Settings
from .shared_bindings import SharedBindings
from .timer import every

log = logging.getLogger(__name__)

STATS_PATH = "/api/events/v1/__stats__"
METRICS_PATH = "/metrics"
METRICS_FLUSH_INTERVAL = 1.0  # seconds: how stale a scrape of another worker may be
VERSION = {"version": metadata.version("quart_events"), "source": "quart_events"}
STATIC = Path(__file__).parent / "static"
# The inspector page loads only its own files and opens streams of this service.
INSPECTOR_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Young passes every 10,000 allocations instead of 700; the older generations keep
# Python's rhythm, because a closed connection is cyclic garbage (asyncio's and
# hypercorn's objects) that only a full pass frees (tests/test_churn.py).
GC_THRESHOLDS = (10_000, 10, 10)  # Python's defaults: (700, 10, 10)
LISTEN_BACKLOG = 4096  # thousands of EventSources reconnect at once after a restart


@dataclass
class Service:
    """The parts that live as long as the process, started and stopped together."""

    settings: Settings
    broker: Broker
    shared: SharedBindings
    hub: Hub
    metrics: Metrics
    started_at: float = field(default_factory=time.monotonic)
    timers: list[asyncio.Task[None]] = field(default_factory=list)
    descriptors: DescriptorWatch | None = None  # set when serving: the open files limit

    async def start(self) -> None:
        """Connect to the broker and start the timers; raise ``BrokerUnavailable``. Idempotent."""
        if self.timers:
            return
        tune_garbage_collector()
        self.shared.start()
        try:
            await self.broker.start(connect_in_background=self.settings.pulse.start_without_broker)
        except BaseException:
            await self.shared.stop()
            raise
        self.timers = [
            asyncio.ensure_future(every(self.settings.server.ping_interval, self.tick)),
            asyncio.ensure_future(every(METRICS_FLUSH_INTERVAL, self.flush_metrics)),
        ]

    async def tick(self, lateness: float) -> None:
        self.metrics.tick_lateness.observe(lateness)
        if self.descriptors is not None:
            self.descriptors.check()
        self.hub.drop_stuck_streams()
        self.hub.budget.give_back()
        self.hub.tell_of_drops()
        await self.hub.ping_streams()

    def flush_metrics(self, lateness: float = 0.0) -> None:
        broker = self.broker
        self.metrics.flush(
            self.hub.counts,
            len(self.hub.streams),
            len(self.shared),
            broker.is_connected,
            broker.reconnects,
        )

    async def stop(self) -> None:
        timers, self.timers = self.timers, []
        if not timers:
            return
        self.hub.begin_shutdown()
        for timer in timers:
            timer.cancel()
        await self.shared.stop()
        await self.broker.close()
        self.flush_metrics()


def tune_garbage_collector() -> None:
    """Each delivery allocates many short-lived objects (aiormq's frames, a task), so
    at Python's default thresholds a young pass runs every few messages and a full pass,
    which walks every object a server of thousands of connections holds, often. What
    exists at start (modules, settings) is frozen out of every pass, and young passes
    run every ``GC_THRESHOLDS[0]`` allocations (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def service_of(app: Quart) -> Service:
    service: Service = app.extensions["tc_events"]
    return service


def create_app(settings: Settings, reload: Callable[[], Settings] | None = None) -> Quart:
    """The service; ``reload`` reads the settings again (credentials on each reconnect)."""
    metrics = Metrics()
    broker = Broker(settings.pulse, (lambda: reload().pulse) if reload else None)
    shared = SharedBindings(broker)
    hub = Hub(settings.server, shared, settings.pulse, metrics)
    # The wires: deliveries flow from the broker to the hub; the broker's answers about
    # bindings reach the hub through the shared bindings; a new connection restores.
    broker.on_delivery = hub.deliver
    broker.on_connected = hub.reconnected
    broker.on_dropped = hub.dropped
    broker.on_confirmed = hub.confirmed
    shared.on_settled = hub.settled
    service = Service(settings, broker, shared, hub, metrics)

    app = Quart(__name__, static_folder=str(STATIC))
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = None  # revalidated: a new version shows at once
    app.extensions["tc_events"] = service
    app.before_serving(service.start)
    app.after_serving(service.stop)
    _add_plain_routes(app, service)
    # Requests reach the connect endpoint first; everything else goes on to Quart.
    app.asgi_app = ConnectEndpoint(app.asgi_app, hub, settings.server)  # type: ignore[method-assign]
    return app


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status, {"Content-Type": "application/json"})


def _add_plain_routes(app: Quart, service: Service) -> None:
    """Stats, health and metrics: small answers, nothing about addresses or users."""
    hub, broker = service.hub, service.broker

    async def stats() -> Response:
        """Counts of this process, for operators and tests."""
        return _json(
            {
                **hub.stats(),
                "broker_connected": broker.is_connected,
                "broker_reconnects": broker.reconnects,
                "tasks": len(asyncio.all_tasks()),
                "rss_bytes": _rss_bytes(),
            }
        )

    async def lbheartbeat() -> Response:
        """For a load balancer: the process serves."""
        return _json({})

    async def heartbeat() -> Response:
        """For a readiness probe: 503 while the broker connection is down."""
        if broker.is_connected:
            return _json({"broker": "connected", "node": broker.node})
        return _json({"broker": "disconnected: reconnecting"}, 503)

    async def version() -> Response:
        return _json(VERSION)

    async def ping() -> Response:
        """As every Taskcluster service answers it."""
        return _json({"alive": True, "uptime": time.monotonic() - service.started_at})

    async def inspector() -> Response:
        """The inspector page; its scripts and styles are Quart's static files."""
        response = await send_file(STATIC / "inspector.html")
        response.headers["Content-Security-Policy"] = INSPECTOR_POLICY
        response.headers["Cache-Control"] = "no-cache"
        return response

    for path, view in (
        (STATS_PATH, stats),
        ("/__lbheartbeat__", lbheartbeat),
        ("/__heartbeat__", heartbeat),
        ("/__version__", version),
        ("/api/events/v1/ping", ping),
        ("/", inspector),
    ):
        app.add_url_rule(path, view_func=view, methods=["GET"], strict_slashes=False)
    server = service.settings.server
    if server.metrics and server.metrics_port is None:
        app.add_url_rule(METRICS_PATH, view_func=metrics_view(service), methods=["GET"])


def metrics_view(service: Service) -> Callable[[], Awaitable[Response]]:
    async def metrics() -> Response:
        service.flush_metrics()
        text = service.metrics.exposition()
        return Response(text, headers={"Content-Type": CONTENT_TYPE})

    return metrics


def metrics_app(service: Service) -> Quart:
    """The app of the metrics port, when it has one: ``/metrics`` and nothing else."""
    app = Quart(f"{__name__}.metrics", static_folder=None)
    app.add_url_rule(METRICS_PATH, view_func=metrics_view(service), methods=["GET"])
    return app


def _rss_bytes() -> int:
    """Resident memory of this process (Linux), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


TLS_HANDSHAKE_TIMEOUT = 5.0  # seconds a TLS client has to complete its handshake


def hypercorn_config(settings: Settings, listener: socket.socket) -> HypercornConfig:
    config = HypercornConfig()
    # hypercorn closes the socket it is given: give it its own descriptor of ours.
    config.bind = [f"fd://{os.dup(listener.fileno())}"]
    config.backlog = LISTEN_BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = settings.server.shutdown_grace
    # A TLS client that never sends its ClientHello holds a descriptor this long (60 s
    # by default): long enough for a few hundred idle connections to starve the rest.
    config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
    # Room for a long request line (Taskcluster clients' bindings are ~2 KB each) plus headers.
    config.h11_max_incomplete_size = settings.server.max_request_line + 16 * 1024
    if settings.server.certfile is not None and settings.server.keyfile is not None:
        # TLS, and HTTP/2 by ALPN for clients that ask (a browser holds only six HTTP/1.1
        # connections per origin: a page with several streams needs HTTP/2).
        config.certfile = str(settings.server.certfile)
        config.keyfile = str(settings.server.keyfile)
    return config


def listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening socket; with ``reuse_port`` one of several (workers) on the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server(
        (host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port
    )


async def serve_app(app: Quart, reuse_port: bool = False, open_files: int | None = None) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP, then end every stream and stop.

    The broker is connected and the socket bound before hypercorn starts, so an
    unreachable broker or a taken port surfaces here (``BrokerUnavailable``,
    ``ListenFailed``) rather than as hypercorn's ``LifespanFailureError``, and the
    "listening" line is only printed when it is true.
    """
    service = service_of(app)
    server, pulse = service.settings.server, service.settings.pulse
    mends.install()
    await service.start()
    listeners = []
    scheme = "https" if server.certfile is not None else "http"
    wanted = [(f"{scheme}://{server.host}:{server.port}", server.port)]
    if server.metrics and server.metrics_port is not None:
        wanted.append((f"http://{server.host}:{server.metrics_port}", server.metrics_port))
    for where, port in wanted:
        try:
            listeners.append(listen(server.host, port, reuse_port))
        except OSError as error:
            for listener in listeners:
                listener.close()
            await service.stop()
            raise ListenFailed(f"cannot listen on {where}: {error.strerror or error}") from error
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # Accepted sockets inherit it (Linux): a client that vanished, or that stopped
        # reading for good, makes writes fail after write_timeout, and the kernel
        # frees the connection that hypercorn would otherwise keep waiting to flush.
        timeout_ms = int(server.write_timeout * 1000)
        listeners[0].setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
    host, port = listeners[0].getsockname()[:2]
    open_files = open_files or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    service.descriptors = DescriptorWatch(open_files)
    log.info(
        "listening on %s://%s:%s, RabbitMQ node %s vhost %s, queue %s, "
        "open files limit %d, at most %d streams",
        scheme,
        host,
        port,
        service.broker.node or "(not connected yet)",
        pulse.vhost,
        service.broker.queue_name or "(none yet)",
        open_files,
        server.max_streams,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    liveness = os.environ.pop(LIVENESS_FD, None)  # a worker: its parent hears it beat
    beating = asyncio.ensure_future(beat(int(liveness))) if liveness else None
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: as SIGTERM
        loop.add_signal_handler(signum, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info("shutting down: ending %d streams", len(service.hub.streams))
        service.hub.begin_shutdown()

    servers = [
        serve(
            app, hypercorn_config(service.settings, listeners[0]), shutdown_trigger=shutdown_trigger
        )
    ]
    if len(listeners) > 1:
        log.info("metrics on http://%s:%s%s", host, listeners[1].getsockname()[1], METRICS_PATH)
        config = hypercorn_config(service.settings, listeners[1])
        servers.append(serve(metrics_app(service), config, shutdown_trigger=stop.wait))
    try:
        await asyncio.gather(*servers)
    finally:
        if beating is not None:
            beating.cancel()
        for listener in listeners:
            listener.close()
