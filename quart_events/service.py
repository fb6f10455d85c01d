"""The service's lifecycle: the parts that live as long as the process, started once
and stopped once, and the timer's work (pings, the stuck-stream sweep, metrics)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .broker import Broker
from .descriptors import DescriptorWatch
from .health import Health
from .history import History
from .hub import Hub
from .metrics import Metrics
from .settings import Settings
from .shared_bindings import SharedBindings
from .timer import every

METRICS_FLUSH_INTERVAL = 1.0  # seconds: how stale a scrape of another worker may be
# Young passes every 10,000 allocations instead of 700; the older generations keep
# Python's rhythm, because a closed connection is cyclic garbage (asyncio's and
# hypercorn's objects) that only a full pass frees (tests/test_churn.py).
GC_THRESHOLDS = (10_000, 10, 10)  # Python's defaults: (700, 10, 10)


@dataclass
class Service:
    """The parts that live as long as the process, started and stopped together."""

    settings: Settings
    broker: Broker
    shared: SharedBindings
    hub: Hub
    metrics: Metrics
    history: History
    started_at: float = field(default_factory=time.monotonic)
    timers: list[asyncio.Task[None]] = field(default_factory=list)
    descriptors: DescriptorWatch | None = None  # set when serving: the open files limit
    # The WebSocket figures by protocol (open sockets, subscriptions, frames).
    websockets: Callable[[], dict[str, dict[str, int]]] = dict
    health: Health = field(init=False)  # the probes' answers, on either port

    def __post_init__(self) -> None:
        self.health = Health(self.broker, self.started_at)

    async def start(self) -> None:
        """Connect to the broker and start the timers; raise ``BrokerUnavailable``."""
        if self.timers:
            raise RuntimeError("the service is started once (create_app(lifecycle=False) to serve)")
        tune_garbage_collector()
        self.shared.start()
        try:
            await self.broker.start(connect_in_background=self.settings.pulse.start_without_broker)
            await self.history.start(in_background=self.settings.pulse.start_without_broker)
        except BaseException:
            await self.shared.stop()
            await self.broker.close()
            raise
        self.timers = [
            asyncio.ensure_future(every(self.settings.server.ping_interval, self.tick)),
            asyncio.ensure_future(every(METRICS_FLUSH_INTERVAL, self.flush_metrics)),
            asyncio.ensure_future(self.health.mark_turns()),
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
            len(self.hub.subscribers),
            len(self.shared),
            broker.is_connected,
            broker.reconnects,
        )
        self.metrics.flush_websockets(self.websockets())

    async def stop(self) -> None:
        timers, self.timers = self.timers, []
        if not timers:
            return
        self.hub.begin_shutdown()
        for timer in timers:
            timer.cancel()
        await self.history.stop()
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
