"""The hub's bookkeeping, as pure logic: a recording binder stands in for the broker.

What the broker itself ends up with is checked against RabbitMQ in test_stream.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quart_events import sse
from quart_events.bindings import Binding
from quart_events.broker import BindFailed
from quart_events.hub import TOO_SLOW, Hub, Stream
from quart_events.settings import load_settings

pytestmark = pytest.mark.asyncio

A = Binding("exchange/a", "x.#")
B = Binding("exchange/a", "*.y")
MISSING = Binding("exchange/missing", "#")


class RecordingBinder:
    """Records bind/unbind in order; each operation waits for ``release`` to finish."""

    def __init__(self) -> None:
        self.on_delivery: Any = None
        self.on_connected: Any = None
        self.generation = 1
        self.calls: list[tuple[str, Binding]] = []
        self.bound: set[Binding] = set()
        self.release = asyncio.Event()
        self.release.set()

    async def bind(self, binding: Binding) -> int:
        self.calls.append(("bind", binding))
        await self.release.wait()
        if binding.exchange == MISSING.exchange:
            raise BindFailed(f"exchange `{binding.exchange}` does not exist")
        self.bound.add(binding)
        return self.generation

    async def unbind(self, binding: Binding) -> None:
        self.calls.append(("unbind", binding))
        await self.release.wait()
        self.bound.discard(binding)


def make_hub(**server: Any) -> tuple[Hub, RecordingBinder]:
    binder = RecordingBinder()
    settings = load_settings("test", overrides={"server": server} if server else None)
    return Hub(settings.server, binder), binder


async def frames(stream: Stream) -> bytes:
    await asyncio.sleep(0.01)
    return b"".join(stream.frames)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_binding_shared_by_streams_is_bound_once_and_unbound_after_the_last() -> None:
    hub, binder = make_hub()
    first, second = hub.open([A, B]), hub.open([A])
    await settle()
    assert binder.calls == [("bind", A), ("bind", B)]
    assert await frames(first) == sse.READY and await frames(second) == sse.READY
    hub.close(first)
    await settle()
    assert binder.calls[-1] == ("unbind", B) and binder.bound == {A}
    hub.close(second)
    await settle()
    assert binder.bound == set() and hub.bound_bindings() == set()


async def test_duplicate_bindings_in_one_stream_count_once() -> None:
    hub, binder = make_hub()
    stream = hub.open([A, A, A])
    await settle()
    assert binder.calls == [("bind", A)] and stream.bindings == (A,)
    hub.close(stream)
    await settle()
    assert binder.calls == [("bind", A), ("unbind", A)]


async def test_leaving_before_ready_unbinds_after_the_bind_finishes() -> None:
    hub, binder = make_hub()
    binder.release.clear()
    stream = hub.open([A])
    await settle()
    hub.close(stream)
    again = hub.open([A])  # a new stream for the same binding while bind and unbind are pending
    await settle()
    binder.release.set()
    await settle()
    assert binder.calls == [("bind", A), ("unbind", A), ("bind", A)]
    assert binder.bound == {A}
    assert b"".join(again.frames) == sse.READY and b"".join(stream.frames) == b""


async def test_a_failed_binding_fails_its_stream_only_and_is_retried_later() -> None:
    hub, binder = make_hub()
    good, bad = hub.open([A]), hub.open([A, MISSING])
    await settle()
    assert await frames(good) == sse.READY
    assert await frames(bad) == sse.error("exchange `exchange/missing` does not exist")
    assert bad.finished
    hub.close(bad)
    await settle()
    assert ("unbind", MISSING) not in binder.calls  # never bound: nothing to undo
    hub.open([MISSING])
    await settle()
    assert binder.calls.count(("bind", MISSING)) == 2


async def test_fan_out_frames_once_and_only_to_ready_matching_streams() -> None:
    hub, binder = make_hub()
    both, only_b = hub.open([A, B]), hub.open([B])
    await settle()
    binder.release.clear()
    late = hub.open([Binding("exchange/a", "#")])  # not ready yet: gets nothing
    await settle()
    for stream in (both, only_b):
        stream.frames.clear()
    hub.deliver("exchange/a", "x.y", False, b'{"n": 1}', {"CC": [b"route.r1"]})
    hub.deliver("exchange/a", "q.z", False, b"{}", None)  # matches nobody
    hub.deliver("exchange/other", "x.y", False, b"{}", None)
    expected = sse.message({"n": 1}, "exchange/a", "x.y", False, ["r1"])
    assert list(both.frames) == [expected] and list(only_b.frames) == [expected]
    assert both.frames[0] is only_b.frames[0]  # framed once, shared
    assert not late.frames
    binder.release.set()


async def test_a_slow_stream_is_ended_with_an_error_and_its_buffer_dropped() -> None:
    hub, _ = make_hub(buffer_messages=5, buffer_bytes=10_000)
    slow, other = hub.open([A]), hub.open([A])
    await settle()
    other.frames.clear()
    for _ in range(6):
        hub.deliver("exchange/a", "x", False, b"1", None)
        if other.frames:
            other.frames.clear()
    assert slow.finished and list(slow.frames) == [sse.error(TOO_SLOW)]
    assert not other.finished


async def test_frames_waiting_are_taken_as_one_write_and_the_writer_is_told() -> None:
    told: list[str] = []
    stream = Stream(
        [],
        100,
        100_000,
        on_frames=lambda: told.append("frames"),
        on_abort=lambda: told.append("abort"),
    )
    stream.push(b"a")
    stream.push(b"b")
    assert stream.take() == b"ab" and stream.take() == b""
    stream.finish(b"z")
    assert stream.finished and stream.take() == b"z"
    assert told == ["frames", "frames", "frames"]
    stream.abort()
    assert told[-1] == "abort"


async def test_shutdown_sends_a_jittered_reconnect_frame() -> None:
    hub, _ = make_hub(retry_min_ms=100, retry_max_ms=200)
    streams = [hub.open([]) for _ in range(20)]
    await settle()
    hub.begin_shutdown()
    retries = set()
    for stream in streams:
        last = stream.frames[-1]
        assert last.startswith(b"id:\nretry: ") and stream.finished
        retries.add(int(last.split(b"retry: ")[1]))
    assert all(100 <= r <= 200 for r in retries) and len(retries) > 1


async def test_restore_binds_again_and_sends_ready_again_or_an_error() -> None:
    hub, binder = make_hub()
    gone = Binding("exchange/gone", "#")
    healthy, failing = hub.open([A]), hub.open([A, gone])
    await settle()
    assert await frames(healthy) == sse.READY and await frames(failing) == sse.READY
    healthy.frames.clear()
    failing.frames.clear()
    # The broker came back as connection 2, and exchange/gone no longer exists.
    binder.generation = 2
    binder.bound.clear()
    original_bind = binder.bind

    async def bind(binding: Binding) -> int:
        if binding == gone:
            raise BindFailed(f"exchange `{binding.exchange}` does not exist")
        return await original_bind(binding)

    binder.bind = bind  # type: ignore[method-assign]
    await hub.restore()
    assert binder.bound == {A}
    assert list(healthy.frames) == [sse.READY]
    assert list(failing.frames) == [sse.error("exchange `exchange/gone` does not exist")]
    assert failing.finished and not healthy.finished
    # A stream that joined on the current connection gets no second ready.
    await hub.restore()
    assert list(healthy.frames) == [sse.READY]
