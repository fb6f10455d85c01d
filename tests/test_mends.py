"""hypercorn's own behaviour that each mend in ``quart_events/mends.py`` works around.

Each test checks that hypercorn (unmended) still behaves as the mend assumes: when
one fails, hypercorn changed, and the mend can probably go (see docs/design.md).
"""

from __future__ import annotations

import inspect
from importlib import metadata

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.protocol import h2 as hypercorn_h2

from quart_events import mends


def test_the_mends_are_for_the_hypercorn_installed() -> None:
    assert metadata.version("hypercorn").startswith(mends.WRITTEN_FOR)


async def test_hypercorn_still_lets_writers_go_on_an_empty_pop_of_a_full_buffer() -> None:
    """Mend 1: hypercorn's StreamBuffer.pop sets `_paused` whenever the chunk it takes is
    short, an empty one included (the client's window is 0), while the buffer is full."""
    from hypercorn.asyncio.worker_context import EventWrapper

    buffer = hypercorn_h2.StreamBuffer(EventWrapper)
    buffer.buffer.extend(b"x" * (hypercorn_h2.BUFFER_HIGH_WATER * 4))
    await buffer._paused.clear()
    await mends.ORIGINAL_POP(buffer, 0)  # the window is 0: nothing can be taken
    assert buffer._paused.is_set()  # writers go on, though nothing drained
    await buffer._paused.clear()
    await mends.pop_with_backpressure(buffer, 0)
    assert not buffer._paused.is_set()  # mended: they wait


def test_hypercorn_still_keeps_the_buffer_of_an_ended_stream() -> None:
    """Mend 2: on StreamClosed, hypercorn's H2Protocol.stream_send closes the stream but
    leaves ``stream_buffers[stream_id]`` (and its data) in place."""
    source = inspect.getsource(mends.ORIGINAL_STREAM_SEND)
    closed = source[source.index("isinstance(event, StreamClosed)") :]
    closed = closed[: closed.index("elif isinstance(event, Request)")]
    assert "_close_stream" in closed and "stream_buffers" not in closed


def test_hypercorn_still_leaves_the_tls_close_timeout_at_asyncios_default() -> None:
    """Mend 3: hypercorn's serve starts its servers without ``ssl_shutdown_timeout``, so
    asyncio waits its default 30 s for a TLS client's close_notify."""
    source = inspect.getsource(hypercorn_run.worker_serve)
    assert "start_server(" in source and "ssl_shutdown_timeout" not in source


def test_hypercorn_still_ignores_websocket_pongs() -> None:
    """Mend 4: hypercorn's WSStream pings on a timer and its event handling has no case
    for a Pong, so a client that stops answering is never dropped."""
    from hypercorn.protocol import ws_stream

    handling = inspect.getsource(ws_stream.WSStream._handle_events)
    assert "Ping" in handling and "Pong" not in handling
    pinging = inspect.getsource(mends.ORIGINAL_SEND_PINGS)
    assert "Ping()" in pinging and "Pong" not in pinging and "CloseConnection" not in pinging


def test_hypercorn_still_writes_each_websocket_message_on_its_own() -> None:
    """Mend 5: hypercorn's WSStream.app_send takes one text (or bytes) per
    ``websocket.send`` and sends it as its own event: a socket write each."""
    source = inspect.getsource(mends.ORIGINAL_WS_APP_SEND)
    sending = source[source.index('"websocket.send"') :]
    sending = sending[: sending.index('"websocket.close"')]
    assert 'message["text"]' in sending and "_send_wsproto_event(event)" in sending
    assert mends.TEXTS not in source
