"""Benchmarks: this service against RabbitMQ Web-STOMP and raw AMQP consumers.

    .venv/bin/python bench/run.py                 # every workload, medians of 3
    .venv/bin/python bench/run.py fanout --runs 1 # one workload, one run

Needs the local RabbitMQ with the Web-STOMP plugin (enabled here if it is not:
`rabbitmq-plugins enable rabbitmq_web_stomp`). Starts its own tc-events server.
Prints a table with ratios; see bench/README.md for the last results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq

sys.path.insert(0, str(Path(__file__).parent))
from clients import AMQP_URL
from lean_amqp import LeanPublisher
from loadgen import Job, LoadGenerator, Report

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("sse", "ws", "stomp", "amqp")
NAMES = {"sse": "tc-events", "ws": "tc-events WS", "stomp": "Web-STOMP", "amqp": "raw AMQP"}
OURS = ("sse", "ws")  # served by the tc-events server of the run: its CPU is counted
BODY_SIZE = 1024
Row = dict[str, Any]  # figures by name; a `why` text where a run failed or was not run
SERVER_PID: int | None = None  # the tc-events server of this run (its workers are children)
WORKERS = "1"
# Subscribers are spread over more processes until none uses more than SPREAD_ABOVE
# of a core over the measured window; a row where one still uses more than SATURATED
# (one stream cannot be spread) is marked client-bound and left out of the ratios.
SPREAD_ABOVE = 0.5
SATURATED = 0.8
MAX_PROCESSES = 16
SPREAD: dict[tuple[str, int], int] = {}  # processes found enough, per (system, streams)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_of(pid: int) -> int:
    """Resident memory of a process and its children (the workers, with --workers)."""
    total = 0
    for each in [pid, *children_of(pid)]:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(child) for child in children]
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children."""
    return sum(cpu_of(each) for each in [pid, *children_of(pid)])


def broker_pid() -> int:
    """RabbitMQ's Erlang VM."""
    out = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout
    return int(out.split()[0])


@contextmanager
def cpu_seconds(row: Row, server_pid: int | None) -> Iterator[None]:
    """Add the CPU seconds the server (with its workers) and the broker used meanwhile."""
    broker = broker_pid()
    server_before = tree_cpu(server_pid) if server_pid else 0.0
    broker_before = cpu_of(broker)
    yield
    if server_pid:
        row["server_cpu_s"] = tree_cpu(server_pid) - server_before
    row["broker_cpu_s"] = cpu_of(broker) - broker_before


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    namespace: str = ""


@contextmanager
def events_server(extra_env: dict[str, str] | None = None, **settings: str) -> Iterator[Server]:
    """A server of ``server.*`` ``settings`` (and any other variables in ``extra_env``)."""
    port = free_port()
    env = {
        **os.environ,
        "PULSE_NAMESPACE": f"bench-{uuid.uuid4().hex[:6]}",
        "TC_EVENTS_SERVER__MAX_STREAMS": "50000",
        **{f"TC_EVENTS_SERVER__{key.upper()}": value for key, value in settings.items()},
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "quart_events", "server", "--port", str(port)],
        env=env,
        cwd=ROOT,
        # BENCH_SERVER_LOG=<file>: the server's log there, to see what it did
        stderr=open(os.environ["BENCH_SERVER_LOG"], "ab")  # noqa: SIM115 (the child's)
        if os.environ.get("BENCH_SERVER_LOG")
        else subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                raise RuntimeError("tc-events did not start") from None
            time.sleep(0.05)
    try:
        yield Server(process, port, env["PULSE_NAMESPACE"])
    finally:
        process.terminate()
        process.wait(30)


def broker_socket_room() -> int:
    """How many more client sockets RabbitMQ can take (its file-descriptor limit).

    Web-STOMP takes one per subscriber; running it past this limit breaks the broker
    for everyone (seen here: `emfile`, crashed queues), so such runs are refused."""
    out = subprocess.run(
        ["rabbitmqctl", "status", "--formatter", "json"], capture_output=True, text=True, timeout=60
    ).stdout
    descriptors = json.loads(out)["file_descriptors"]
    return int(descriptors["sockets_limit"]) - int(descriptors["sockets_used"])


