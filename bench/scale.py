"""Scale on one machine: how many streams, how fast a crowd gets back in, what it costs.

- ``burst``: ``--streams`` EventSource-like clients connect as fast as they can.
- ``wave``: ``--held`` streams are open (their pings watched), then ``--streams`` more
  come within ``--spread`` seconds, as a restart's jittered ``retry:`` spreads them.
- ``hold``: ``--streams`` streams come within ``--spread`` seconds and stay for
  ``--hold`` seconds: memory, pings, health answers meanwhile, and one message
  published to all of them: publish to the kernel's receipt in the client's socket
  (``SO_TIMESTAMPNS``) and to the client's read, p50/p99, and the CPU it cost the
  server and each client; ``--hold-reads S`` leaves it unread for S seconds, so that
  the server's writes do not share the 2 cores with 20 client processes' reads.

Health probes ask both the main port and ``server.health_port``, reported by phase
(the crowd coming, held, a message being delivered).

Every row gives the admission rate (streams ready per second per worker, from the
first connect to the last ready), the server's RSS (all workers), the kernel's listen
queue overflows meanwhile, and the CPU of every process: the server (all workers),
RabbitMQ, each client process (clients are spread over ``--sources`` loopback
addresses, 127.0.0.2 and up, so that none runs out of ports).

Run: ``.venv/bin/python bench/scale.py burst --streams 36000 --workers 2``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import threading
import time
from typing import Any

from loadgen import Job, LoadGenerator, Report
from run import (
    broker_pid,
    cpu_of,
    events_server,
    exchange_for_run,
    free_port,
    percentile,
    publish,
    rss_of,
    slowest_health_answer_ms,
    tree_cpu,
)

PROBE_INTERVAL = 0.25  # seconds between two health probes of a port
STREAMS_PER_PROCESS = 5000  # a client process well below a core while streams come


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    with open("/proc/net/netstat") as netstat:
        lines = netstat.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(fields["ListenOverflows"])
    return 0


def sources(count: int) -> tuple[str, ...]:
    return tuple(f"127.0.0.{2 + n}" for n in range(count))


def processes_for(streams: int) -> int:
    return max(2, -(-streams // STREAMS_PER_PROCESS))


PHASES = ("coming", "held", "delivering")


class HealthWatch:
    """The slowest health answer on ``port``, by phase (the crowd comes, it is held, a
    message is delivered), one ask every ``PROBE_INTERVAL``. In a process of its own:
    in a thread of the bench's it waited for the bench's own lock."""

    def __init__(self, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.phase_index = context.Value("i", 0)
        self.done = context.Event()
        self.results = context.Queue()
        self.process = context.Process(
            target=_probe, args=(port, self.phase_index, self.done, self.results)
        )
        self.slowest_ms: dict[str, float] = {}
        self.failures = 0

    def start(self) -> None:
        self.process.start()

    def enter(self, phase: str) -> None:
        self.phase_index.value = PHASES.index(phase)

    def stop(self) -> None:
        self.done.set()
        self.slowest_ms, self.failures = self.results.get(timeout=30)
        self.process.join(10)


def _probe(port: int, phase_index: Any, done: Any, results: Any) -> None:
    slowest: dict[str, float] = {}
    failures = 0
    while not done.wait(PROBE_INTERVAL):
        phase = PHASES[phase_index.value]
        try:
            answer = slowest_health_answer_ms(port, 1)
        except OSError:
            failures += 1
            continue
        slowest[phase] = max(slowest.get(phase, 0.0), answer)
    results.put((slowest, failures))


class CpuSamples(threading.Thread):
    """The server's CPU (all workers) every 50 ms from its start: what it spent until a
    moment, without what came after (the clients closing their streams)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), tree_cpu(self.pid)))
            if self.done.wait(0.05):
                return

    def since_start(self, moment: float) -> float:
        """CPU seconds from the start to the first sample at or after ``moment``."""
        first = self.samples[0][1]
        return next((cpu for at, cpu in self.samples if at >= moment), self.samples[-1][1]) - first


