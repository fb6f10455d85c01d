"""The hub's registry, readiness and fan-out, as pure logic: a recording binder stands
in for the broker. What the broker itself ends up with is checked in test_connect.py."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from binder import MISSING_EXCHANGE, RecordingBinder, settle

from quart_events import sse
from quart_events.bindings import Binding
from quart_events.connect import TOO_SLOW_FRAME, SseTransport
from quart_events.errors import TOO_SLOW
from quart_events.hub import Hub
from quart_events.message import Message
from quart_events.metrics import Metrics
from quart_events.outbox import Outbox
from quart_events.settings import load_settings
from quart_events.shared_bindings import SharedBindings
from quart_events.subscribers import Subscriber

A = Binding("exchange/a", "x.#")
B = Binding("exchange/a", "*.y")
ROUTE = Binding("exchange/a", "route.index.project.#")
MISSING = Binding(MISSING_EXCHANGE, "#")


def make_hub(wait_for_broker: float = 30, **server: Any) -> tuple[Hub, RecordingBinder]:
    binder = RecordingBinder()
    overrides = {"pulse": {"wait_for_broker": wait_for_broker}}
    settings = load_settings("test", overrides={**overrides, "server": server})
    shared = SharedBindings(binder)
    hub = Hub(settings.server, shared, settings.pulse, Metrics())
    shared.attach(hub)
    shared.start()
    return hub, binder


TRANSPORTS: weakref.WeakKeyDictionary[Hub, SseTransport] = weakref.WeakKeyDictionary()


def open_stream(hub: Hub, bindings: list[Binding]) -> Subscriber:
    """An SSE stream's subscriber, as the connect endpoint opens one (nobody writes it);
    one SSE transport per hub, as one endpoint serves every stream."""
    settings = hub.settings
    transport = TRANSPORTS.setdefault(hub, SseTransport(settings))
    outbox = Outbox(
        settings.buffer_messages,
        settings.buffer_bytes,
        budget=hub.budget,
        overflow_frame=TOO_SLOW_FRAME,
    )
    return hub.open(bindings, transport, outbox)


def deliver(
    hub: Hub, exchange: str, key: str, redelivered: bool, body: bytes, headers: Any
) -> None:
    hub.deliver(Message(exchange, key, redelivered, body, headers))


def frames(stream: Subscriber) -> bytes:
    return b"".join(stream.outbox.frames)


def message(key: str, cc: list[str], body: bytes = b'{"n": 1}') -> bytes:
    return sse.message(body, "exchange/a", key, False, cc)[0]


async def test_streams_sharing_a_binding_are_ready_when_it_is_bound() -> None:
    hub, binder = make_hub()
    first, second = open_stream(hub, [A, B]), open_stream(hub, [A])
    assert frames(first) == b""  # not before the broker said so
    await settle()
    assert binder.calls == [("bind", A), ("bind", B)]
    assert frames(first) == sse.READY and frames(second) == sse.READY
    third = open_stream(hub, [A])  # in effect already: ready at once
    assert frames(third) == sse.READY
    for stream in (first, second, third):
        hub.leave(stream)
    await settle()
    assert binder.bound == set() and hub.stats()["bindings"] == 0


async def test_a_refused_binding_fails_its_stream_only() -> None:
    hub, _ = make_hub()
    good, bad = open_stream(hub, [A]), open_stream(hub, [A, MISSING])
    await settle()
    assert frames(good) == sse.READY
    assert frames(bad) == sse.error(f"exchange `{MISSING_EXCHANGE}` does not exist")
    assert bad.outbox.finished and not good.outbox.finished


async def test_fan_out_frames_once_and_only_to_ready_matching_streams() -> None:
    hub, binder = make_hub()
    both, only_b = open_stream(hub, [A, B]), open_stream(hub, [B])
    await settle()
    binder.release.clear()
    late = open_stream(hub, [Binding("exchange/a", "#")])  # not ready yet: gets nothing
    await settle()
    for stream in (both, only_b):
        stream.outbox.frames.clear()
    deliver(hub, "exchange/a", "x.y", False, b'{"n": 1}', {"CC": [b"route.r1"]})
    deliver(hub, "exchange/a", "q.z", False, b"{}", None)  # matches nobody
    deliver(hub, "exchange/other", "x.y", False, b"{}", None)
    expected = message("x.y", ["route.r1"])
    assert both.outbox.frames == [expected] and only_b.outbox.frames == [expected]
    assert both.outbox.frames[0] is only_b.outbox.frames[0]  # framed once, shared
    assert not late.outbox.frames
    binder.release.set()


async def test_a_route_binding_matches_the_cc_keys_once_with_the_primary_routing_key() -> None:
    hub, _ = make_hub()
    routes, primary = open_stream(hub, [ROUTE, A]), open_stream(hub, [A])
    await settle()
    routes.outbox.frames.clear()
    primary.outbox.frames.clear()
    cc = ["route.index.project.foo.bar", "route.index.project.baz", "route.notify.x"]
    deliver(hub, "exchange/a", "primary.task", False, b'{"n": 1}', {"CC": cc})
    deliver(hub, "exchange/a", "x.both", False, b'{"n": 2}', {"CC": cc})  # by key and by CC
    assert routes.outbox.frames == [message("primary.task", cc), message("x.both", cc, b'{"n": 2}')]
    assert primary.outbox.frames == [message("x.both", cc, b'{"n": 2}')]


async def test_a_stream_opened_during_an_outage_is_ready_only_once_bound_again() -> None:
    hub, binder = make_hub()
    early = open_stream(hub, [A])
    await settle()
    binder.lose()
    during = open_stream(hub, [A])  # A is bound, but on a connection that is gone
    await settle()
    assert frames(during) == b""
    binder.reconnect()
    hub.reconnected()
    await settle()
    assert frames(during) == sse.READY
    assert frames(early) == sse.READY + sse.READY  # and the earlier one hears it is back


async def test_a_new_stream_waits_for_the_broker_so_long_then_is_told() -> None:
    hub, binder = make_hub(wait_for_broker=0.05)
    binder.lose()
    stream = open_stream(hub, [A])
    await asyncio.sleep(0.2)
    assert frames(stream) == sse.error(
        "could not bind to exchange `exchange/a`: "
        "the message broker is unavailable, try again later"
    )
    assert stream.outbox.finished


async def test_a_reconnect_sends_ready_again_or_the_error_of_an_exchange_now_gone() -> None:
    hub, binder = make_hub()
    gone = Binding("exchange/gone", "#")
    healthy, failing = open_stream(hub, [A]), open_stream(hub, [A, gone])
    empty = open_stream(hub, [])
    await settle()
    for stream in (healthy, failing, empty):
        stream.outbox.frames.clear()
    binder.reconnect()
    binder.missing.add(gone.exchange)
    hub.reconnected()
    await settle()
    assert healthy.outbox.frames == [sse.READY] and empty.outbox.frames == [sse.READY]
    assert failing.outbox.frames == [sse.error("exchange `exchange/gone` does not exist")]
    assert failing.outbox.finished and not healthy.outbox.finished
    hub.reconnected()  # the same connection again: nothing more to say
    await settle()
    assert healthy.outbox.frames == [sse.READY]


async def test_a_second_loss_during_the_restore_keeps_the_streams_and_restores_later() -> None:
    hub, binder = make_hub(wait_for_broker=0.05)
    stream = open_stream(hub, [A, B])
    await settle()
    stream.outbox.frames.clear()
    binder.reconnect()
    binder.release.clear()
    hub.reconnected()
    await settle()
    binder.lose()  # gone again while binding
    binder.release.set()
    await asyncio.sleep(0.2)  # longer than wait_for_broker: a ready stream is not given up
    assert stream.outbox.frames == [] and not stream.outbox.finished
    binder.reconnect()
    hub.reconnected()
    await settle()
    assert stream.outbox.frames == [sse.READY] and binder.bound == {A, B}


async def test_stuck_streams_are_dropped_and_the_others_pinged() -> None:
    hub, _ = make_hub(write_timeout=0.05)
    stuck, fine = open_stream(hub, []), open_stream(hub, [])
    fine.outbox.take()
    await asyncio.sleep(0.1)
    hub.drop_stuck_streams()
    await hub.ping_streams()
    assert stuck.outbox.finished and stuck not in hub.subscribers and hub.stats()["stuck"] == 1
    assert fine.outbox.frames[0].startswith(b"event: ping\n")


async def test_shutdown_sends_a_jittered_reconnect_frame() -> None:
    hub, _ = make_hub(retry_min_ms=100, retry_max_ms=200)
    streams = [open_stream(hub, []) for _ in range(20)]
    hub.begin_shutdown()
    retries = set()
    for stream in streams:
        last = stream.outbox.frames[-1]
        assert last.startswith(b"event: reconnect\ndata: {}\nid:\nretry: ")
        assert stream.outbox.finished
        retries.add(int(last.split(b"retry: ")[1]))
    assert all(100 <= r <= 200 for r in retries) and len(retries) > 1
    assert hub.shutting_down


async def test_outcomes_and_end_reasons_are_counted() -> None:
    hub, binder = make_hub(wait_for_broker=0.05, write_timeout=0.05)
    registry = hub.metrics.registry

    def count(metric: str, label: str, value: str) -> float | None:
        return registry.get_sample_value(f"tc_events_streams_{metric}_total", {label: value})

    ready, missing = open_stream(hub, [A]), open_stream(hub, [MISSING])
    await settle()
    binder.lose()
    unavailable = open_stream(hub, [B])
    await asyncio.sleep(0.2)
    for outcome, expected in (("ready", 1), ("missing_exchange", 1), ("broker_unavailable", 1)):
        assert count("opened", "outcome", outcome) == expected
    hub.drop_stuck_streams()  # `ready` was never taken: stuck
    hub.leave(missing)
    hub.leave(unavailable)
    assert ready not in hub.subscribers
    left, ending = open_stream(hub, []), open_stream(hub, [])
    hub.leave(left)
    hub.begin_shutdown()
    hub.leave(ending)
    for reason, expected in (("stuck", 1), ("error", 2), ("client_left", 1), ("shutdown", 1)):
        assert count("ended", "reason", reason) == expected


async def test_past_the_process_budget_the_streams_holding_most_are_ended_first() -> None:
    """``max_streams`` x ``buffer_bytes`` was 156 GiB by default: the streams together
    are bounded by ``server.max_buffered_bytes``, and past it the slowest go first."""
    hub, _ = make_hub(max_buffered_bytes=100_000, buffer_bytes=80_000)
    streams = [open_stream(hub, [A]) for _ in range(4)]
    await settle()
    for stream in streams:
        stream.outbox.take()  # ready, written
    body = b'"' + b"x" * 9_000 + b'"'
    for stream, count in zip(streams, (1, 2, 3, 4), strict=True):
        for _ in range(count):
            assert stream.outbox.push(message("a.y", [], body))
    # 10 frames of ~9 KB: within the budget. One more frame of the fastest stream...
    assert hub.budget.total < 100_000 and not any(s.outbox.finished for s in streams)
    assert streams[3].outbox.push(message("a.y", [], body))
    await settle()
    # ... took it over: the stream holding most was ended, the others go on.
    assert [stream.end_reason for stream in streams] == [None, None, None, "too_slow"]
    assert frames(streams[3]) == sse.error(TOO_SLOW)
    assert hub.budget.total <= 90_000 and hub.counts.too_slow == 1
