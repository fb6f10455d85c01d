"""Load generator: worker processes that each hold many subscribers and report back.

One client process would be the bottleneck long before the server, so the
subscribers are spread over several processes; each reports its own CPU time, so a
reader can tell whether the generator, not the system measured, set the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import random
import resource
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import clients
import uvloop
from lean_amqp import LeanConsumer

WEBSOCKET_CLIENTS = {"ws": clients.ws, "stomp": clients.stomp}


@dataclass
class Job:
    kind: str  # sse | ws | stomp | amqp
    port: int
    exchange: str
    pattern: str
    streams: int
    expected: int = 0  # messages each subscriber should get; 0: run until stopped
    want_times: bool = False
    # SSE: time each message by the kernel's receive time too (``clients.sse_stamped``):
    # when the server's write reached the client's socket, whatever the client's own load.
    arrival_times: bool = False
    count_pings: bool = False
    # Loopback addresses the clients connect from, one per process in turn (127.0.0.2
    # and up: a source address has about 28,000 ports, and running out looks like the
    # server failing).
    sources: tuple[str, ...] = ("127.0.0.1",)
    source: str = ""  # this process's, set by LoadGenerator
    spread_s: float = 0.0  # open the streams evenly over this window (0: all at once)
    ready_timeout: float = 120.0


@dataclass
class Report:
    ready_after: list[float] = field(default_factory=list)  # seconds from start, per stream
    failures: int = 0
    broken: int = 0  # subscribers that died after they were ready
    first_failure: str = ""
    received: int = 0
    first_receipt: float = 0.0
    last_receipt: float = 0.0
    latencies: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # publish to the kernel's receipt
    message_cpu: list[float] = field(default_factory=list)  # per process: first to last receipt
    ping_gaps: list[float] = field(default_factory=list)  # the largest gap per stream
    cpu_seconds: float = 0.0  # from ready to the end of the measured window
    process_cpu: list[float] = field(default_factory=list)  # the same, per process
    process_cpu_total: list[float] = field(default_factory=list)  # from its start, per process
    process_peak_rss: list[int] = field(default_factory=list)  # bytes, per process


async def _work(
    job: Job, results: Any, index: int, stop: ProcessEvent, hold_reads: ProcessEvent
) -> None:
    report = Report()
    counts = [0] * job.streams
    last_ping = [0.0] * job.streams
    gaps = [0.0] * job.streams
    start = time.time()

    def receiver(stream: int) -> clients.OnMessage:
        def on_message(stamp: float | None) -> None:
            now = time.time()
            counts[stream] += 1
            if not report.first_receipt:
                report.first_receipt = now
            report.last_receipt = now
            if stamp is not None:
                report.latencies.append(now - stamp)

        return on_message

    def arrival(stream: int) -> clients.OnArrival:
        on_message = receiver(stream)

        def on_arrival(stamp: float, arrived: float) -> None:
            if not report.first_receipt:
                cpu_at_first[0] = _cpu()
            on_message(stamp)
            report.arrivals.append(arrived - stamp)

        return on_arrival

    def pinger(stream: int) -> Any:
        def on_ping(at: float | None = None) -> None:  # at: the kernel's receive time
            now = time.time() if at is None else at
            if last_ping[stream]:
                gaps[stream] = max(gaps[stream], now - last_ping[stream])
            last_ping[stream] = now

        return on_ping

    cpu_at_first = [0.0]
    readers: dict[int, Callable[[], None]] = {}  # stamped streams' sockets, to hold reads
    connection = None
    readies = [asyncio.Event() for _ in range(job.streams)]
    if job.kind == "amqp":
        # One lean connection: its subscribers set up one after another, then one reader.
        began = time.time()  # set up one after another: each is ready after all before it
        connection = await LeanConsumer.connect()
        for stream in range(job.streams):
            await clients.amqp(
                connection, job.exchange, job.pattern, receiver(stream), job.want_times
            )
            report.ready_after.append(time.time() - began)
        consuming = asyncio.ensure_future(connection.consume())

    async def one(stream: int) -> None:
        if job.spread_s:  # as a crowd that a jittered retry: spreads over its window
            await asyncio.sleep(job.spread_s * (stream + random.random()) / job.streams)
        began = time.time()
        watcher = asyncio.ensure_future(readies[stream].wait())
        ping = pinger(stream) if job.count_pings else None
        follow: Coroutine[Any, Any, None]
        if job.kind == "sse" and job.arrival_times:
            follow = clients.sse_stamped(
                job.port,
                job.exchange,
                job.pattern,
                readies[stream],
                arrival(stream),
                ping,
                job.source or job.sources[0],
                readers,
            )
        elif job.kind == "sse":
            follow = clients.sse(
                job.port,
                job.exchange,
                job.pattern,
                readies[stream],
                receiver(stream),
                job.want_times,
                ping,
                job.source or job.sources[0],
            )
        elif job.kind in WEBSOCKET_CLIENTS:  # Taskcluster's WebSocket, Web-STOMP
            follow = WEBSOCKET_CLIENTS[job.kind](
                job.port,
                job.exchange,
                job.pattern,
                readies[stream],
                receiver(stream),
                job.want_times,
            )
        else:
            raise ValueError(job.kind)
        task = asyncio.ensure_future(follow)
        done, _ = await asyncio.wait([watcher, task], return_when=asyncio.FIRST_COMPLETED)
        if watcher in done:
            report.ready_after.append(time.time() - began)
            try:
                await task
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a subscriber that died after it was ready
                report.broken += 1
                report.first_failure = report.first_failure or repr(error)[:200]
        else:
            watcher.cancel()
            failure = task.exception()
            report.failures += 1
            report.first_failure = report.first_failure or repr(failure)[:200]

    if job.kind == "amqp":
        tasks = [consuming]
    else:
        tasks = [asyncio.ensure_future(one(stream)) for stream in range(job.streams)]
    deadline = time.time() + job.spread_s + job.ready_timeout
    while len(report.ready_after) + report.failures < job.streams and time.time() < deadline:  # noqa: ASYNC110 (polling counts)
        await asyncio.sleep(0.01)
    results.put(("ready", index, report.ready_after, report.failures, report.first_failure))
    cpu_at_ready = _cpu()
    # Ping gaps count from here: while thousands of streams connect, the server is busy.
    last_ping[:] = [0.0] * job.streams
    gaps[:] = [0.0] * job.streams
    # What stays is read until the end: the collector need not walk it again and again
    # (its full passes took up to 300 ms of a core in a process of 5,000 streams).
    gc.freeze()
    loop, held = asyncio.get_running_loop(), False
    while not stop.is_set():
        if job.expected and all(count >= job.expected for count in counts):
            break
        if hold_reads.is_set() != held:  # stamped streams: leave what comes in the socket
            held = not held
            for fd, readable in readers.items():
                if held:
                    loop.remove_reader(fd)
                else:
                    loop.add_reader(fd, readable)
        await asyncio.sleep(0.01)
    report.cpu_seconds = _cpu() - cpu_at_ready
    if cpu_at_first[0]:  # what reading the messages cost this process (arrival runs)
        report.message_cpu = [_cpu() - cpu_at_first[0]]
    report.process_cpu = [report.cpu_seconds]
    report.received = sum(counts)
    report.ping_gaps = [gap for gap in gaps if gap]
    for task in tasks:
        task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.gather(*tasks, return_exceptions=True)
    if connection is not None:
        connection.close()
    del start
    report.process_cpu_total = [_cpu()]
    report.process_peak_rss = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
    results.put(("done", index, report))


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _worker(
    job: Job, results: Any, index: int, stop: ProcessEvent, hold_reads: ProcessEvent
) -> None:
    # uvloop, as the server: a client process costs less than the server it measures.
    uvloop.run(_work(job, results, index, stop, hold_reads))


class LoadGenerator:
    """Starts ``processes`` workers sharing ``job.streams`` subscribers between them."""

    def __init__(self, job: Job, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.stop_event = context.Event()
        self.hold_reads_event = context.Event()
        self.patience = job.spread_s + job.ready_timeout + 60  # seconds until all are ready
        processes = max(1, min(processes, job.streams))
        share = [job.streams // processes + (i < job.streams % processes) for i in range(processes)]
        self.workers = [
            context.Process(
                target=_worker,
                args=(
                    Job(
                        **{
                            **job.__dict__,
                            "streams": n,
                            "source": job.sources[i % len(job.sources)],
                        }
                    ),
                    self.results,
                    i,
                    self.stop_event,
                    self.hold_reads_event,
                ),
            )
            for i, n in enumerate(share)
        ]

    def start(self) -> tuple[list[float], int, str]:
        """Start the workers; wait until every subscriber is ready or failed."""
        for worker in self.workers:
            worker.start()
        ready: list[float] = []
        failures, first_failure = 0, ""
        for _ in self.workers:
            _, _, after, failed, failure = self.results.get(timeout=self.patience)
            ready += after
            failures += failed
            first_failure = first_failure or failure
        return ready, failures, first_failure

    def finish(self, timeout: float) -> Report:
        """Wait for the workers to have everything (or ``timeout``); merge their reports."""
        merged = Report()
        deadline = time.time() + timeout
        reports: list[Report] = []
        while len(reports) < len(self.workers):
            remaining = deadline - time.time()
            if remaining <= 0 and not self.stop_event.is_set():
                self.stop_event.set()
                deadline = time.time() + 30
                continue
            with contextlib.suppress(Exception):
                _, _, report = self.results.get(timeout=max(0.1, min(remaining, 1)))
                reports.append(report)
        for worker in self.workers:
            worker.join(10)
        for report in reports:
            merged.received += report.received
            merged.latencies += report.latencies
            merged.arrivals += report.arrivals
            merged.message_cpu += report.message_cpu
            merged.ping_gaps += report.ping_gaps
            merged.cpu_seconds += report.cpu_seconds
            merged.process_cpu += report.process_cpu
            merged.process_cpu_total += report.process_cpu_total
            merged.process_peak_rss += report.process_peak_rss
            merged.broken += report.broken
            merged.first_failure = merged.first_failure or report.first_failure
            if report.first_receipt:
                merged.first_receipt = min(
                    merged.first_receipt or report.first_receipt, report.first_receipt
                )
            merged.last_receipt = max(merged.last_receipt, report.last_receipt)
        return merged

    def stop(self) -> None:
        self.stop_event.set()

    def hold_reads(self, held: bool) -> None:
        """Stamped streams leave what arrives in their sockets (``held``) or read it: the
        kernel's receive times stay true, and the server's writes get the cores to
        themselves, as when the clients are on other machines."""
        if held:
            self.hold_reads_event.set()
        else:
            self.hold_reads_event.clear()