def ensure_web_stomp() -> None:
    try:
        socket.create_connection(("127.0.0.1", 15674), 1).close()
    except OSError:
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_web_stomp"], check=True, capture_output=True
        )
        time.sleep(3)


PAD = b"x" * (BODY_SIZE - 40)


def body(n: int, stamp: float) -> bytes:
    """A 1 KiB JSON object carrying its publish time (for latency)."""
    return b'{"n":%d,"t":%.6f,"pad":"%s"}' % (n, stamp, PAD)


async def publish(exchange: str, count: int, rate: float | None = None) -> tuple[float, float]:
    """Publish ``count`` 1 KiB JSON messages (at ``rate`` per second, or flat out).

    The lean publisher marshals every message of a flat-out run before the clock
    starts, so that publishing is writing bytes and never what sets the pace."""
    publisher = await LeanPublisher.connect()
    await publisher.open_channel()
    keys = [f"bench.{n}" for n in range(10)]
    if rate:
        started = time.time()
        for n in range(count):
            delay = started + n / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await publisher.send(publisher.frames(exchange, keys[n % 10], body(n, time.time())))
    else:
        stamp = time.time()
        frames = [publisher.frames(exchange, keys[n % 10], body(n, stamp)) for n in range(count)]
        started = time.time()
        for at in range(0, count, 100):
            await publisher.send(b"".join(frames[at : at + 100]))
    finished = time.time()
    await publisher.flush(exchange)
    publisher.close()
    return started, finished


async def declare(exchange: str, delete: bool = False) -> None:
    connection = await aiormq.connect(AMQP_URL)
    channel = await connection.channel()
    if delete:
        await channel.exchange_delete(exchange)
    else:
        await channel.exchange_declare(exchange, exchange_type="topic")
    await connection.close()


@contextmanager
def exchange_for_run() -> Iterator[str]:
    name = f"bench-{uuid.uuid4().hex[:8]}"  # no `/`: Web-STOMP destinations split on it
    asyncio.run(declare(name))
    try:
        yield name
    finally:
        asyncio.run(declare(name, delete=True))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def refuse_stomp(system: str, streams: int) -> Row:
    if system != "stomp":
        return {}
    room = broker_socket_room()
    if streams > room - 50:
        return {
            "not_run": 1,
            "why": f"needs {streams} broker sockets, RabbitMQ has room for {room}",
        }
    return {}


def processes_for(streams: int) -> int:
    return 1 if streams == 1 else 2 if streams <= 100 else 4


# -- workloads ---------------------------------------------------------------------


def fanout(system: str, port: int, streams: int, messages: int) -> Row:
    """K streams on one exchange, M messages flat out: deliveries/s (first publish to last
    receipt) and deliveries per server-side CPU-second.

    A run whose busiest subscriber process used more than ``SPREAD_ABOVE`` of a core is
    run again with twice the processes (the process count is kept for the next runs);
    one that cannot be spread further and is still above ``SATURATED`` is marked."""
    refused = refuse_stomp(system, streams)
    if refused:
        return refused
    processes = SPREAD.get((system, streams), processes_for(streams))
    while True:
        row = fanout_once(system, port, streams, messages, processes)
        busiest = max(row.get("subscriber_cores", [0.0]))
        if busiest <= SPREAD_ABOVE or processes >= min(streams, MAX_PROCESSES) or "why" in row:
            break
        processes = SPREAD[(system, streams)] = min(streams, MAX_PROCESSES, processes * 2)
        print(f"  (a subscriber process used {busiest:.2f} core: {processes} processes)")
    if busiest > SATURATED:
        row["client_bound"] = 1
    return row


