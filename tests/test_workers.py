"""Several worker processes on one port (`--workers N`), with the real broker.

Connections spread over the workers (each has its own queue on the broker), a
message reaches streams on every worker, SIGTERM ends every stream with the
reconnect frame, a killed worker comes back, and a killed parent leaves no worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aio_pika
import httpx
import psutil
import pytest
from helpers import (
    EventsServer,
    SSEReader,
    free_port,
    publish,
    queues_of,
    rabbitmqctl,
    wait_until,
)
from tcp_proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@contextmanager
def workers(count: int, env: dict[str, str] | None = None) -> Iterator[EventsServer]:
    server = EventsServer.start(env, args=["--workers", str(count)])
    try:
        yield server
    finally:
        server.stop()


def metrics_directories_of(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"tc-events-metrics-{pid}-*"))


def children(server: EventsServer) -> list[psutil.Process]:
    children: list[psutil.Process] = psutil.Process(server.process.pid).children()
    return children


def queues_with_bindings(server: EventsServer, exchange: str) -> set[str]:
    """The worker queues that hold a binding to ``exchange``."""
    out = rabbitmqctl("list_bindings", "source_name", "destination_name")
    prefix = f"queue/{server.namespace}/"
    return {
        line.split("\t")[1]
        for line in out.splitlines()
        if line.startswith(f"{exchange}\t") and line.split("\t")[1].startswith(prefix)
    }


@pytest.mark.parametrize("count", [2, 4])
async def test_streams_spread_over_every_worker_and_each_gets_the_messages(
    count: int, exchange: aio_pika.abc.AbstractExchange
) -> None:
    with workers(count) as server:
        await wait_until(lambda: len(queues_of(server.namespace)) == count, 20, 0.5)
        readers = [
            SSEReader(server.url([{"exchange": exchange.name, "routingKeyPattern": f"s{n}.#"}]))
            for n in range(10 * count)
        ]
        try:
            for reader in readers:
                await reader.__aenter__()
            for reader in readers:
                await reader.wait_for("ready")
            # Every worker holds streams: its queue carries bindings.
            assert len(queues_with_bindings(server, exchange.name)) == count
            for n in range(len(readers)):
                await publish(exchange, f"s{n}.x", b'{"n": %d}' % n)
            for n, reader in enumerate(readers):
                await reader.wait_for("message")
                assert reader.data("message")[0]["payload"] == {"n": n}
        finally:
            for reader in readers:
                await reader.close()
        pids = [child.pid for child in children(server)]
        assert len(pids) == count
        code = await asyncio.to_thread(server.stop)
        assert code == 0
        assert not queues_of(server.namespace, every=True)
        assert not any(psutil.pid_exists(pid) for pid in pids)


async def read_to_end(server: EventsServer, url: str, ready: asyncio.Event) -> bytes:
    """The whole raw body of one stream, until the server ends it."""
    import httpx

    body = b""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
        async with client.stream("GET", url) as response:
            async for chunk in response.aiter_raw():
                body += chunk
                if b"event: ready" in body:
                    ready.set()
    return body


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
async def test_sigterm_ends_every_stream_on_every_worker_with_the_reconnect_frame(
    sig: signal.Signals,
) -> None:
    with workers(2, {"TC_EVENTS_SERVER__SHUTDOWN_GRACE": "5"}) as server:
        await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
        readies = [asyncio.Event() for _ in range(12)]
        bodies = [
            asyncio.ensure_future(read_to_end(server, server.url([]), ready)) for ready in readies
        ]
        for ready in readies:
            await asyncio.wait_for(ready.wait(), 10)
        metrics_dirs = metrics_directories_of(server.process.pid)
        assert len(metrics_dirs) == 1
        server.process.send_signal(sig)
        ended = await asyncio.wait_for(asyncio.gather(*bodies), 20)
        assert await asyncio.to_thread(server.process.wait, 20) == 0
        # Within the grace period: the parent killed no worker for being late.
        assert "did not stop in time" not in server.output()
        for body in ended:
            assert b"\n\nevent: reconnect\ndata: {}\nid:\nretry: " in body and body.endswith(
                b"\n\n"
            )
        assert not queues_of(server.namespace, every=True)
        output = server.output()
        assert "Traceback" not in output and "stopping 2 workers" in output
        assert not metrics_dirs[0].exists()


async def test_a_killed_worker_comes_back_and_the_others_never_notice(
    exchange: aio_pika.abc.AbstractExchange,
) -> None:
    with workers(2) as server:
        await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
        binding = [{"exchange": exchange.name, "routingKeyPattern": "#"}]
        readers = [SSEReader(server.url(binding)) for _ in range(16)]
        try:
            for reader in readers:
                await reader.__aenter__()
            for reader in readers:
                await reader.wait_for("ready")
            victim, survivor = children(server)
            victim.kill()
            await wait_until(lambda: len(children(server)) == 2, 15, 0.2)
            await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
            assert "was killed by signal 9; starting it again" in server.output()
            cut = [reader for reader in readers if reader.ended.is_set()]
            kept = [reader for reader in readers if not reader.ended.is_set()]
            assert cut and kept  # both workers had streams
            # The clients of the killed worker come back (as an EventSource would) ...
            again = [SSEReader(server.url(binding)) for _ in cut]
            for reader in again:
                await reader.__aenter__()
                await reader.wait_for("ready")
            readers += again
            # ... and every stream, old or new, gets what is published now.
            await publish(exchange, "after.kill", b'"after"')
            for reader in kept + again:
                await reader.wait_for("message")
                assert reader.data("message") == [{**reader.data("message")[0], "payload": "after"}]
            assert all(len(reader.named("ready")) == 1 for reader in kept)
            assert survivor.is_running()
        finally:
            for reader in readers:
                await reader.close()


async def test_a_killed_parent_leaves_no_worker_behind() -> None:
    with workers(2) as server:
        await wait_until(lambda: len(children(server)) == 2, 20, 0.2)
        pids = [child.pid for child in children(server)]
        left = metrics_directories_of(server.process.pid)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        await wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 20, 0.2)
        await wait_until(lambda: not queues_of(server.namespace, every=True), 20, 0.5)
    # The killed parent could not remove its metrics directory: the next start does.
    assert len(left) == 1 and left[0].exists()
    with workers(2) as server:
        await wait_until(lambda: len(children(server)) == 2, 20, 0.2)
        assert not left[0].exists()
        assert f"removed {left[0]}, left by a parent that is gone" in server.output()


async def test_workers_that_keep_failing_at_start_make_the_parent_give_up() -> None:
    """Every worker dies right after its start (here: the metrics port is taken, which
    the parent does not check): no worker is healthy, so the parent gives up."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"TC_EVENTS_SERVER__METRICS_PORT": str(taken.getsockname()[1])}
        server = EventsServer.start(env, args=["--workers", "2"], wait=False)
        try:
            code = await asyncio.to_thread(server.process.wait, 90)
            assert code == 1
            output = server.output()
            assert "failed 5 times right after its start: giving up" in output
            assert "starting it again in" in output and "Traceback" not in output
        finally:
            server.stop()


