"""Broker faults: a cut connection (through a TCP proxy), a broker restart, a broker
that is down at start, and credentials rotated while the server runs."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aio_pika
import pytest
from helpers import AMQP_URL, EventsServer, SSEReader, wait_until
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.asyncio


async def declare(name: str, durable: bool = False) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=durable)


async def delete(name: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(name)


async def publish(name: str, key: str, body: bytes) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(name)
        await exchange.publish(aio_pika.Message(body), routing_key=key)


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, error = await asyncio.wait_for(process.communicate(), 180)
    if process.returncode:
        raise RuntimeError(f"rabbitmqctl {args[0]} failed: {error.decode()}")


def binding(exchange: str) -> list[dict[str, str]]:
    return [{"exchange": exchange, "routingKeyPattern": "#"}]


async def test_a_cut_connection_keeps_streams_and_restores_bindings() -> None:
    kept, gone = (f"exchange/test/cut-{name}-{uuid.uuid4().hex[:6]}" for name in ("kept", "gone"))
    await declare(kept)
    await declare(gone)
    try:
        with (
            TcpProxy.running() as proxy,
            EventsServer.running({"PULSE_PORT": str(proxy.port)}) as server,
        ):
            async with (
                SSEReader(server.url(binding(kept))) as alive,
                SSEReader(server.url(binding(gone))) as doomed,
            ):
                await alive.wait_for("ready")
                await doomed.wait_for("ready")
                proxy.cut()
                await delete(gone)  # the exchange disappears while the server is away
                pings = len(alive.named("ping"))
                await alive.wait_for("ping", pings + 2, timeout=10)  # pings go on meanwhile
                assert not alive.ended.is_set()
                proxy.restore()
                await alive.wait_for("ready", 2, timeout=20)
                await doomed.wait_ended(timeout=20)
                assert [e.event for e in doomed.events if e.event != "ping"] == ["ready", "error"]
                assert json.loads(doomed.events[-1].data) == f"exchange `{gone}` does not exist"
                await publish(kept, "after.reconnect", b'{"ok": true}')
                (message,) = await alive.wait_for("message")
                assert json.loads(message.data)["payload"] == {"ok": True}
            await wait_until(lambda: server.stats()["bindings"] == 0, timeout=10)
            assert server.stats()["broker_connected"] is True
    finally:
        await delete(kept)


async def test_a_broker_restart_keeps_streams() -> None:
    durable = f"exchange/test/restart-{uuid.uuid4().hex[:6]}"
    await declare(durable, durable=True)
    try:
        with EventsServer.running() as server:
            async with SSEReader(server.url(binding(durable))) as reader:
                await reader.wait_for("ready")
                try:
                    await rabbitmqctl("stop_app")
                    pings = len(reader.named("ping"))
                    await reader.wait_for("ping", pings + 2, timeout=10)
                finally:
                    await rabbitmqctl("start_app")
                await reader.wait_for("ready", 2, timeout=60)
                await publish(durable, "after.restart", b"1")
                (message,) = await reader.wait_for("message", timeout=10)
                assert json.loads(message.data)["routingKey"] == "after.restart"
            await wait_until(lambda: not server.broker_bindings(), timeout=20, interval=0.5)
    finally:
        await rabbitmqctl("start_app")  # idempotent: the broker is up for whatever follows
        await delete(durable)


async def test_the_server_starts_while_the_broker_is_down() -> None:
    exchange = f"exchange/test/late-{uuid.uuid4().hex[:6]}"
    await declare(exchange)
    env = {"TC_EVENTS_PULSE__START_WITHOUT_BROKER": "true", "TC_EVENTS_PULSE__WAIT_FOR_BROKER": "2"}
    try:
        with TcpProxy.running(listening=False) as proxy:
            env["PULSE_PORT"] = str(proxy.port)
            with EventsServer.running(env) as server:
                assert server.stats()["broker_connected"] is False
                async with SSEReader(server.url(binding(exchange))) as early:
                    await early.wait_ended(timeout=15)
                (error,) = early.named("error")
                assert "the message broker is unavailable" in json.loads(error.data)
                async with SSEReader(server.url([])) as empty:
                    await empty.wait_for("ready")  # no bindings: nothing to wait for
                proxy.restore()
                async with SSEReader(server.url(binding(exchange))) as later:
                    await later.wait_for("ready", timeout=20)
                    await publish(exchange, "k", b"2")
                    await later.wait_for("message")
    finally:
        await delete(exchange)


async def test_credentials_are_read_again_on_reconnect(tmp_path: Path) -> None:
    user, first, second = f"test-{uuid.uuid4().hex[:6]}", "first-pw", "second-pw"
    exchange = f"exchange/test/creds-{uuid.uuid4().hex[:6]}"
    await declare(exchange)

    def write_config(password: str, port: int) -> None:
        config.write_text(
            f"test:\n  pulse:\n    username: {user}\n    password: {password}\n    port: {port}\n"
        )

    config = tmp_path / "user-config.yml"
    await rabbitmqctl("add_user", user, first)
    try:
        await rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        with TcpProxy.running() as proxy:
            write_config(first, proxy.port)
            with EventsServer.running(args=["--config", str(config)]) as server:
                async with SSEReader(server.url(binding(exchange))) as reader:
                    await reader.wait_for("ready")
                    await rabbitmqctl("change_password", user, second)
                    write_config(second, proxy.port)
                    proxy.cut()
                    proxy.restore()
                    await reader.wait_for("ready", 2, timeout=20)
                    await publish(exchange, "k", b"3")
                    await reader.wait_for("message")
                assert "second-pw" not in server.output() and "first-pw" not in server.output()
    finally:
        await rabbitmqctl("delete_user", user)
        await delete(exchange)
