"""Helpers for tests: a real server process, an SSE reader, broker inspection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from hypothesis import strategies as st

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Where server logs go: pytest's temporary directory when under pytest (conftest sets
# it), else the system's. Every server started, so a failing test can show their logs.
LOG_DIRECTORY: Path | None = None
STARTED: list[EventsServer] = []
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"server did not listen on {port} within {timeout} s")


def bindings_param(bindings: Sequence[dict[str, Any]] | Any) -> str:
    return json.dumps({"bindings": bindings})


def connect_target(bindings: Sequence[dict[str, Any]] | Any) -> str:
    """The request target (path and query) of a stream with ``bindings``."""
    return "/api/events/v1/connect/?" + urllib.parse.urlencode(
        {"bindings": bindings_param(bindings)}
    )


def taskcluster_style_target(exchange: str, target_length: int) -> str:
    """A connect request target of exactly ``target_length`` bytes, made of bindings
    shaped like the JS client's (each with a ``routingKeyReference``); binding
    ``p<n>.#`` for n = 0, 1, ..."""
    reference = [{"name": f"key{i}", "multipleWords": False, "required": False} for i in range(10)]
    bindings: list[dict[str, object]] = []
    while len(connect_target(bindings)) < target_length - 2000:
        bindings.append(
            {
                "exchange": exchange,
                "routingKeyPattern": f"p{len(bindings)}.#",
                "routingKeyReference": reference,
            }
        )
    bindings[0]["pad"] = ""
    bindings[0]["pad"] = "a" * (target_length - len(connect_target(bindings)))
    target = connect_target(bindings)
    assert len(target) == target_length
    return target