async def test_a_worker_started_during_an_outage_waits_and_the_others_keep_serving() -> None:
    """Broker gone, streams open on both workers, one worker killed: its replacement waits
    for the broker (once it died five times and the parent then ended the healthy
    worker's streams too); when the broker is back it serves, and the survivor's streams
    never ended."""
    with TcpProxy.running() as proxy:
        env = {"PULSE_PORT": str(proxy.port), "TC_EVENTS_PULSE__WAIT_FOR_BROKER": "60"}
        with workers(2, env) as server:
            await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
            readers = [SSEReader(server.url([])) for _ in range(8)]
            try:
                for reader in readers:
                    await reader.__aenter__()
                for reader in readers:
                    await reader.wait_for("ready")
                proxy.cut()
                victim = children(server)[0]
                victim.kill()
                await wait_until(lambda: len(children(server)) == 2, 15, 0.2)
                await asyncio.sleep(20)  # past five early deaths and their backoff (16 s)
                assert server.process.poll() is None
                assert len(children(server)) == 2
                assert "giving up" not in server.output()
                kept = [reader for reader in readers if not reader.ended.is_set()]
                assert kept and all(len(r.named("ready")) == 1 for r in kept)
                assert all(not r.named("reconnect") for r in kept)
                proxy.restore()
                await wait_until(lambda: len(queues_of(server.namespace)) == 2, 30, 0.5)
                for reader in kept:
                    await reader.wait_for("ready", 2, timeout=30)  # in effect again
            finally:
                for reader in readers:
                    await reader.close()