def crowd(args: argparse.Namespace, workload: str) -> dict[str, Any]:
    spread = 0.0 if workload == "burst" else args.spread
    health_port = free_port()
    with (
        events_server(
            workers=str(args.workers),
            ping_interval=str(args.ping_interval),
            max_streams=str(args.streams + args.held + 1000),
            health_port=str(health_port),
        ) as server,
        exchange_for_run() as exchange,
    ):
        time.sleep(2 + args.workers)  # the workers start
        pid = server.process.pid
        before_rss = rss_of(pid)
        row: dict[str, Any] = {"workload": workload, "workers": args.workers}
        held: LoadGenerator | None = None
        if args.held:
            held = LoadGenerator(
                Job(
                    "sse",
                    server.port,
                    exchange,
                    "bench.#",
                    args.held,
                    count_pings=True,
                    arrival_times=True,  # ping gaps by the kernel's receive times
                    sources=sources(args.sources),
                ),
                processes_for(args.held),
            )
            ready, failures, _ = held.start()
            row["held_ready"], row["held_failed"] = len(ready), failures
        job = Job(
            "sse",
            server.port,
            exchange,
            "bench.#",
            args.streams,
            arrival_times=True,  # the leaner reader; pings by the kernel's receive times
            expected=1 if workload == "hold" else 0,  # the one message after the hold
            count_pings=workload == "hold",
            sources=sources(args.sources),
            spread_s=spread,
        )
        generator = LoadGenerator(job, processes_for(args.streams))
        # Probes on the main port wait behind the crowd in its listen queue; on the
        # health port (server.health_port) they do not.
        healths = {"main port": HealthWatch(server.port), "health port": HealthWatch(health_port)}
        for health in healths.values():
            health.start()
        overflows = listen_overflows()
        broker = broker_pid()
        server_cpu, broker_cpu, began = tree_cpu(pid), cpu_of(broker), time.time()
        ready, failures, first_failure = generator.start()
        admitted_s = time.time() - began
        admission_cpu = tree_cpu(pid) - server_cpu
        row |= {
            "streams": args.streams,
            "ready": len(ready),
            "failed": failures,
            "admitted_in_s": admitted_s,
            # A burst: ready streams per second per worker, each stream timed from its
            # own connect (a spread crowd comes no faster than its window lets it).
            "ready_per_s_per_worker": len(ready) / max(ready, default=1) / args.workers
            if not spread
            else None,
            "slowest_ready_s": max(ready, default=float("nan")),
            # What a new stream costs the server: its CPU from the first connect to the
            # last ready (all workers), per stream ready (the open streams' pings in it).
            "admission_cpu_ms_per_stream": admission_cpu * 1000 / max(1, len(ready)),
            "listen_overflows": listen_overflows() - overflows,
        }
        if first_failure:
            row["first_failure"] = first_failure
        for health in healths.values():
            health.enter("held")
        server_cpu_at = CpuSamples(pid)
        if workload == "hold":
            time.sleep(args.hold)
            for health in healths.values():
                health.enter("delivering")
            if args.hold_reads:
                generator.hold_reads(True)
                time.sleep(1)  # every client process has seen it
            server_cpu_at.start()
            published_at = time.time()
            asyncio.run(publish(exchange, 1))
            if args.hold_reads:
                time.sleep(args.hold_reads)
                generator.hold_reads(False)
        report = finish(generator, 1 if workload == "hold" else 0)
        server_cpu_at.done.set()
        for health in healths.values():
            health.stop()
        elapsed = time.time() - began
        after_rss = rss_of(pid)
        row |= {
            "server_rss_mib": after_rss / 2**20,
            "rss_per_stream_kib": (after_rss - before_rss) / max(1, len(ready)) / 1024,
            **{
                f"slowest_health_ms ({where})": {k: round(v) for k, v in h.slowest_ms.items()}
                for where, h in healths.items()
            },
            **{f"health_failures ({where})": h.failures for where, h in healths.items()},
            "server_cores": (tree_cpu(pid) - server_cpu) / elapsed,
            "broker_cores": (cpu_of(broker) - broker_cpu) / elapsed,
            "client_cores": [round(cpu / elapsed, 2) for cpu in report.process_cpu_total],
            "client_peak_rss_mib": [round(rss / 2**20) for rss in report.process_peak_rss],
            "broker_rss_mib": round(rss_of(broker) / 2**20),
        }
        if workload == "hold":
            row |= lateness(report, args.ping_interval, "ping")
            row["delivered"] = report.received
            # Publish to the client's socket (the kernel's receive time), and to the
            # client's read (the load generator's own turns in it).
            row["delivery_p50_s"] = percentile(report.arrivals, 0.5)
            row["delivery_p99_s"] = percentile(report.arrivals, 0.99)
            row["read_p50_s"] = percentile(report.latencies, 0.5)
            row["read_p99_s"] = percentile(report.latencies, 0.99)
            # CPU from the publish to every stream's receipt: the server's (all workers),
            # and each client process's from its first receipt to its last.
            written = published_at + max(report.arrivals, default=0.0)
            row["delivery_server_cpu_s"] = server_cpu_at.since_start(written)
            row["reads_held_s"] = args.hold_reads
            row["delivery_client_cpu_s"] = [round(cpu, 2) for cpu in report.message_cpu]
        if held is not None:
            held.stop()
            held_report = held.finish(60)
            row |= lateness(held_report, args.ping_interval, "held_ping")
            row["held_client_cores"] = [
                round(cpu / elapsed, 2) for cpu in held_report.process_cpu_total
            ]
        return row


def finish(generator: LoadGenerator, expected: int) -> Report:
    """Until each stream has ``expected`` messages (0: stop now); the merged report."""
    if not expected:
        generator.stop()
    return generator.finish(120)


def lateness(report: Report, interval: float, name: str) -> dict[str, Any]:
    """How late the latest ping came (the largest gap against the interval), in %."""
    largest = max(report.ping_gaps, default=float("nan"))
    return {
        f"{name}_max_gap_s": largest,
        f"{name}_p99_gap_s": percentile(report.ping_gaps, 0.99),
        f"{name}_late_pct": (largest / interval - 1) * 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", choices=["burst", "wave", "hold"])
    parser.add_argument("--streams", type=int, default=36_000)
    parser.add_argument("--held", type=int, default=0, help="streams open before (wave)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sources", type=int, default=8, help="client loopback addresses")
    parser.add_argument("--spread", type=float, default=10.0, help="seconds (wave, hold)")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds (hold)")
    parser.add_argument("--ping-interval", type=float, default=5.0)
    parser.add_argument(
        "--hold-reads",
        type=float,
        default=0.0,
        help="hold: the clients leave the message in their sockets for this many seconds "
        "after it is published (the kernel's receive times stay true; the server's writes "
        "do not share the cores with the clients' reads, as with clients on other machines)",
    )
    args = parser.parse_args()
    print(json.dumps(crowd(args, args.workload), default=str), flush=True)


if __name__ == "__main__":
    main()
