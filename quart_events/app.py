"""The application: the service's parts wired together, its lifecycle, and serving under hypercorn.

Streams end themselves on shutdown: the shutdown trigger finishes every stream
with a reconnect frame before hypercorn waits for connections, because hypercorn
would otherwise wait for open streams (or cut them) instead of ending them cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from quart import Quart, Response

from .broker import Broker
from .connect import ConnectEndpoint
from .hub import Hub
from .settings import Settings
from .shared_bindings import SharedBindings
from .timer import every

log = logging.getLogger(__name__)

STATS_PATH = "/api/events/v1/__stats__"
LISTEN_BACKLOG = 4096  # thousands of EventSources reconnect at once after a restart


@dataclass
class Service:
    """The parts that live as long as the process, started and stopped together."""

    settings: Settings
    broker: Broker
    shared: SharedBindings
    hub: Hub
    timer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect to the broker and start the timer; raise ``BrokerUnavailable``. Idempotent."""
        if self.timer is not None:
            return
        self.shared.start()
        try:
            await self.broker.start(connect_in_background=self.settings.pulse.start_without_broker)
        except BaseException:
            await self.shared.stop()
            raise
        self.timer = asyncio.ensure_future(every(self.settings.server.ping_interval, self.tick))

    def tick(self) -> None:
        self.hub.drop_stuck_streams()
        self.hub.ping_streams()

    async def stop(self) -> None:
        timer, self.timer = self.timer, None
        if timer is None:
            return
        self.hub.begin_shutdown()
        timer.cancel()
        await self.shared.stop()
        await self.broker.close()


def service_of(app: Quart) -> Service:
    service: Service = app.extensions["tc_events"]
    return service


def create_app(settings: Settings, reload: Callable[[], Settings] | None = None) -> Quart:
    """The service; ``reload`` reads the settings again (credentials on each reconnect)."""
    broker = Broker(settings.pulse, (lambda: reload().pulse) if reload else None)
    shared = SharedBindings(broker)
    hub = Hub(settings.server, shared, settings.pulse.wait_for_broker)
    # The wires: deliveries flow from the broker to the hub; the broker's answers about
    # bindings reach the hub through the shared bindings; a new connection restores.
    broker.on_delivery = hub.deliver
    broker.on_connected = hub.reconnected
    shared.on_settled = hub.settled
    service = Service(settings, broker, shared, hub)

    app = Quart(__name__)
    app.extensions["tc_events"] = service
    app.before_serving(service.start)
    app.after_serving(service.stop)

    async def stats() -> Response:
        """Counts for operators and tests; nothing about the broker's address or users."""
        body = {
            **hub.stats(),
            "broker_connected": broker.is_connected,
            "tasks": len(asyncio.all_tasks()),
            "rss_bytes": _rss_bytes(),
        }
        return Response(json.dumps(body), headers={"Content-Type": "application/json"})

    app.add_url_rule(STATS_PATH, view_func=stats, methods=["GET"], strict_slashes=False)
    # Requests reach the connect endpoint first; everything else goes on to Quart.
    app.asgi_app = ConnectEndpoint(app.asgi_app, hub, settings.server)  # type: ignore[method-assign]
    return app


def _rss_bytes() -> int:
    """Resident memory of this process (Linux), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def hypercorn_config(settings: Settings, listener: socket.socket) -> HypercornConfig:
    config = HypercornConfig()
    # hypercorn closes the socket it is given: give it its own descriptor of ours.
    config.bind = [f"fd://{os.dup(listener.fileno())}"]
    config.backlog = LISTEN_BACKLOG
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
        family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
        listener = socket.create_server(
            (server.host, server.port), family=family, backlog=LISTEN_BACKLOG
        )
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
            pulse.amqp_port,
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