async def test_the_port_check_refuses_a_port_other_workers_share_and_not_time_wait() -> None:
    """A second `--workers` instance on the port of a first is refused (the kernel once
    split clients between them); and right after a single-process instance stopped
    with connections open (TIME-WAIT), `--workers` starts on its port at once."""
    single = EventsServer.start()
    port = single.port
    async with SSEReader(single.url([])) as reader:
        await reader.wait_for("ready")
        assert single.stop() == 0  # the server closes first: TIME-WAIT on its side
    first = EventsServer.start(port=port, args=["--workers", "2"])
    try:
        second = EventsServer.start(port=port, args=["--workers", "2"], wait=False)
        try:
            assert second.process.wait(30) == 1
        finally:
            second.stop()
        assert second.output().strip().splitlines()[-1] == (
            f"tc-events: cannot listen on http://127.0.0.1:{port}: Address already in use"
        )
        async with SSEReader(first.url([])) as reader:
            await reader.wait_for("ready")
    finally:
        first.stop()


async def test_a_hung_worker_is_found_killed_and_replaced() -> None:
    """A worker stopped with SIGSTOP holds its share of the port (once 9-11 of 20 probes
    failed and the parent logged nothing): the parent hears it fall silent, kills it and
    starts another, and every probe is answered again."""
    with workers(2) as server:
        await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
        hung = children(server)[0]
        hung.suspend()
        await wait_until(lambda: "gave no sign of life" in server.output(), 25, 0.2)
        assert f"(pid {hung.pid}) gave no sign of life for" in server.output()
        await wait_until(lambda: not hung.is_running(), 10, 0.2)
        await wait_until(
            lambda: len([c for c in children(server) if c.pid != hung.pid]) == 2, 20, 0.2
        )
        await wait_until(lambda: len(queues_of(server.namespace)) == 2, 20, 0.5)
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(20):  # new connections each time: the kernel spreads them
                async with httpx.AsyncClient(timeout=5) as fresh:
                    answer = await fresh.get(f"{server.base}/__lbheartbeat__")
                    assert answer.status_code == 200
            assert (await client.get(f"{server.base}/__heartbeat__")).status_code == 200


async def test_a_killed_parent_takes_even_a_hung_worker_with_it() -> None:
    """The parent-death signal is SIGKILL: a stopped worker cannot ignore it (with
    SIGTERM one stayed, and took 7 of 20 probes of the next instance on the port)."""
    with workers(2) as server:
        await wait_until(lambda: len(children(server)) == 2, 20, 0.2)
        hung, other = children(server)
        hung.suspend()
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        await wait_until(lambda: not hung.is_running() and not other.is_running(), 10, 0.2)


async def test_a_worker_that_keeps_dying_is_restarted_after_a_doubling_backoff() -> None:
    """A worker that had run a while comes back after 0.5 s; killed right after each
    start, after 1 s, then 2 s, then 4 s (README: "0.5 s, doubling up to 8 s"), as its
    log lines say."""
    with workers(2, {"TC_EVENTS_SERVER__LOG_FORMAT": "json"}) as server:
        await wait_until(lambda: len(children(server)) == 2, 20, 0.1)
        victim, survivor = children(server)
        await asyncio.sleep(5.5)  # past EARLY_DEATH: its first death is not "at start"
        for _ in range(4):
            victim.kill()
            known = {victim.pid, survivor.pid}
            await wait_until(lambda k=known: {c.pid for c in children(server)} - k, 20, 0.05)
            (victim,) = [c for c in children(server) if c.pid not in known]
        assert survivor.is_running()
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        delays = [
            float(line["message"].split("starting it again in ")[1].split(" s")[0])
            for line in lines
            if "starting it again in" in line["message"]
        ]
        assert delays == [0.5, 1.0, 2.0, 4.0]