@dataclass
class EventsServer:
    """A ``tc-events server`` process with its own queue namespace."""

    port: int
    namespace: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    _http: httpx.Client | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(
        self, bindings: Sequence[dict[str, Any]] | Any, path: str = "/api/events/v1/connect/"
    ) -> str:
        return self.base + connect_target(bindings).replace("/api/events/v1/connect/", path, 1)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    @classmethod
    def start(
        cls,
        extra_env: dict[str, str] | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
        namespace: str | None = None,
        wait: bool = True,
        open_files: tuple[int, int] | None = None,
    ) -> EventsServer:
        port = port or free_port()
        namespace = namespace or f"test-{uuid.uuid4().hex[:10]}"
        env = {**os.environ, "PULSE_NAMESPACE": namespace, **(extra_env or {})}
        log_path = (LOG_DIRECTORY or Path(tempfile.gettempdir())) / f"{namespace}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quart_events",
                "server",
                "--profile",
                "test",
                "--port",
                str(port),
                *args,
            ],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # (soft, hard) limit of open files, as a service manager would set them
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files))
            if open_files
            else None,
        )
        log_file.close()
        server = cls(port, namespace, process, log_path, env)
        STARTED.append(server)
        if not wait:
            return server
        try:
            wait_for_port(port, process)
        except Exception:
            server.stop()
            raise RuntimeError(f"server did not start:\n{server.output()}") from None
        return server

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self._http is not None:
            self._http.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    @classmethod
    @contextlib.contextmanager
    def running(
        cls, extra_env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> Iterator[EventsServer]:
        server = cls.start(extra_env, args=args)
        try:
            yield server
        finally:
            server.stop()

    def stats(self) -> dict[str, Any]:
        """The server's own counts (streams, bindings, tasks, memory), over one kept-alive
        connection, so that asking does not itself leave connections behind to count."""
        if self._http is None:
            self._http = httpx.Client(timeout=10)
        response = self._http.get(f"{self.base}/api/events/v1/__stats__")
        response.raise_for_status()
        return dict(response.json())

    def broker_bindings(self) -> list[tuple[str, str]]:
        """(exchange, routing key) of this server's queue, as RabbitMQ itself lists them."""
        return broker_bindings(f"queue/{self.namespace}/events/")


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quart_events", "server", "--profile", "test", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


class StalledClient:
    """Opens a stream, reads the response headers, then reads nothing more."""

    def __init__(self, server: EventsServer, exchange: str, pattern: str = "#") -> None:
        query = urllib.parse.urlencode(
            {"bindings": bindings_param([{"exchange": exchange, "routingKeyPattern": pattern}])}
        )
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", server.port))
        self.sock.sendall(
            f"GET /api/events/v1/connect/?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        self.received = self.sock.recv(200)
        assert self.received.startswith(b"HTTP/1.1 200")

    def read_to_end(self, timeout: float = 30) -> bytes:
        self.sock.settimeout(timeout)
        chunks = [self.received]
        while chunk := self.sock.recv(1 << 20):
            chunks.append(chunk)
        self.sock.close()
        return b"".join(chunks)


# -- the broker, as a test sees it ---------------------------------------------------


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS`` on the local broker; its output, or ``RuntimeError``."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise RuntimeError(f"rabbitmqctl {args[0]} failed: {done.stderr}")
    return done.stdout


async def arabbitmqctl(*args: str) -> str:
    """``rabbitmqctl`` without blocking the test's event loop."""
    return await asyncio.to_thread(rabbitmqctl, *args)


def queues_of(namespace: str, every: bool = False) -> list[str]:
    """The queue of each server process of ``namespace`` (``queue/<ns>/events/<id>``);
    with ``every``, also the queue of each exchange it binds (``.../<id>/<n>``)."""
    names = rabbitmqctl("list_queues", "name").split()
    prefix = f"queue/{namespace}/events/"
    return [
        name
        for name in names
        if name.startswith(prefix) and (every or "/" not in name[len(prefix) :])
    ]


async def declare_exchange(name: str, durable: bool = False) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=durable)


async def delete_exchange(name: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)


async def delete_queues(*names: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def publish(
    exchange: aio_pika.abc.AbstractExchange | str,
    key: str,
    body: bytes,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish as Taskcluster does: a topic exchange, ``CC`` routes in ``headers``."""
    message = aio_pika.Message(body, headers=headers)
    if isinstance(exchange, str):
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange)
            await target.publish(message, routing_key=key)
    else:
        await exchange.publish(message, routing_key=key)


def broker_bindings(queue_prefix: str) -> list[tuple[str, str]]:
    out = rabbitmqctl("list_bindings", "source_name", "destination_name", "routing_key")
    found = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[1].startswith(queue_prefix) and parts[0]:
            found.append((parts[0], parts[2]))
    return sorted(found)


async def wait_until(predicate: Any, timeout: float = 10, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class SSEReader:
    """An independent SSE client (httpx-sse) reading one stream in the background."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.events: list[ServerSentEvent] = []
        self.response: httpx.Response | None = None
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(30, read=None))
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SSEReader:
        self._task = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._client.aclose()

    async def _read(self) -> None:
        try:
            async with aconnect_sse(self._client, "GET", self.url, headers=self.headers) as source:
                self.response = source.response
                self._changed.set()
                async for event in source.aiter_sse():
                    self.events.append(event)
                    self._changed.set()
        finally:
            self.ended.set()
            self._changed.set()

    def named(self, name: str) -> list[ServerSentEvent]:
        return [event for event in self.events if event.event == name]

    async def wait_for(
        self, name: str, count: int = 1, timeout: float = 10
    ) -> list[ServerSentEvent]:
        """Wait until ``count`` events called ``name`` arrived; return them."""
        deadline = time.monotonic() + timeout
        while len(self.named(name)) < count:
            if self.ended.is_set() and self._task is not None and self._task.done():
                if self._task.exception() is not None:
                    raise self._task.exception()  # type: ignore[misc]
                raise AssertionError(f"stream ended before {count} {name!r}: {self.events}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {count} {name!r} events in {timeout} s: {self.events}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.named(name)

    async def wait_ended(self, timeout: float = 10) -> None:
        await asyncio.wait_for(self.ended.wait(), timeout)

    def data(self, name: str) -> list[Any]:
        return [json.loads(event.data) for event in self.named(name)]


class RatePublisher(threading.Thread):
    """Publishes ``rate`` messages a second of about 1 KiB for ``seconds``, on schedule."""

    def __init__(self, exchange: str, rate: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.exchange, self.rate, self.seconds = exchange, rate, seconds
        self.sent = 0
        self.started = threading.Event()

    def run(self) -> None:
        asyncio.run(self._publish())

    async def _publish(self) -> None:
        body = json.dumps(
            {"status": {"taskId": "fN1kYkcFQXKUBy2dSlZ4XA"}, "filler": "x" * 950}
        ).encode()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=False)
            exchange = await channel.get_exchange(self.exchange)
            total = int(self.rate * self.seconds)
            loop = asyncio.get_running_loop()
            start = loop.time()
            self.started.set()
            while self.sent < total:
                due = min(total, int((loop.time() - start) * self.rate) + 1)
                while self.sent < due:
                    message = aio_pika.Message(body)
                    await exchange.publish(message, routing_key=f"load.{self.sent}")
                    self.sent += 1
                await asyncio.sleep(0.002)


@contextlib.contextmanager
def npm_modules(*packages: str) -> Iterator[Path]:
    """``packages`` installed from the npm registry into a temporary directory; yields
    its ``node_modules`` (removed afterwards)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("node and npm are needed: apt-get install nodejs npm")
    where = Path(tempfile.mkdtemp(prefix="tc-events-npm-"))
    try:
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", *packages],
            cwd=where, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        yield where / "node_modules"
    finally:
        shutil.rmtree(where, ignore_errors=True)


# Any JSON value, small: for property tests of what clients may send.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


EVENTSOURCE_CLIENT = ROOT / "tests" / "eventsource_client.mjs"


class NodeClient:
    """npm `eventsource` following a stream under Node: what it heard, a line each."""

    def __init__(
        self, node_modules: Path, module: str, url: str, count: int = 1, follow_s: int = 40
    ) -> None:
        """``count`` EventSources of ``url`` in the one Node process (``source`` in
        each line says which), each followed for ``follow_s``."""
        self.lines: list[dict[str, Any]] = []
        env = {
            **os.environ,
            "NODE_MODULES": str(node_modules),
            "FOLLOW_MS": str(follow_s * 1000),
            "COUNT": str(count),
        }
        self.process = subprocess.Popen(
            ["node", str(EVENTSOURCE_CLIENT), module, url],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def collect(self) -> None:
        assert self.process.stdout is not None
        while line := await asyncio.to_thread(self.process.stdout.readline):
            self.lines.append(json.loads(line))

    def kinds(self) -> list[str]:
        return [line["kind"] for line in self.lines]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
