"""`tc-events listen` and `tc-events publish` against a real server and the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from helpers import (
    AMQP_URL,
    ROOT,
    EventsServer,
    SSEReader,
    free_port,
    publish,
    wait_until,
)
from tcp_proxy import TcpProxy

from quart_events.client import Listener

pytestmark = pytest.mark.broker


async def tc_events(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a ``tc-events`` command to its end."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "quart_events", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


async def start_listen(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quart_events",
        "listen",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_wait_for_a_task_in_a_script_listen_then_publish(
    server: EventsServer, exchange_name: str
) -> None:
    """The script case: wait for one message on a task's route, exit on the first."""
    listening = await start_listen(
        "--url", server.base, "-e", exchange_name, "-p", "route.index.project.#", "--count", "1"
    )
    # The stream is ready once its binding is on the broker; then publish.
    await asyncio.sleep(0)
    for _ in range(100):
        if (exchange_name, "route.index.project.#") in server.broker_bindings():
            break
        await asyncio.sleep(0.1)
    done = await tc_events(
        "publish",
        "--profile",
        "test",
        exchange_name,
        "primary.task1",
        '{"status": "completed"}',
        "--route",
        "index.project.build",
        "--route",
        "notify.x",
    )
    assert done.returncode == 0, done.stderr
    stdout, stderr = await asyncio.wait_for(listening.communicate(), 30)
    assert listening.returncode == 0, stderr
    (line,) = stdout.decode().splitlines()
    message = json.loads(line)
    assert message["payload"] == {"status": "completed"}
    assert message["routingKey"] == "primary.task1"
    assert message["routes"] == ["index.project.build", "notify.x"]


async def test_listen_takes_the_bindings_json_from_stdin_and_times_out(
    server: EventsServer, exchange_name: str
) -> None:
    bindings = json.dumps({"bindings": [{"exchange": exchange_name, "routingKeyPattern": "#"}]})
    result = await tc_events("listen", "--url", server.base, "--timeout", "1.5", stdin=bindings)
    assert result.returncode == 3
    assert result.stderr.strip() == "tc-events: no message within 1.5 s"


async def test_listen_reports_the_servers_error_and_exits_1(server: EventsServer) -> None:
    missing = "exchange/test/none-such"
    result = await tc_events("listen", "--url", server.base, "-e", missing, "-p", "#")
    assert result.returncode == 1
    assert result.stderr.strip() == f"tc-events: exchange `{missing}` does not exist"
    bad = await tc_events("listen", "--url", server.base, '{"bindings": 3}')
    assert bad.returncode == 1
    assert "Bindings must be an array" in bad.stderr
    usage = await tc_events("listen", "--url", server.base, "-e", "x")
    assert usage.returncode == 2


async def test_publish_says_when_the_exchange_does_not_exist() -> None:
    result = await tc_events("publish", "--profile", "test", "exchange/test/none-such", "k", "{}")
    assert result.returncode == 1
    assert result.stderr.strip() == "tc-events: exchange `exchange/test/none-such` does not exist"
    not_json = await tc_events("publish", "--profile", "test", "exchange/x", "k", "{oops")
    assert not_json.returncode == 1 and "not valid JSON" in not_json.stderr
    for constant in ("NaN", '{"x": Infinity}', "[-Infinity]"):
        refused = await tc_events("publish", "--profile", "test", "exchange/x", "k", constant)
        assert refused.returncode == 1, constant
        assert "not valid JSON (NaN and Infinity are not JSON either)" in refused.stderr