def fanout_once(system: str, port: int, streams: int, messages: int, processes: int) -> Row:
    with exchange_for_run() as exchange:
        generator = LoadGenerator(
            Job(system, port, exchange, "bench.#", streams, expected=messages), processes
        )
        _, failures, failure = generator.start()
        if failures:
            generator.stop()
            generator.finish(10)
            return {"failed": failures, "why": failure}
        cpu: Row = {}
        with cpu_seconds(cpu, SERVER_PID if system in OURS else None):
            started, _ = asyncio.run(publish(exchange, messages))
            report = generator.finish(timeout=300)
    expected = streams * messages
    elapsed = report.last_receipt - started
    server_side = cpu.get("server_cpu_s", 0.0) + cpu["broker_cpu_s"]
    row: Row = {
        "deliveries_per_s": report.received / elapsed if elapsed > 0 else 0.0,
        "per_server_cpu_s": report.received / server_side if server_side > 0 else 0.0,
        "lost": expected - report.received,
        **cpu,
        "subscriber_cores": subscriber_cores(report, elapsed),
        "elapsed_s": elapsed,
    }
    if report.broken:
        row.update(broken=report.broken, why=report.first_failure)
    return row


def subscriber_cores(report: Report, elapsed: float) -> list[float]:
    """Each subscriber process's CPU over the measured window, in cores, busiest first."""
    if elapsed <= 0:
        return []
    return sorted((cpu / elapsed for cpu in report.process_cpu), reverse=True)


def latency(
    system: str, port: int, streams: int = 10, rate: float = 1000, seconds: float = 5
) -> Row:
    """10 streams, 1,000 messages/s: publish-to-receipt p50 and p99 (ms)."""
    messages = int(rate * seconds)
    with exchange_for_run() as exchange:
        generator = LoadGenerator(
            Job(system, port, exchange, "bench.#", streams, expected=messages, want_times=True),
            2,
        )
        generator.start()
        cpu: Row = {}
        with cpu_seconds(cpu, SERVER_PID if system in OURS else None):
            started, _ = asyncio.run(publish(exchange, messages, rate=rate))
            report = generator.finish(timeout=60)
    return {
        "p50_ms": percentile(report.latencies, 0.50) * 1000,
        "p99_ms": percentile(report.latencies, 0.99) * 1000,
        "lost": streams * messages - report.received,
        **cpu,
        "subscriber_cores": subscriber_cores(report, report.last_receipt - started),
    }


def connect(system: str, port: int, streams: int = 1000) -> Row:
    """1,000 streams opened at once: time until all are ready, p50 and p99 per stream."""
    refused = refuse_stomp(system, streams)
    if refused:
        return refused
    with exchange_for_run() as exchange:
        generator = LoadGenerator(Job(system, port, exchange, "bench.#", streams), 4)
        cpu: Row = {}
        with cpu_seconds(cpu, SERVER_PID if system in OURS else None):
            # The workers' own start-up (a fresh Python each) is not the system's time:
            # per-stream times are measured inside the workers, from each stream's start.
            ready, failures, failure = generator.start()
        generator.stop()
        report = generator.finish(30)
    result: Row = {
        "all_ready_s": max(ready) if ready else float("nan"),
        "p50_ms": percentile(ready, 0.50) * 1000,
        "p99_ms": percentile(ready, 0.99) * 1000,
        "failed": failures,
        **cpu,
        "subscriber_process_cpu_s": sorted(report.process_cpu_total, reverse=True),
    }
    if failures:
        result["why"] = failure
    return result


HEALTH_PATHS = ("/__lbheartbeat__", "/__heartbeat__", "/__version__", "/api/events/v1/ping")


def slowest_health_answer_ms(port: int, tries: int = 20) -> float:
    """The slowest of ``tries`` answers of each health endpoint, each on a new connection."""
    slowest = 0.0
    for _ in range(tries):
        for path in HEALTH_PATHS:
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), 5) as sock:
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
                while sock.recv(65536):
                    pass
            slowest = max(slowest, time.perf_counter() - started)
    return slowest * 1000


