"""A rolling restart under load, as docs/deploying.md says to do one.

``--streams`` EventSources (npm ``eventsource``, the client Taskcluster's pages use, in
``--node`` Node processes) follow one stream each through the documented nginx to two
instances of ``--workers`` workers each. Each instance in turn gets SIGTERM and is
started again; the next waits until every EventSource is ``ready`` again. Then one
message is published, and every EventSource must get it.

Prints, per restart, how long until every EventSource was ``ready`` again, and for the
run: how many answers nginx gave with a 5xx status (its access log), how many
EventSources stopped for good (an error that leaves ``readyState`` CLOSED), the fewest
``ready`` events any EventSource had (2 or more: it came back after its instance
restarted), how many got the last message, and the CPU of every process (each instance
until its restart, nginx, each Node process, RabbitMQ).

nginx runs with ``--nginx-workers`` worker processes (the document's ``auto`` is one per
core, 2 here): each holds ``worker_connections / 2`` streams (9,500), so 20,000 streams
need more of them than this machine has cores.

Run: ``.venv/bin/python bench/rolling.py --streams 20000``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from run import ROOT, broker_pid, cpu_of, exchange_for_run, tree_cpu

sys.path.insert(0, str(ROOT / "tests"))
from helpers import EventsServer, NodeClient, connect_target, free_port, npm_modules
from helpers import publish as publish_one
from nginx_proxy import nginx

CLOSED = 2  # an EventSource's readyState once it stopped for good


def states(clients: list[NodeClient]) -> dict[tuple[int, int], str]:
    """Each EventSource's last ``ready`` or ``error``, by (Node process, source)."""
    last: dict[tuple[int, int], str] = {}
    for index, client in enumerate(clients):
        for line in list(client.lines):
            if line["kind"] in ("ready", "error"):
                last[index, line["source"]] = line["kind"]
    return last


def settled(clients: list[NodeClient], count: int) -> bool:
    """Every EventSource is open with a ``ready`` since its last error."""
    last = states(clients)
    return len(last) == count and all(kind == "ready" for kind in last.values())