async def test_listen_comes_back_after_the_servers_reconnect_frame(exchange_name: str) -> None:
    env = {"TC_EVENTS_SERVER__RETRY_MIN_MS": "300", "TC_EVENTS_SERVER__RETRY_MAX_MS": "400"}
    first = EventsServer.start(env)
    port = first.port
    listening = await start_listen(
        "--url", first.base, "-e", exchange_name, "-p", "#", "--count", "1"
    )
    second = None
    # The client module under listen, in process, to see why it came back: after the
    # frame it waits the frame's `retry:` (0.3-0.4 s), after any other end its own 1 s.
    statuses: list[str] = []
    bindings = json.dumps({"bindings": [{"exchange": exchange_name, "routingKeyPattern": "#"}]})
    follower = Listener(first.base, bindings, lambda _: None, statuses.append, count=1)
    following = asyncio.ensure_future(follower.run())
    try:
        async with SSEReader(first.url([])) as reader:
            await reader.wait_for("ready")
        await wait_until(lambda: "connected" in statuses)
        await asyncio.sleep(1.5)
        assert await asyncio.to_thread(first.stop) == 0  # every stream gets the reconnect frame
        await wait_until(lambda: any(s.startswith("reconnecting in") for s in statuses))
        waits = [s for s in statuses if s.startswith("reconnecting in")]
        assert waits[0] in {"reconnecting in 0.3 s", "reconnecting in 0.4 s"}, statuses
        second = EventsServer.start(port=port)
        for _ in range(100):
            if second.broker_bindings():
                break
            await asyncio.sleep(0.1)
        connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1/")
        async with connection:
            channel = await connection.channel()
            target = await channel.get_exchange(exchange_name)
            await target.publish(aio_pika.Message(b'"after restart"'), routing_key="k")
        stdout, stderr = await asyncio.wait_for(listening.communicate(), 30)
        assert listening.returncode == 0, stderr
        assert json.loads(stdout)["payload"] == "after restart"
        await asyncio.wait_for(following, 30)
        assert follower.received == 1
    finally:
        following.cancel()
        if listening.returncode is None:
            listening.kill()
        first.stop()
        if second is not None:
            second.stop()


async def test_publish_uses_the_broker_settings_tls_ca_and_cluster_nodes(
    server: EventsServer, exchange_name: str, certificates: tuple[Path, Path, Path]
) -> None:
    ca, cert, key = certificates
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    binding = [{"exchange": exchange_name, "routingKeyPattern": "#"}]
    async with SSEReader(server.url(binding)) as reader:
        await reader.wait_for("ready")
        with TcpProxy.running(ssl=context) as tls_front:
            down = free_port()  # the first node answers nothing: the next one is used
            env = {
                "PULSE_AMQPS": "true",
                "PULSE_HOSTNAME": f"localhost:{down},localhost:{tls_front.port}",
                "TC_EVENTS_PULSE__TLS_CA_FILE": str(ca),
            }
            done = await tc_events("publish", exchange_name, "k", '"over tls"', env=env)
        assert done.returncode == 0, done.stderr
        (message,) = await reader.wait_for("message")
    assert json.loads(message.data)["payload"] == "over tls"


class Terminal:
    """A pseudo-terminal to run a command on: what a person at a terminal would see."""

    def __init__(self) -> None:
        self.leader, self.follower = os.openpty()
        self.seen = b""

    def read(self, timeout: float = 0.2) -> str:
        """Everything written so far (waits up to ``timeout`` for more)."""
        while select.select([self.leader], [], [], timeout)[0]:
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:  # the command ended and closed its side
                break
            if not chunk:
                break
            self.seen += chunk
        return self.seen.decode(errors="replace")

    def close(self) -> None:
        for fd in (self.leader, self.follower):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.asynccontextmanager
async def listening_on_a_terminal(
    server: EventsServer, exchange_name: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Terminal, Terminal]]:
    """``tc-events listen --count 1`` with its standard output and error on terminals."""
    out, err = Terminal(), Terminal()
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "quart_events", "listen", "--url", server.base],
        *["-e", exchange_name, "-p", "#", "--count", "1"],
        cwd=ROOT,
        stdout=out.follower,
        stderr=err.follower,
    )
    try:
        yield process, out, err
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        out.close()
        err.close()