def idle(
    streams: int = 10_000, ping_interval: float = 5, hold: float = 16, kind: str = "sse"
) -> Row:
    """10,000 open streams (or ``kind="ws"``: WebSockets of one subscription each) on one
    server: RSS per stream, pings on time (SSE's; WebSocket pings are the protocol's),
    health answers."""
    with (
        events_server(ping_interval=str(ping_interval), workers=WORKERS) as server,
        exchange_for_run() as exchange,
    ):
        time.sleep(2)
        before = rss_of(server.process.pid)
        generator = LoadGenerator(
            Job(kind, server.port, exchange, "bench.#", streams, count_pings=kind == "sse"), 4
        )
        ready, failures, first_failure = generator.start()
        cpu: Row = {}
        with cpu_seconds(cpu, server.process.pid):
            held = time.time()
            time.sleep(hold)
            after = rss_of(server.process.pid)
            health_ms = slowest_health_answer_ms(server.port)
            generator.stop()
            report = generator.finish(60)
            held = time.time() - held
    return {
        "streams": len(ready),
        "failed": failures,
        "rss_per_stream_kib": (after - before) / max(1, len(ready)) / 1024,
        "rss_mib": after / 2**20,
        "max_ping_gap_s": max(report.ping_gaps, default=float("nan")),
        "p99_ping_gap_s": percentile(report.ping_gaps, 0.99),
        "slowest_health_ms": health_ms,
        **cpu,
        "subscriber_cores": subscriber_cores(report, held),
        **({"first_failure": first_failure} if failures else {}),
    }


# -- the run -----------------------------------------------------------------------


def median_of(runs: int, measure: object, *args: object) -> Row:
    """Medians of the numbers; lists (per-process cores) from the median run of the
    first figure; ``client_bound`` if any run was."""
    results = [measure(*args) for _ in range(runs)]  # type: ignore[operator]
    first = next(iter(results[0]))
    ordered = sorted(results, key=lambda r: r[first] if isinstance(r[first], int | float) else 0)
    middle = ordered[len(ordered) // 2]
    merged: Row = {}
    for key in {key: None for result in results for key in result}:
        values = [r[key] for r in results if isinstance(r.get(key), int | float)]
        if key == "client_bound":
            merged[key] = 1
        elif values and len(values) == len(results):
            merged[key] = statistics.median(values)
        else:
            merged[key] = middle.get(key, next(r[key] for r in results if key in r))
    merged["runs"] = runs
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workloads", nargs="*", default=["fanout", "latency", "connect", "idle"])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is shown")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument(
        "--fanout-streams", default="1,100,1000", help="stream counts of the fan-out runs"
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="tc-events worker processes; a list (1,2) runs the workloads once for each",
    )
    args = parser.parse_args()
    systems = args.systems.split(",")
    ensure_web_stomp()
    counts = args.workers.split(",")
    for workers in counts:
        # Web-STOMP and raw AMQP do not depend on tc-events' workers: measured once.
        run_workloads(args, systems if workers == counts[0] else ["sse"], workers)
    print_table(TABLE)


TABLE: list[tuple[str, str, Row]] = []