async def until(condition: Any, within: float) -> float | str:
    """Seconds until ``condition()`` held, or how long it did not (the row says so)."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > within:
            return f"not within {within:.0f} s"
        await asyncio.sleep(0.2)
    return round(time.monotonic() - began, 1)


def how_they_are(clients: list[NodeClient]) -> dict[str, int]:
    """How many EventSources are ready, reconnecting (last an error), or stopped."""
    last: dict[tuple[int, int], dict[str, Any]] = {}
    for index, client in enumerate(clients):
        for line in list(client.lines):
            if line["kind"] in ("ready", "error"):
                last[index, line["source"]] = line
    counts = {"ready": 0, "reconnecting": 0, "stopped for good": 0}
    for line in last.values():
        if line["kind"] == "ready":
            counts["ready"] += 1
        elif line["readyState"] == CLOSED:
            counts["stopped for good"] += 1
        else:
            counts["reconnecting"] += 1
    return counts


def ready_count(clients: list[NodeClient]) -> int:
    return sum(line["kind"] == "ready" for client in clients for line in list(client.lines))


def streams_open(server: EventsServer) -> int:
    """The streams an instance holds, all its workers together (its /metrics)."""
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("tc_events_streams_open "))
    return int(float(line.split()[1]))


def nginx_cpu() -> float:
    """CPU seconds of this bench's nginx: its master (the one whose command line names
    the bench's prefix) and the master's workers."""
    return sum(
        tree_cpu(process.pid)
        for process in psutil.process_iter(["cmdline"])
        if any("tc-events-nginx-" in part for part in process.info["cmdline"] or ())
    )


async def rolling(args: argparse.Namespace, node_modules: Path, exchange: str) -> dict[str, Any]:
    row: dict[str, Any] = {"streams": args.streams, "instance_workers": args.workers}
    ports = [free_port(), free_port()]
    server_args = ["--workers", str(args.workers)]
    env = {"TC_EVENTS_SERVER__PING_INTERVAL": str(args.ping_interval)}
    servers = [EventsServer.start(env, port=port, args=server_args) for port in ports]
    instance_cpu = [0.0, 0.0]
    access_log: list[str] = []
    errors: list[str] = []  # nginx's error log
    clients: list[NodeClient] = []
    broker, broker_began = broker_pid(), 0.0
    try:
        with nginx(
            ports, access_log=access_log, worker_processes=args.nginx_workers, error_log=errors
        ) as url:
            broker_began, began = cpu_of(broker), time.monotonic()
            target = url + connect_target([{"exchange": exchange, "routingKeyPattern": "#"}])
            share = args.streams // args.node
            clients = [
                NodeClient(node_modules, "es3", target, count=share, follow_s=args.follow)
                for _ in range(args.node)
            ]
            collecting = [asyncio.ensure_future(client.collect()) for client in clients]
            count = share * args.node
            row["all_ready_s"] = await until(lambda: settled(clients, count), args.patience)
            for index, port in enumerate(ports):
                instance_cpu[index] += tree_cpu(servers[index].process.pid)
                held, readies_before = streams_open(servers[index]), ready_count(clients)
                stopped = time.monotonic()
                code = await asyncio.to_thread(servers[index].stop, signal.SIGTERM, 60)
                servers[index] = EventsServer.start(env, port=port, args=server_args)
                back_up = time.monotonic() - stopped
                # Each stream it held comes back with a fresh ready, on either instance.
                waited = await until(
                    lambda h=held, r=readies_before: (
                        ready_count(clients) >= r + h and settled(clients, count)
                    ),
                    args.patience,
                )
                row[f"restart_{index + 1}"] = {
                    "streams_it_held": held,
                    "exit_code": code,
                    "back_up_s": round(back_up, 1),
                    "all_ready_again_s": round(time.monotonic() - stopped, 1)
                    if isinstance(waited, float)
                    else waited,
                    "event_sources": how_they_are(clients),
                }
            await publish_one(exchange, "after.restarts", b'"all here"')
            took = await until(lambda: len(heard_by(clients)) == count, 60)
            row["message_after_restarts"] = f"{len(heard_by(clients))} of {count}, {took} s"
            row["event_sources_at_the_end"] = how_they_are(clients)
            elapsed = time.monotonic() - began
            row["node_cores"] = [
                round(cpu_of(client.process.pid) / elapsed, 2) for client in clients
            ]
            row["nginx_cores"] = round(nginx_cpu() / elapsed, 2)
            for index, server in enumerate(servers):
                instance_cpu[index] += tree_cpu(server.process.pid)
            row["instance_cores"] = [round(cpu / elapsed, 2) for cpu in instance_cpu]
            row["broker_cores"] = round((cpu_of(broker) - broker_began) / elapsed, 3)
            for client in clients:
                client.stop()
            for task in collecting:
                task.cancel()
    finally:
        for client in clients:
            client.stop()
        for server in servers:
            server.stop()
    readies: dict[tuple[int, int], int] = {}
    stopped_for_good = 0
    client_errors: dict[str, int] = {}
    for index, client in enumerate(clients):
        for line in client.lines:
            if line["kind"] == "ready":
                readies[index, line["source"]] = readies.get((index, line["source"]), 0) + 1
            elif line["kind"] == "error":
                stopped_for_good += line["readyState"] == CLOSED
                status = f"status {line['status']}, readyState {line['readyState']}"
                client_errors[status] = client_errors.get(status, 0) + 1
    row["event_source_errors"] = client_errors
    statuses = [int(line.split('"')[2].split()[0]) for line in access_log]
    row["fewest_readies"] = min(readies.values(), default=0)
    row["stopped_for_good"] = stopped_for_good
    row["nginx_answers"] = len(statuses)
    row["nginx_5xx"] = sum(status >= 500 for status in statuses)
    kinds = [re.sub(r"^.*?\*\d+ ", "", line).split(",")[0] for line in errors]
    row["nginx_errors"] = {kind: kinds.count(kind) for kind in set(kinds)}
    return row


def heard_by(clients: list[NodeClient]) -> set[tuple[int, int]]:
    return {
        (index, line["source"])
        for index, client in enumerate(clients)
        for line in list(client.lines)
        if line["kind"] == "message"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="workers of each instance")
    parser.add_argument("--node", type=int, default=4, help="Node processes of EventSources")
    parser.add_argument("--nginx-workers", type=int, default=4)
    parser.add_argument("--follow", type=int, default=900, help="seconds the clients last")
    parser.add_argument("--patience", type=float, default=180, help="seconds to wait for all")
    parser.add_argument("--ping-interval", type=float, default=20.0)
    args = parser.parse_args()
    with npm_modules("es3@npm:eventsource@3") as modules, exchange_for_run() as exchange:
        print(json.dumps(asyncio.run(rolling(args, modules, exchange))), flush=True)


if __name__ == "__main__":
    main()
