"""A connection's bounded outbox, as pure logic."""

from __future__ import annotations

from quart_events import sse
from quart_events.errors import TOO_SLOW
from quart_events.metrics import EndReason
from quart_events.outbox import Budget, Outbox


def test_frames_waiting_are_taken_as_one_write_and_the_writer_is_told() -> None:
    told: list[str] = []
    stream = Outbox(
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
    stream.abort(EndReason.STUCK)
    assert told[-1] == "abort" and stream.end_reason is None  # it had finished already


def test_a_full_buffer_ends_the_stream_with_the_reason_and_drops_what_was_waiting() -> None:
    stream = Outbox(max_frames=3, max_bytes=10_000, overflow_frame=sse.error(TOO_SLOW))
    assert all(stream.push(b"x") for _ in range(3))
    assert not stream.push(b"y")
    assert stream.finished and stream.frames == [sse.error(TOO_SLOW)]


def test_one_frame_larger_than_the_buffer_reaches_a_client_that_keeps_up() -> None:
    stream = Outbox(max_frames=100, max_bytes=1024)
    large = b"m" * 4096
    assert stream.push(b"ping") and stream.push(large) and stream.push(b"small")
    assert not stream.finished  # a burst around one large frame is not slowness
    assert stream.take() == b"ping" + large + b"small"
    assert stream.push(large) and not stream.finished
    # Behind it, the byte bound holds: at most max_bytes beside the largest frame.
    assert all(stream.push(b"k" * 100) for _ in range(10))
    assert not stream.push(b"k" * 100) and stream.finished


def test_the_chunk_being_written_counts_so_the_bound_is_exact() -> None:
    """Once ``take`` reset the count while its chunk was still being written, and a
    stalled stream held about twice its bound. Now it holds at most ``max_bytes`` plus
    its largest frame, whatever is waiting and whatever is being written."""
    stream = Outbox(max_frames=1000, max_bytes=1000, overflow_frame=sse.error(TOO_SLOW))
    assert stream.push(b"a" * 900)
    chunk = stream.take()
    stream.sending(len(chunk))  # the client is slow: the write does not return
    assert stream.push(b"b" * 200) and stream.push(b"c" * 800)
    assert stream.held_bytes == 1900  # max_bytes, and the largest frame (in flight)
    assert not stream.push(b"d" * 100) and stream.finished
    assert stream.frames == [sse.error(TOO_SLOW)]
    stream.sent()
    assert stream.held_bytes == len(sse.error(TOO_SLOW))


def test_a_budget_counts_what_every_stream_holds() -> None:
    over: list[int] = []
    budget = Budget(limit=1500, on_over=lambda: over.append(budget.total))
    streams = [Outbox(100, 10_000, budget=budget) for _ in range(2)]
    assert streams[0].push(b"x" * 1000)
    chunk = streams[0].take()
    streams[0].sending(len(chunk))
    assert budget.total == 1000 and not over
    assert streams[1].push(b"y" * 600)
    assert over == [1600]  # called once, until the hub has shed
    streams[0].sent()
    streams[1].close()
    assert budget.total == 0
