"""The three kinds of subscriber a benchmark drives, each reporting `ready` and messages.

- ``sse``: this service, read over a raw asyncio socket (a browser's cost, not httpx's).
- ``ws``: this service's Taskcluster 2026 WebSocket (``/subscription/raw``), one
  subscription per socket, as Taskcluster's UI opens it, read by ``lean_ws.py``.
- ``stomp``: RabbitMQ Web-STOMP, `/exchange/<name>/<pattern>` over a websocket.
- ``amqp``: the lean AMQP consumer of ``lean_amqp.py`` (no-ack): the broker's own limit.

A subscriber calls ``on_message(body_timestamp_or_None)`` per message; the timestamp is
read only when ``want_times`` (latency runs), to keep the load generator cheap.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable

from lean_amqp import LeanConsumer, timestamp_of
from lean_ws import LeanWebSocket

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
STOMP_PORT = 15674  # RabbitMQ Web-STOMP, at /ws
STOMP_MESSAGE = b"MESSAGE\n"

OnMessage = Callable[[float | None], None]
WS_DATA, WS_ACK, WS_ERROR = b'{"type":"data"', b'{"type":"subscribe_ack"', b'{"type":"error"'


def _timestamp(data: bytes) -> float:
    """The publish time in a bench message's data line (``{"payload": {"n": 1, "t": ...``),
    found without parsing the 1 KiB line."""
    start = data.index(b'"t":') + 4
    return float(data[start : data.index(b",", start)])


MESSAGE, READY, PING, ERROR = (
    b"event: message\n",
    b"event: ready\n",
    b"event: ping\n",
    b"event: error\n",
)


def complete_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete frames in ``data``, and the rest (it waits for the next read)."""
    last = data.rfind(b"\n\n") + 2
    if last < 2:
        return [], data
    return data[:last].split(b"\n\n"), data[last:]


def published_at(frame: bytes) -> float | None:
    """A message frame's publish time (bench messages carry it); None for other frames."""
    start = frame.find(MESSAGE)
    if start < 0:
        return None
    return _timestamp(frame[start + len(MESSAGE) + 6 : frame.find(b"\nid: ", start)])


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


