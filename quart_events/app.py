"""The application: the service's parts made and wired together in one factory, and
the plain routes (stats, health, metrics, the inspector page). Its lifecycle is in
``service.py``; serving it under hypercorn in ``serve.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Quart, Response, send_file

from .broker import Broker
from .connect import ConnectEndpoint
from .health import PATHS as HEALTH_PATHS
from .history import History
from .hub import Hub
from .legacy_websocket import PATHS as LEGACY_PATHS
from .legacy_websocket import LegacySocket
from .metrics import CONTENT_TYPE, WEBSOCKET_PROTOCOLS, Counts, EndReason, Metrics
from .service import Service
from .settings import ServerSettings, Settings
from .shared_bindings import SharedBindings
from .subscribers import Subscribers
from .tc_websocket import PATHS as TC_PATHS
from .tc_websocket import TaskclusterSocket
from .websocket import WebSocketConnection, deny

log = logging.getLogger(__name__)

STATS_PATH = "/api/events/v1/__stats__"
METRICS_PATH = "/metrics"
METRICS_FLUSH_INTERVAL = 1.0  # seconds: how stale a scrape of another worker may be
STATIC = Path(__file__).parent / "static"
# The inspector page loads only its own files and opens streams of this service.
INSPECTOR_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def service_of(app: Quart) -> Service:
    service: Service = app.extensions["tc_events"]
    return service


def create_app(
    settings: Settings, reload: Callable[[], Settings] | None = None, *, lifecycle: bool = True
) -> Quart:
    """The service; ``reload`` reads the settings again (credentials on each reconnect).

    With ``lifecycle`` the app's serving hooks start and stop the service (an ASGI
    server's lifespan, Quart's test app); ``serve_app`` starts and stops it itself,
    before its sockets and after its last connection, so it takes ``lifecycle=False``.
    """
    metrics = Metrics()
    counts = Counts()
    broker = Broker(settings.pulse, (lambda: reload().pulse) if reload else None)
    shared = SharedBindings(broker)
    hub = Hub(settings.server, shared, settings.pulse, metrics, counts)
    # The hub hears the broker (deliveries, connections, drops, the link's answers) and
    # the shared bindings (the broker's answer for each binding).
    broker.attach(hub)
    shared.attach(hub)
    subscribers = Subscribers(hub, settings.server, metrics)
    history = History(settings.pulse, settings.history)
    app = Quart(__name__, static_folder=str(STATIC))
    # Requests reach the SSE endpoint first, then the WebSocket routes; the rest, Quart.
    sockets = WebSocketRoutes(app.asgi_app, subscribers, settings.server, metrics, history)
    endpoint = ConnectEndpoint(sockets, subscribers, settings.server, counts, history)
    service = Service(settings, broker, shared, hub, metrics, history, websockets=sockets.stats)

    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = None  # revalidated: a new version shows at once
    app.extensions["tc_events"] = service
    if lifecycle:
        app.before_serving(service.start)
        app.after_serving(service.stop)
    _add_plain_routes(app, service)
    app.asgi_app = endpoint  # type: ignore[method-assign]
    return app


class WebSocketRoutes:
    """WebSocket upgrades: Taskcluster's two protocols by path, 404 on any other path;
    every other request goes on to ``app``. Counts its sockets by protocol."""

    def __init__(
        self,
        app: ASGIFramework,
        subscribers: Subscribers,
        settings: ServerSettings,
        metrics: Metrics,
        history: History,
    ):
        self.app = app
        self.subscribers = subscribers
        self.settings = settings
        self.metrics = metrics
        self.history = history
        self.open: set[WebSocketConnection] = set()
        self.frames_of_ended = dict.fromkeys(WEBSOCKET_PROTOCOLS, 0)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per protocol: open sockets, their subscriptions, message frames so far."""
        figures = {
            protocol: {"open": 0, "subscriptions": 0, "frames": frames}
            for protocol, frames in self.frames_of_ended.items()
        }
        for connection in self.open:
            mine = figures[connection.protocol]
            mine["open"] += 1
            mine["subscriptions"] += len(connection.carried)
            mine["frames"] += connection.messages
        return figures

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        parts = (scope, send, self.subscribers, self.settings)
        connection: WebSocketConnection
        if path in TC_PATHS:
            connection = TaskclusterSocket(TC_PATHS[path], self.history, *parts)
        elif path.rstrip("/") in LEGACY_PATHS:
            connection = LegacySocket(*parts)
        else:
            await receive()  # websocket.connect
            await deny(send, 404, "No WebSocket is served at this path.\n")
            return
        self.open.add(connection)
        try:
            await connection.serve(receive)
        finally:
            self.open.discard(connection)
            self.frames_of_ended[connection.protocol] += connection.messages
            reason = connection.outbox.end_reason or EndReason.CLIENT_LEFT
            self.metrics.websockets_ended.labels(connection.protocol, reason).inc()


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
                "websockets": service.websockets(),
                "history": service.history.stats(),
                "broker_connected": broker.is_connected,
                "broker_reconnects": broker.reconnects,
                "tasks": len(asyncio.all_tasks()),
                "rss_bytes": _rss_bytes(),
            }
        )

    async def inspector() -> Response:
        """The inspector page; its scripts and styles are Quart's static files."""
        response = await send_file(STATIC / "inspector.html")
        response.headers["Content-Security-Policy"] = INSPECTOR_POLICY
        response.headers["Cache-Control"] = "no-cache"
        return response

    for path, view in ((STATS_PATH, stats), ("/", inspector)):
        app.add_url_rule(path, view_func=view, methods=["GET"], strict_slashes=False)
    _add_health_routes(app, service)
    server = service.settings.server
    if server.metrics and server.metrics_port is None:
        app.add_url_rule(METRICS_PATH, view_func=metrics_view(service), methods=["GET"])


def _add_health_routes(app: Quart, service: Service) -> None:
    """The probes' answers on the main port (``server.health_port``: ``health.py``)."""
    for path in HEALTH_PATHS:

        async def probe(path: str = path) -> Response:
            status, body = service.health.answer(path)
            return _json(body, status)

        app.add_url_rule(
            path, endpoint=path, view_func=probe, methods=["GET"], strict_slashes=False
        )


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
