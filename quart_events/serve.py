"""Serving under hypercorn: the listening sockets, signals, the mends, one start.

Streams end themselves on shutdown: the shutdown trigger finishes every stream
with a reconnect frame before hypercorn waits for connections, because hypercorn
would otherwise wait for open streams (or cut them) instead of ending them cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework
from quart import Quart

from . import front_door, mends
from .app import METRICS_PATH, metrics_app, service_of
from .connect import PATHS as CONNECT_PATHS
from .descriptors import DescriptorWatch
from .errors import ListenFailed
from .health import HealthPort
from .liveness import LIVENESS_FD, beat
from .settings import Settings
from .websocket import MAX_FRAME

log = logging.getLogger(__name__)

# A crowd of EventSources that comes back at once waits in the listen queue; past it the
# kernel drops connections and clients back off for seconds or fail. The kernel caps it
# at net.core.somaxconn (4,096 on many systems): the start line says what it is.
LISTEN_BACKLOG = 65535
TLS_HANDSHAKE_TIMEOUT = 5.0  # seconds a TLS client has to complete its handshake


def hypercorn_config(
    settings: Settings, listener: socket.socket, endpoint: ASGIFramework | None = None
) -> HypercornConfig:
    """hypercorn's settings for ``listener``; with the connect ``endpoint`` (a plain
    listener) its SSE streams are served by a front door (``front_door.py``)."""
    config = HypercornConfig()
    # hypercorn closes the socket it is given: give it its own descriptor of ours.
    fd = os.dup(listener.fileno())
    config.bind = [f"fd://{fd}"]
    config.backlog = LISTEN_BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = settings.server.shutdown_grace
    # A TLS client that never sends its ClientHello holds a descriptor this long (60 s
    # by default): long enough for a few hundred idle connections to starve the rest.
    config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
    # Room for a long request line (Taskcluster clients' bindings are ~2 KB each) plus headers.
    config.h11_max_incomplete_size = settings.server.max_request_line + 16 * 1024
    config.websocket_max_message_size = MAX_FRAME
    config.websocket_ping_interval = settings.server.websocket_ping_interval
    if settings.server.certfile is not None and settings.server.keyfile is not None:
        # TLS, and HTTP/2 by ALPN for clients that ask (a browser holds only six HTTP/1.1
        # connections per origin: a page with several streams needs HTTP/2).
        config.certfile = str(settings.server.certfile)
        config.keyfile = str(settings.server.keyfile)
    elif endpoint is not None and settings.server.front_door:
        front_door.register(fd, front_door.FrontDoor(endpoint, CONNECT_PATHS, config))
    return config


def listen_backlog() -> str:
    """The listen queue the kernel grants, and what caps it (Linux; else what is asked)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as somaxconn:
            cap = int(somaxconn.read())
    except (OSError, ValueError):
        return str(LISTEN_BACKLOG)
    if cap < LISTEN_BACKLOG:
        return f"{cap} (net.core.somaxconn)"
    return str(LISTEN_BACKLOG)


def listen(host: str, port: int, reuse_port: bool, scheme: str = "http") -> socket.socket:
    """A listening socket; with ``reuse_port`` one of several (workers) on the same port.
    ``ListenFailed`` (one line, naming the address) when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server(
            (host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port
        )
    except OSError as error:
        where = f"{scheme}://{host}:{port}"
        raise ListenFailed(f"cannot listen on {where}: {error.strerror or error}") from error


async def serve_app(app: Quart, reuse_port: bool = False, open_files: int | None = None) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP, then end every stream and stop. The app is
    made with ``create_app(..., lifecycle=False)``: the service's one start and one
    stop are here.

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
    metrics_port = server.metrics_port if server.metrics else None
    wanted = [(server.port, scheme), (metrics_port, "http"), (server.health_port, "http")]
    for port, its_scheme in wanted:
        if port is None:
            continue
        try:
            listeners.append(listen(server.host, port, reuse_port, its_scheme))
        except ListenFailed:
            for listener in listeners:
                listener.close()
            await service.stop()
            raise
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
        "open files limit %d, at most %d streams, listen backlog %s",
        scheme,
        host,
        port,
        service.broker.node or "(not connected yet)",
        pulse.vhost,
        service.broker.queue_name or "(none yet)",
        open_files,
        server.max_streams,
        listen_backlog(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    liveness = os.environ.pop(LIVENESS_FD, None)  # a worker: its parent hears it beat
    beating = None
    if liveness:
        broker = service.broker
        beating = asyncio.ensure_future(beat(int(liveness), lambda: broker.is_connected))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: as SIGTERM
        loop.add_signal_handler(signum, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info("shutting down: ending %d streams", len(service.hub.subscribers))
        service.hub.begin_shutdown()

    config = hypercorn_config(service.settings, listeners[0], app.asgi_app)
    servers = [serve(app, config, shutdown_trigger=shutdown_trigger)]
    side = iter(listeners[1:])
    if metrics_port is not None:
        listener = next(side)
        log.info("metrics on http://%s:%s%s", host, listener.getsockname()[1], METRICS_PATH)
        config = hypercorn_config(service.settings, listener)
        servers.append(serve(metrics_app(service), config, shutdown_trigger=stop.wait))
    health_port = None
    if server.health_port is not None:
        listener = next(side)
        log.info("health probes on http://%s:%s", host, listener.getsockname()[1])
        health_port = HealthPort(listener, service.health)
        health_port.start()
    try:
        await asyncio.gather(*servers)
    finally:
        if health_port is not None:
            await asyncio.to_thread(health_port.stop)  # within ACCEPT_POLL
        if beating is not None:
            beating.cancel()
        for listener in listeners:
            listener.close()
        await service.stop()
