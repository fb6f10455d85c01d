"""A RabbitMQ cluster of two nodes that the test starts itself: an instance on each node
serves its streams (messages published on either node reach both), and an instance
whose node stops moves to the other one. That instances given one node list start on
nodes picked at random is tested in test_broker.py (60 starts reach every node).

The nodes have their own names, ports, data and log directories and plugin list;
the machine's own broker (rabbit@localhost on 5672) is never touched, and the
nodes are stopped and their data removed whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
import pytest
from helpers import EventsServer, SSEReader, free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@dataclass
class Node:
    name: str
    port: int
    home: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise RuntimeError(f"rabbitmqctl -n {self.name} {args[0]}: {done.stderr}")
        return done.stdout


def start_node(name: str) -> Node:
    """Start a RabbitMQ node of its own, detached, and wait until it answers."""
    home = Path(tempfile.mkdtemp(prefix=f"tc-events-{name}-"))
    port, dist_port = free_port(), free_port()
    (home / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"
    )
    (home / "enabled_plugins").write_text("[].\n")
    for directory in ("mnesia", "log"):
        (home / directory).mkdir()
    user = pwd.getpwnam("rabbitmq")
    for path in (home, *home.iterdir()):
        os.chown(path, user.pw_uid, user.pw_gid)
    node = Node(f"{name}@localhost", port, home)
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node.name,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PID_FILE": str(home / "pid"),
    }
    subprocess.run(
        ["rabbitmq-server", "-detached"], env=env, check=True, capture_output=True, timeout=60
    )
    for _ in range(120):  # -detached returns before the node answers
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            node.ctl("ping", timeout=10)
            break
        subprocess.run(["sleep", "0.5"], check=True)
    node.ctl("await_startup", timeout=120)
    return node


def stop_node(node: Node) -> None:
    with contextlib.suppress(Exception):
        node.ctl("stop", timeout=60)
    shutil.rmtree(node.home, ignore_errors=True)


@contextlib.contextmanager
def cluster() -> Iterator[tuple[Node, Node]]:
    suffix = uuid.uuid4().hex[:6]
    nodes: list[Node] = []
    try:
        nodes.append(start_node(f"tce-a-{suffix}"))
        nodes.append(start_node(f"tce-b-{suffix}"))
        first, second = nodes
        second.ctl("stop_app")
        second.ctl("join_cluster", first.name)
        second.ctl("start_app")
        second.ctl("await_startup")
        yield first, second
    finally:
        for node in reversed(nodes):
            stop_node(node)


async def publish_on(node: Node, exchange: str, key: str, body: bytes) -> None:
    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange)
        await target.publish(aio_pika.Message(body), routing_key=key)


def node_of(server: EventsServer) -> str:
    return str(httpx.get(f"{server.base}/__heartbeat__", timeout=5).json().get("node"))


async def test_instances_on_two_nodes_and_failover_to_the_other_node() -> None:
    with cluster() as (a, b):
        exchange = "exchange/test/cluster"
        connection = await aio_pika.connect(a.url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        # Node a is 127.0.0.1 and node b is localhost, so the heartbeat tells them apart.
        both = f"127.0.0.1:{a.port},localhost:{b.port}"
        env = {"PULSE_HOSTNAME": both, "TC_EVENTS_PULSE__RECONNECT_MAX_DELAY": "1"}
        with EventsServer.running(env) as moving:
            first = node_of(moving)
            other_node = f"localhost:{b.port}" if first == "127.0.0.1" else f"127.0.0.1:{a.port}"
            # The second instance is pinned to the other node: one instance per node.
            with EventsServer.running({"PULSE_HOSTNAME": other_node}) as staying:
                assert {node_of(moving), node_of(staying)} == {"127.0.0.1", "localhost"}
                binding = [{"exchange": exchange, "routingKeyPattern": "#"}]
                async with (
                    SSEReader(moving.url(binding)) as on_moving,
                    SSEReader(staying.url(binding)) as on_staying,
                ):
                    await on_moving.wait_for("ready")
                    await on_staying.wait_for("ready")
                    await publish_on(a, exchange, "on.a", b'"a"')
                    await publish_on(b, exchange, "on.b", b'"b"')
                    for reader in (on_moving, on_staying):
                        await reader.wait_for("message", 2)
                        assert sorted(m["payload"] for m in reader.data("message")) == ["a", "b"]
                    # The node of the moving instance stops: it moves to the other node.
                    used, kept = (a, b) if first == "127.0.0.1" else (b, a)
                    await asyncio.to_thread(used.ctl, "stop_app")
                    await on_moving.wait_for("ready", 2, timeout=30)
                    assert node_of(moving) != first
                    await publish_on(kept, exchange, "after", b'"after failover"')
                    await on_moving.wait_for("message", 3)
                    await on_staying.wait_for("message", 3)
                    assert on_moving.data("message")[-1]["payload"] == "after failover"
                    assert not on_staying.ended.is_set()
                    # No error event on the way, on either stream, and both still open.
                    assert not on_moving.named("error") and not on_staying.named("error")
                    assert not on_moving.ended.is_set()