async def connected_from(source: str, port: int) -> socket.socket:
    """A connection to the server on ``port`` from the loopback address ``source``. Its
    port is chosen at connect time (``IP_BIND_ADDRESS_NO_PORT``): a bind to port 0
    searches for a port no socket of that address holds, and with tens of thousands
    held (a crowd, or the TIME_WAIT of the last run's) that search made clients
    connect ten times slower than they were asked to, so the server looked slow."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def sse(
    port: int,
    exchange: str,
    pattern: str,
    ready: asyncio.Event,
    on_message: OnMessage,
    want_times: bool,
    on_ping: Callable[[], None] | None = None,
    source: str = "127.0.0.1",
) -> None:
    """A stream read over a raw socket. Messages are counted with ``bytes.count`` over
    what arrived (no frame is split out unless its timestamp is wanted): one SSE
    frame per message costs this reader next to nothing. ``source``: the loopback
    address it connects from (each has its own ports: past about 20,000 connections
    from one, a client runs out of them)."""
    reader, writer = await asyncio.open_connection(
        sock=await connected_from(source, port), limit=1 << 22
    )
    writer.write(_request(exchange, pattern))
    await reader.readuntil(b"\r\n\r\n")
    # Frames never span writes, and a write's chunk-size line comes between frames, so a
    # marker is split only across reads: keep a tail shorter than the longest marker.
    tail = b""
    keep = len(MESSAGE) - 1
    try:
        while chunk := await reader.read(1 << 20):
            data = tail + chunk
            if not ready.is_set() and READY in data:
                ready.set()
            if ERROR in data:
                raise RuntimeError(f"stream error: {data[data.find(ERROR) :][:200]!r}")
            if want_times:
                frames, tail = complete_frames(data)
                for frame in frames:
                    if (published := published_at(frame)) is not None:
                        on_message(published)
                    elif on_ping is not None and PING in frame:
                        on_ping()
                continue
            for _ in range(data.count(MESSAGE)):
                on_message(None)
            if on_ping is not None:
                # (the kept tail may hold a whole ping marker, counted already)
                for _ in range(data.count(PING, max(0, len(tail) - len(PING) + 1))):
                    on_ping()
            tail = data[-keep:]
    finally:
        writer.close()


# The kernel's receive time of what a read returns (Linux; SCM_TIMESTAMPNS has its number).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("qq")
OnArrival = Callable[[float, float], None]
# One buffer for every stamped read of a process: receiving into a fresh 1 MiB buffer
# (as recvmsg(1 << 20) does) costs an mmap and munmap per read.
READS = [bytearray(1 << 16)]
READ_VIEW = memoryview(READS[0])


def _request(exchange: str, pattern: str) -> bytes:
    bindings = json.dumps({"bindings": [{"exchange": exchange, "routingKeyPattern": pattern}]})
    query = urllib.parse.urlencode({"bindings": bindings})
    return f"GET /api/events/v1/connect/?{query} HTTP/1.1\r\nHost: b\r\n\r\n".encode()


async def sse_stamped(
    port: int,
    exchange: str,
    pattern: str,
    ready: asyncio.Event,
    on_arrival: OnArrival,
    on_ping: Callable[[float], None] | None,
    source: str,
    readers: dict[int, Callable[[], None]],
) -> None:
    """A stream read straight from its socket's readiness callback, each read with the
    kernel's receive time (``SO_TIMESTAMPNS``): ``on_arrival(published, arrived)`` per
    message, ``arrived`` being when the server's write reached this socket and not when
    this process got round to reading it. With 100,000 streams on 2 cores the readers'
    own turns are seconds long, and a user-space clock times the load generator. The
    socket's reader is kept in ``readers`` by its descriptor, for the load generator to
    hold reads."""
    sock = await connected_from(source, port)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    tail = b""

    def end(error: BaseException) -> None:
        if not ended.done():
            ended.set_exception(error)

    def readable() -> None:
        nonlocal tail
        try:
            size, ancillary, _, _ = sock.recvmsg_into(READS, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            end(error)
            return
        if not size:
            end(ConnectionError("the stream ended"))
            return
        if ancillary:
            seconds, nanoseconds = TIMESPEC.unpack_from(ancillary[0][2])
            stamp = seconds + nanoseconds / 1e9
        else:
            stamp = time.time()
        frames, tail = complete_frames(tail + READ_VIEW[:size])
        for frame in frames:
            if (published := published_at(frame)) is not None:
                on_arrival(published, stamp)
            elif PING in frame:
                if on_ping is not None:
                    on_ping(stamp)
            elif READY in frame:
                ready.set()
            elif ERROR in frame:
                end(RuntimeError(f"stream error: {frame!r}"))

    try:
        await loop.sock_sendall(sock, _request(exchange, pattern))
        loop.add_reader(sock.fileno(), readable)
        readers[sock.fileno()] = readable
        await ended
    finally:
        readers.pop(sock.fileno(), None)
        loop.remove_reader(sock.fileno())
        sock.close()


async def ws(
    port: int,
    exchange: str,
    pattern: str,
    ready: asyncio.Event,
    on_message: OnMessage,
    want_times: bool,
) -> None:
    """One socket, one subscription, read by ``lean_ws`` (as lean as the SSE reader):
    data frames are told by their first bytes in place; only latency runs decode them."""
    socket = await LeanWebSocket.open(port, "/subscription/raw")
    subscribe = {"type": "subscribe", "bindings": [{"exchange": exchange, "pattern": pattern}]}
    socket.send('{"type": "connection_init"}')
    socket.send(json.dumps(subscribe))

    def on_text(data: bytes, start: int, end: int) -> None:
        if data.startswith(WS_DATA, start):
            if want_times:
                on_message(float(json.loads(data[start:end])["message"]["payload"]["t"]))
            else:
                on_message(None)
        elif data.startswith(WS_ACK, start):
            ready.set()
        elif data.startswith(WS_ERROR, start):
            raise RuntimeError(f"websocket error: {data[start:end][:200]!r}")

    try:
        await socket.read(on_text)
    finally:
        socket.close()


async def stomp(
    port: int,
    exchange: str,
    pattern: str,
    ready: asyncio.Event,
    on_message: OnMessage,
    want_times: bool,
) -> None:
    """RabbitMQ's Web-STOMP, read by ``lean_ws`` as this service's WebSocket is: STOMP
    frames counted by their marker over the stream of messages (bodies are JSON, never
    holding it), bodies decoded only in latency runs."""
    del port
    socket = await LeanWebSocket.open(STOMP_PORT, "/ws", subprotocol="v12.stomp")
    socket.send("CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0")
    subscribe = (
        f"SUBSCRIBE\nid:0\ndestination:/exchange/{exchange}/{pattern}\nack:auto\n"
        "receipt:subscribed\n\n\0"
    )
    subscribed: list[bool] = []

    tail = b""  # the end of the last message: a frame may span WebSocket messages
    keep = len(STOMP_MESSAGE) - 1

    def on_text(data: bytes, start: int, end: int) -> None:
        # Web-STOMP streams STOMP frames over WebSocket messages as it likes (a frame
        # may be split, several may share one): count the frame markers in the stream.
        nonlocal tail
        text = tail + data[start:end]
        tail = text[-keep:]
        if want_times:
            *frames, rest = text.split(b"\0")
            tail = rest
            for frame in frames:
                frame = frame.lstrip(b"\n")
                if frame.startswith(STOMP_MESSAGE):
                    on_message(float(json.loads(frame[frame.index(b"\n\n") + 2 :])["t"]))
        else:
            for _ in range(text.count(STOMP_MESSAGE)):
                on_message(None)
        if not ready.is_set():
            if b"CONNECTED" in text and not subscribed:
                subscribed.append(True)
                socket.send(subscribe)
            if b"RECEIPT" in text:
                ready.set()
        if b"\nERROR\n" in b"\n" + text or text.startswith(b"ERROR"):
            raise RuntimeError(f"STOMP error: {text[:200]!r}")

    try:
        await socket.read(on_text)
    finally:
        socket.close()


async def amqp(
    connection: LeanConsumer,
    exchange: str,
    pattern: str,
    on_message: OnMessage,
    want_times: bool,
) -> None:
    """One raw AMQP subscriber on ``connection`` (the lean consumer of this process)."""

    def deliver(body: bytes | None) -> None:
        on_message(timestamp_of(body) if body is not None else None)

    await connection.subscribe(exchange, pattern, deliver, body=want_times)