async def test_listen_on_a_terminal_shows_a_status_line_and_readable_messages(
    server: EventsServer, exchange_name: str
) -> None:
    async with listening_on_a_terminal(server, exchange_name) as (process, out, err):
        for _ in range(100):
            if "ready: waiting for messages" in err.read(0.1):
                break
        else:
            raise AssertionError(f"no status line: {err.read()!r}")
        # a status line rewrites itself in place: carriage return, erase the line
        assert "\r\x1b[2Kready: waiting for messages" in err.read()
        await publish_with_routes(exchange_name, "primary.task1", {"state": "completed"})
        assert await asyncio.wait_for(process.wait(), 30) == 0
        lines = out.read().replace("\r\n", "\n").splitlines()
        assert re.fullmatch(
            rf"\d\d:\d\d:\d\d  {re.escape(exchange_name)}  primary\.task1  routes: index\.a",
            lines[0],
        ), lines
        assert "\n".join(lines[1:]) == json.dumps({"state": "completed"}, indent=2)


async def publish_with_routes(exchange: str, key: str, payload: object) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange)
        body = json.dumps(payload).encode()
        await target.publish(aio_pika.Message(body, headers={"CC": ["route.index.a"]}), key)


async def test_listen_notices_a_dead_link_by_missed_pings_and_comes_back(
    server: EventsServer, exchange_name: str
) -> None:
    """A link that dies without a word (no FIN, no RST): once, listen waited its whole
    --timeout with ~55 pings missed. Now it gives the stream up after three ping
    intervals (10 s at least), reconnects and gets what is published then."""
    proxy = TcpProxy(target_port=server.port)
    proxy.listen()
    try:
        listening = await start_listen(
            *["--url", f"http://127.0.0.1:{proxy.port}", "-e", exchange_name, "-p", "#"],
            *["--count", "1", "--timeout", "60"],
        )
        await wait_until(lambda: server.stats()["streams"] == 1, timeout=20)
        await asyncio.sleep(2.5)  # two pings (1 s apart in the test profile): the interval
        ended = server.output().count("stream ended")
        proxy.freeze()
        # Within about three intervals the listener gives the silent stream up (closing
        # it: the proxy passes that on) and is back, on a new connection.
        await wait_until(lambda: server.output().count("stream ended") > ended, timeout=20)
        await wait_until(lambda: server.stats()["streams"] == 1, timeout=20)
        await wait_until(lambda: (exchange_name, "#") in server.broker_bindings(), timeout=10)
        await asyncio.sleep(0.5)
        await publish_with_routes(exchange_name, "after.freeze", {"back": True})
        stdout, stderr = await asyncio.wait_for(listening.communicate(), 30)
        assert listening.returncode == 0, stderr
        assert json.loads(stdout.decode())["payload"] == {"back": True}
    finally:
        proxy.close()


async def test_listen_prints_any_valid_json_and_never_lets_a_publisher_drive_the_terminal(
    server: EventsServer, exchange_name: str
) -> None:
    """A lone surrogate escape is valid JSON (it once crashed listen with a traceback);
    control characters in a payload or a routing key (OSC title, OSC 52 clipboard,
    clear screen) are shown escaped on a terminal; the status line is erased before a
    message heading."""
    piped = await start_listen("--url", server.base, "-e", exchange_name, "-p", "#", "--count", "1")
    await wait_until(lambda: (exchange_name, "#") in server.broker_bindings(), timeout=20)
    await publish(exchange_name, "k", b'{"note": "\\ud800"}')
    stdout, stderr = await asyncio.wait_for(piped.communicate(), 30)
    assert piped.returncode == 0, stderr
    assert b"Traceback" not in stderr
    assert json.loads(stdout.decode())["payload"] == {"note": "\ud800"}

    async with listening_on_a_terminal(server, exchange_name) as (process, out, err):
        for _ in range(100):
            if "ready: waiting for messages" in err.read(0.1):
                break
        hostile = "\x1b]0;owned\x07\x1b]52;c;ZXZpbA==\x07\x1b[2J\x9b1m"
        await publish(exchange_name, f"key.{hostile}", json.dumps({"text": hostile}).encode())
        assert await asyncio.wait_for(process.wait(), 30) == 0
        shown = out.read()
        assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
        assert "key.\\x1b]0;owned\\x07" in shown  # the routing key, escaped
        assert '"\\u001b]0;owned\\u0007' in shown  # the payload, as JSON escapes it
        assert "\\x9b1m" in shown
        assert err.read().endswith("\r\x1b[2K")  # the status line erased before the heading
