"""Metrics for operators, in the Prometheus text format (the prometheus-client library).

The hub and the connect endpoint count into plain integers (``Counts``): the
per-message path pays an addition, not a lock and a file write. ``Metrics.flush``
moves what changed into prometheus-client's metrics once a second and before every
scrape. With several worker processes each one writes its values into files of
prometheus-client's multiprocess mode (the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for them), so one scrape of any worker shows the sum
of all: counters survive a worker's restart, gauges of dead workers are dropped.
The same ``Counts`` feed ``__stats__``, so both show one source of truth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Outcome(StrEnum):
    """How a stream request ended up: the label of ``tc_events_streams_opened``."""

    READY = "ready"
    BAD_INPUT = "bad_input"
    OVER_LIMIT = "over_limit"
    SHUTTING_DOWN = "shutting_down"
    MISSING_EXCHANGE = "missing_exchange"
    BROKER_UNAVAILABLE = "broker_unavailable"
    BUSY = "busy"
    ERROR = "error"


class EndReason(StrEnum):
    """Why a stream ended: the label of ``tc_events_streams_ended``, and its log line."""

    CLIENT_LEFT = "client_left"
    TOO_SLOW = "too_slow"
    STUCK = "stuck"
    SHUTDOWN = "shutdown"
    ERROR = "error"
    PROTOCOL_ERROR = "protocol_error"  # a WebSocket client broke its protocol
    LIFETIME = "lifetime"  # a WebSocket outlived server.websocket_lifetime


# The WebSocket protocols, by the name logs, stats and metrics give them.
WEBSOCKET_PROTOCOLS = ("subscription", "listen")
OPENED = tuple(Outcome)
ENDED = tuple(EndReason)


@dataclass(slots=True)
class Counts:
    """Plain counters of one process, added to on the hot paths."""

    deliveries: int = 0  # messages received from the broker
    non_json: int = 0  # of which the body was not strict JSON
    frames_delivered: int = 0  # message frames queued for clients
    bytes_written: int = 0  # to clients
    too_slow: int = 0
    stuck: int = 0
    dropped: int = 0  # messages the broker dropped from our queues (their length limit)
    too_large: int = 0  # messages over pulse.max_message_bytes, not delivered

    def as_dict(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


class Metrics:
    """prometheus-client's metrics of this process, fed from ``Counts`` and events."""

    def __init__(self) -> None:
        self.multiprocess = MULTIPROCESS_DIR in os.environ
        self.registry = CollectorRegistry()
        registry = self.registry

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, text, labels, registry=registry)

        def gauge(
            name: str,
            text: str,
            across_workers: Literal["livesum", "liveall"],
            labels: tuple[str, ...] = (),
        ) -> Gauge:
            """``livesum``: the sum over living workers; ``liveall``: one series each."""
            return Gauge(name, text, labels, registry=registry, multiprocess_mode=across_workers)

        self.streams_open = gauge("tc_events_streams_open", "Open streams.", "livesum")
        self.streams_opened = counter(
            "tc_events_streams_opened", "Stream requests, by outcome.", ("outcome",)
        )
        self.streams_ended = counter(
            "tc_events_streams_ended", "Streams ended, by reason.", ("reason",)
        )
        self.bindings = gauge(
            "tc_events_broker_bindings",
            "Distinct bindings held on the broker (or being bound).",
            "livesum",
        )
        self.broker_connected = gauge(
            "tc_events_broker_connected",
            "1 while this process is connected to the broker.",
            "liveall",
        )
        self.messages_received = counter(
            "tc_events_broker_messages_received", "Messages received from the broker."
        )
        self.messages_not_json = counter(
            "tc_events_broker_messages_not_json", "Messages whose body was not strict JSON."
        )
        self.frames_delivered = counter(
            "tc_events_frames_delivered", "Message frames delivered to streams."
        )
        self.bytes_written = counter("tc_events_written_bytes", "Bytes written to clients.")
        self.messages_too_large = counter(
            "tc_events_broker_messages_too_large",
            "Messages over pulse.max_message_bytes, not delivered.",
        )
        self.messages_dropped = counter(
            "tc_events_broker_messages_dropped",
            "Messages the broker dropped from this process's queue at pulse.queue_max_length.",
        )
        self.broker_reconnects = counter(
            "tc_events_broker_reconnects", "Connections to the broker after the first."
        )
        self.ready_seconds = Histogram(
            "tc_events_ready_seconds",
            "Time from a stream request to its first ready.",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.tick_lateness = Histogram(
            "tc_events_ping_lateness_seconds",
            "How late the ping timer fired.",
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.websockets_open = gauge(
            "tc_events_websockets_open", "Open WebSockets, by protocol.", "livesum", ("protocol",)
        )
        self.websocket_subscriptions = gauge(
            "tc_events_websocket_subscriptions",
            "Subscriptions on open WebSockets, by protocol.",
            "livesum",
            ("protocol",),
        )
        self.websocket_frames = counter(
            "tc_events_websocket_frames",
            "Message frames delivered on WebSockets, by protocol.",
            ("protocol",),
        )
        self.websockets_ended = counter(
            "tc_events_websockets_ended",
            "WebSockets ended, by protocol and reason.",
            ("protocol", "reason"),
        )
        self._frames_flushed: dict[str, int] = {}
        for protocol in WEBSOCKET_PROTOCOLS:
            for reason in ENDED:
                self.websockets_ended.labels(protocol, reason)
            self.websocket_frames.labels(protocol)
        for outcome in OPENED:
            self.streams_opened.labels(outcome)
        for reason in ENDED:
            self.streams_ended.labels(reason)
        self._flushed = Counts()
        self._reconnects_flushed = 0

    def flush(
        self, counts: Counts, streams: int, bindings: int, connected: bool, reconnects: int
    ) -> None:
        """Move what changed since the last flush into the metrics."""
        flushed = self._flushed
        for source, target, name in (
            (counts.deliveries, self.messages_received, "deliveries"),
            (counts.non_json, self.messages_not_json, "non_json"),
            (counts.frames_delivered, self.frames_delivered, "frames_delivered"),
            (counts.bytes_written, self.bytes_written, "bytes_written"),
            (counts.dropped, self.messages_dropped, "dropped"),
            (counts.too_large, self.messages_too_large, "too_large"),
        ):
            delta = source - getattr(flushed, name)
            if delta:
                target.inc(delta)
                setattr(flushed, name, source)
        if reconnects > self._reconnects_flushed:
            self.broker_reconnects.inc(reconnects - self._reconnects_flushed)
            self._reconnects_flushed = reconnects
        self.streams_open.set(streams)
        self.bindings.set(bindings)
        self.broker_connected.set(1 if connected else 0)

    def flush_websockets(self, stats: dict[str, dict[str, int]]) -> None:
        """Per protocol: open sockets, their subscriptions, frames delivered so far."""
        for protocol, figures in stats.items():
            self.websockets_open.labels(protocol).set(figures["open"])
            self.websocket_subscriptions.labels(protocol).set(figures["subscriptions"])
            delta = figures["frames"] - self._frames_flushed.get(protocol, 0)
            if delta:
                self.websocket_frames.labels(protocol).inc(delta)
                self._frames_flushed[protocol] = figures["frames"]

    def exposition(self) -> bytes:
        """The text a scrape gets: every worker's figures where there are several."""
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