def run_workloads(args: argparse.Namespace, systems: list[str], workers: str) -> None:
    global SERVER_PID, WORKERS
    WORKERS = workers
    tag = f" [{workers} workers]" if workers != "1" else ""
    table = TABLE
    with events_server(workers=WORKERS) as server:
        SERVER_PID = server.process.pid
        time.sleep(2)  # the workers start
        ports = {"sse": server.port, "ws": server.port, "stomp": 15674, "amqp": 5672}
        for workload in args.workloads:
            if workload == "fanout":
                for streams in map(int, args.fanout_streams.split(",")):
                    # 50,000 messages to one stream; 1,000,000 deliveries to 100 or more
                    messages = 50_000 if streams == 1 else max(200, 1_000_000 // streams)
                    for system in systems:
                        row = median_of(args.runs, fanout, system, ports[system], streams, messages)
                        table.append((f"fan-out {streams}{tag}", system, row))
                        print(f"fan-out {streams:>5}{tag} {NAMES[system]:>10}: {row}", flush=True)
            elif workload == "latency":
                for system in systems:
                    row = median_of(args.runs, latency, system, ports[system])
                    table.append((f"latency 10x1000/s{tag}", system, row))
                    print(f"latency{tag} {NAMES[system]:>10}: {row}", flush=True)
            elif workload == "connect":
                for system in systems:
                    row = median_of(args.runs, connect, system, ports[system])
                    table.append((f"connect 1000{tag}", system, row))
                    print(f"connect{tag} {NAMES[system]:>10}: {row}", flush=True)
    if "idle" in args.workloads:
        row = median_of(args.runs, idle)
        table.append((f"idle 10000{tag}", "sse", row))
        print(f"idle{tag}: {row}", flush=True)
    if "idle-ws" in args.workloads:
        row = median_of(args.runs, idle, 10_000, 5, 16, "ws")
        table.append((f"idle 10000 WebSockets{tag}", "ws", row))
        print(f"idle WebSockets{tag}: {row}", flush=True)


def print_table(table: list[tuple[str, str, Row]]) -> None:
    """Markdown tables: fan-out with both figures and their ratios, then the others."""
    by = {(w, s): r for w, s, r in table}
    fanouts = [(w, s, r) for w, s, r in table if w.startswith("fan-out")]
    if fanouts:
        print(
            "\n| workload | system | deliveries/s | per server-side CPU-s | server CPU s "
            "| RabbitMQ CPU s | subscriber processes (cores each) | s "
            "| vs Web-STOMP (/s, /CPU-s) | vs raw AMQP (/s, /CPU-s) |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | --- |")
        for workload, system, row in fanouts:
            if "why" in row and "deliveries_per_s" not in row:
                print(f"| {workload} | {NAMES[system]} | {row['why']} | | | | | | | |")
                continue
            ratios = [
                fanout_ratio(row, by.get((workload, other))) if system == "sse" else ""
                for other in ("stomp", "amqp")
            ]
            mark = " (client-bound)" if row.get("client_bound") else ""
            lost = f", {row['lost']} lost" if row.get("lost") else ""
            print(
                f"| {workload} | {NAMES[system]}{mark} | {row['deliveries_per_s']:,.0f}{lost} "
                f"| {row['per_server_cpu_s']:,.0f} | {cpu_text(row, 'server_cpu_s')} "
                f"| {row['broker_cpu_s']:.2f} | {cores_text(row)} | {row['elapsed_s']:.2f} "
                f"| {ratios[0]} | {ratios[1]} |"
            )
    others = [(w, s, r) for w, s, r in table if not w.startswith("fan-out")]
    if others:
        print("\n| workload | system | figures |")
        print("| --- | --- | --- |")
        for workload, system, row in others:
            figures = ", ".join(f"{k} {figure_text(row, k, v)}" for k, v in row.items())
            print(f"| {workload} | {NAMES[system]} | {figures} |")


def fanout_ratio(row: Row, theirs: Row | None) -> str:
    """tc-events over the other system, for deliveries/s and per server-side CPU-s."""
    if not theirs or "deliveries_per_s" not in theirs or "deliveries_per_s" not in row:
        return ""
    if row.get("client_bound") or theirs.get("client_bound"):
        return "(client-bound)"
    if not theirs["per_server_cpu_s"] or not theirs["deliveries_per_s"]:
        return ""
    return (
        f"{row['deliveries_per_s'] / theirs['deliveries_per_s']:.2f}x, "
        f"{row['per_server_cpu_s'] / theirs['per_server_cpu_s']:.2f}x"
    )


def cpu_text(row: Row, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def figure_text(row: Row, key: str, value: Any) -> str:
    if key == "subscriber_cores":
        return cores_text(row)
    if isinstance(value, list):
        return f"({', '.join(f'{each:.2f}' for each in value)})"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def cores_text(row: Row) -> str:
    cores = row.get("subscriber_cores") or []
    return f"{len(cores)} ({', '.join(f'{c:.2f}' for c in cores)})"


if __name__ == "__main__":
    main()