async def test_the_parent_kills_a_worker_that_outlives_the_grace_and_exits_0() -> None:
    """SIGTERM to the parent while a worker is stopped (it cannot end its streams): the
    parent waits ``shutdown_grace`` plus its margin, kills it, says so, exits 0."""
    server = EventsServer.start({"TC_EVENTS_SERVER__SHUTDOWN_GRACE": "1"}, args=["--workers", "2"])
    try:
        await wait_until(lambda: len(children(server)) == 2, 20, 0.1)
        stuck, other = children(server)
        stuck.suspend()
        assert await asyncio.to_thread(server.stop, signal.SIGTERM, 30) == 0
        assert f"worker pid {stuck.pid} did not stop in time: killing it" in server.output()
        assert f"worker pid {other.pid} did not stop" not in server.output()
        assert not stuck.is_running() and not other.is_running()
    finally:
        server.stop(signal.SIGKILL)


async def test_json_logs_name_the_process_and_the_worker() -> None:
    """``log_format: json``: every line is one object with time, level, logger, message
    and pid; a worker's lines also carry its index, the parent's none."""
    with workers(2, {"TC_EVENTS_SERVER__LOG_FORMAT": "json"}) as server:
        await wait_until(lambda: server.output().count("listening on") == 2, 20, 0.1)
        pids = {child.pid: child for child in children(server)}
    lines = [json.loads(line) for line in server.output().splitlines()]
    fields = {"time", "level", "logger", "message", "pid"}
    assert lines and all(fields <= set(line) for line in lines)
    by_worker = {line["worker"]: line["pid"] for line in lines if "worker" in line}
    assert set(by_worker) == {1, 2} and set(by_worker.values()) == set(pids)
    parent = [line for line in lines if "worker" not in line]
    assert parent and {line["pid"] for line in parent} == {server.process.pid}


async def test_the_parent_answers_the_health_port_for_every_worker() -> None:
    """``server.health_port`` with workers: the parent answers it from the workers'
    beats (however busy they are), with how many serve and how many have the broker."""
    health_port = free_port()
    health = f"http://127.0.0.1:{health_port}"
    with (
        TcpProxy.running() as proxy,
        workers(
            2, {"PULSE_PORT": str(proxy.port), "TC_EVENTS_SERVER__HEALTH_PORT": str(health_port)}
        ) as server,
        httpx.Client(base_url=health, timeout=5) as client,
    ):
        assert f"tc-events: health probes on {health}" in server.output()
        assert "tc-events[1]: health probes" not in server.output()  # workers leave it

        def answer(path: str) -> tuple[int, object]:
            response = client.get(path)
            return response.status_code, response.json()

        both = {"broker": "connected", "workers": 2, "workers_connected": 2}
        await wait_until(lambda: answer("/__heartbeat__") == (200, both), 20, 0.2)
        assert answer("/__lbheartbeat__") == (200, {"workers": 2})
        assert answer("/__version__") == answer(f"{server.base}/__version__")
        proxy.cut()
        down = {"broker": "disconnected: reconnecting", "workers": 2, "workers_connected": 0}
        await wait_until(lambda: answer("/__heartbeat__") == (503, down), 20, 0.2)
        proxy.restore()
        await wait_until(lambda: answer("/__heartbeat__") == (200, both), 30, 0.2)
        hung = children(server)[0]
        hung.suspend()  # it falls silent, the parent kills it and starts another
        await wait_until(lambda: answer("/__lbheartbeat__") == (200, {"workers": 1}), 30, 0.1)
        await wait_until(lambda: answer("/__heartbeat__") == (200, both), 30, 0.2)
