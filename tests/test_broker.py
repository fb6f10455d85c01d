"""The broker connection and its faults: a cut connection (through a TCP proxy), a
second cut during the restore, cuts while connecting, a broker restart, a broker
that is down at start, credentials rotated while the server runs, and TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from pathlib import Path

import aio_pika
import aiormq
import pytest
from helpers import (
    AMQP_URL,
    EventsServer,
    SSEReader,
    arabbitmqctl,
    declare_exchange,
    delete_exchange,
    free_port,
    publish,
    run_server,
    wait_until,
)
from tcp_proxy import TcpProxy

from quart_events.broker import Broker
from quart_events.errors import BrokerUnavailable
from quart_events.message import Message
from quart_events.settings import load_settings


class Heard:
    """A broker listener for tests of the broker alone: what it heard, in order."""

    def __init__(self, broker: Broker | None = None) -> None:
        self.broker = broker
        self.connected: list[int] = []  # the generation of each connection heard of
        self.messages: list[Message] = []

    def deliver(self, message: Message) -> None:
        self.messages.append(message)

    def reconnected(self) -> None:
        self.connected.append(self.broker.generation if self.broker else 0)

    def dropped(self) -> None:
        pass

    def confirmed(self) -> None:
        pass


def listening(broker: Broker) -> Heard:
    heard = Heard(broker)
    broker.attach(heard)
    return heard


pytestmark = pytest.mark.broker


def binding(exchange: str) -> list[dict[str, str]]:
    return [{"exchange": exchange, "routingKeyPattern": "#"}]


async def test_a_second_loss_during_the_restore_keeps_every_stream(exchange_name: str) -> None:
    exchange = exchange_name
    env = {"TC_EVENTS_PULSE__WAIT_FOR_BROKER": "3"}
    with TcpProxy.running() as proxy:
        env["PULSE_PORT"] = str(proxy.port)
        with EventsServer.running(env) as server:
            many = [{"exchange": exchange, "routingKeyPattern": f"k{n}.#"} for n in range(20)]
            async with SSEReader(server.url(many)) as reader:
                await reader.wait_for("ready")
                # The next connection goes silent at its first rebind; then it is cut too.
                proxy.hold_on(exchange.encode())
                proxy.cut()
                proxy.restore()
                assert await asyncio.to_thread(proxy.held.wait, 20), "no rebind was sent"
                proxy.cut()
                await asyncio.sleep(4)  # longer than wait_for_broker
                proxy.restore()
                await reader.wait_for("ready", 2, timeout=20)
                await publish(exchange, "k7.x", b'{"after": "two cuts"}')
                (message,) = await reader.wait_for("message")
                assert json.loads(message.data)["payload"] == {"after": "two cuts"}
                assert not reader.named("error") and not reader.ended.is_set()
            await wait_until(lambda: server.stats()["bindings"] == 0)


@pytest.mark.slow
async def test_cuts_while_connecting_never_stop_the_reconnects(exchange_name: str) -> None:
    with TcpProxy.running() as proxy:
        with EventsServer.running({"PULSE_PORT": str(proxy.port)}) as server:
            async with SSEReader(server.url(binding(exchange_name))) as reader:
                await reader.wait_for("ready")
                for _ in range(3):  # cut while the queue is being declared, again and again
                    proxy.hold_on(f"queue/{server.namespace}/events/".encode())
                    proxy.cut()
                    proxy.restore()
                    assert await asyncio.to_thread(proxy.held.wait, 20)
                    proxy.cut()
                    proxy.restore()
                await reader.wait_for("ready", 2, timeout=20)
                await publish(exchange_name, "k", b"1")
                await reader.wait_for("message")
            assert server.stats()["broker_connected"] is True


async def test_a_stream_opened_during_an_outage_is_ready_only_once_bound_again(
    exchange_name: str,
) -> None:
    with TcpProxy.running() as proxy:
        with EventsServer.running({"PULSE_PORT": str(proxy.port)}) as server:
            async with SSEReader(server.url(binding(exchange_name))) as first:
                await first.wait_for("ready")
                proxy.cut()
                await wait_until(lambda: not server.stats()["broker_connected"])
                async with SSEReader(server.url(binding(exchange_name))) as during:
                    await during.wait_for("ping", 2)  # open, and pinged ...
                    assert not during.named("ready")  # ... but not ready: nothing is bound
                    proxy.restore()
                    await during.wait_for("ready", timeout=20)
                    await publish(exchange_name, "after", b"2")
                    (message,) = await during.wait_for("message")
                    assert json.loads(message.data)["payload"] == 2


async def test_a_cut_connection_keeps_streams_and_restores_bindings() -> None:
    kept, gone = (f"exchange/test/cut-{name}-{uuid.uuid4().hex[:6]}" for name in ("kept", "gone"))
    await declare_exchange(kept)
    await declare_exchange(gone)
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
                await delete_exchange(gone)  # the exchange disappears while the server is away
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
        await delete_exchange(kept)


@pytest.mark.slow
async def test_a_broker_restart_keeps_streams() -> None:
    durable = f"exchange/test/restart-{uuid.uuid4().hex[:6]}"
    await declare_exchange(durable, durable=True)
    try:
        with EventsServer.running() as server:
            async with SSEReader(server.url(binding(durable))) as reader:
                await reader.wait_for("ready")
                try:
                    await arabbitmqctl("stop_app")
                    pings = len(reader.named("ping"))
                    await reader.wait_for("ping", pings + 2, timeout=10)
                finally:
                    await arabbitmqctl("start_app")
                await reader.wait_for("ready", 2, timeout=60)
                await publish(durable, "after.restart", b"1")
                (message,) = await reader.wait_for("message", timeout=10)
                assert json.loads(message.data)["routingKey"] == "after.restart"
            await wait_until(lambda: not server.broker_bindings(), timeout=20, interval=0.5)
    finally:
        await arabbitmqctl("start_app")  # idempotent: the broker is up for whatever follows
        await delete_exchange(durable)


async def test_the_server_starts_while_the_broker_is_down() -> None:
    exchange = f"exchange/test/late-{uuid.uuid4().hex[:6]}"
    await declare_exchange(exchange)
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
                # (its next try is up to reconnect_max_delay away: as long as a stream
                # waits, so a stream opened at once could meet either)
                await wait_until(lambda: server.stats()["broker_connected"], timeout=20)
                async with SSEReader(server.url(binding(exchange))) as later:
                    await later.wait_for("ready", timeout=20)
                    await publish(exchange, "k", b"2")
                    await later.wait_for("message")
    finally:
        await delete_exchange(exchange)


@pytest.mark.slow
async def test_credentials_are_read_again_on_reconnect(tmp_path: Path) -> None:
    user, first, second = f"test-{uuid.uuid4().hex[:6]}", "first-pw", "second-pw"
    exchange = f"exchange/test/creds-{uuid.uuid4().hex[:6]}"
    await declare_exchange(exchange)

    def write_config(password: str, port: int) -> None:
        config.write_text(
            f"test:\n  pulse:\n    username: {user}\n    password: {password}\n    port: {port}\n"
        )

    config = tmp_path / "user-config.yml"
    await arabbitmqctl("add_user", user, first)
    try:
        await arabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        with TcpProxy.running() as proxy:
            write_config(first, proxy.port)
            with EventsServer.running(args=["--config", str(config)]) as server:
                async with SSEReader(server.url(binding(exchange))) as reader:
                    await reader.wait_for("ready")
                    await arabbitmqctl("change_password", user, second)
                    write_config(second, proxy.port)
                    proxy.cut()
                    proxy.restore()
                    await reader.wait_for("ready", 2, timeout=20)
                    await publish(exchange, "k", b"3")
                    await reader.wait_for("message")
                assert "second-pw" not in server.output() and "first-pw" not in server.output()
    finally:
        await arabbitmqctl("delete_user", user)
        await delete_exchange(exchange)


async def test_the_supervisor_retries_whatever_a_connect_attempt_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Pure logic of the reconnect loop: the attempts themselves are stand-ins."""
    settings = load_settings("test", overrides={"pulse": {"reconnect_min_delay": 0.01}})
    broker = Broker(settings.pulse)
    failures: list[BaseException] = [
        RuntimeError("closed between connect and consume"),
        aiormq.exceptions.ChannelInvalidStateError("channel closed"),
        ValueError("from the AMQP library"),
    ]
    heard = listening(broker)

    async def attempt() -> None:
        if failures:
            raise failures.pop(0)
        broker.generation += 1
        broker._connected.set()

    broker._connect = attempt  # type: ignore[method-assign]
    await broker.start(connect_in_background=True)
    try:
        await wait_until(lambda: heard.connected == [1], timeout=5)
        assert len([r for r in caplog.records if "retrying in" in r.getMessage()]) == 3
    finally:
        await broker.close()


async def test_pulse_amqps_connects_with_tls(
    certificates: tuple[Path, Path, Path], exchange_name: str
) -> None:
    ca, cert, key = certificates
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with TcpProxy.running(ssl=context) as tls_front:  # TLS to the server, plain to RabbitMQ
        env = {
            "PULSE_AMQPS": "true",
            "PULSE_PORT": str(tls_front.port),
            "TC_EVENTS_PULSE__TLS_CA_FILE": str(ca),
        }
        with EventsServer.running(env) as server:
            async with SSEReader(server.url(binding(exchange_name))) as reader:
                await reader.wait_for("ready")
                await publish(exchange_name, "over.tls", b'{"tls": true}')
                (message,) = await reader.wait_for("message")
            assert json.loads(message.data)["payload"] == {"tls": True}
        assert tls_front.received.startswith(b"AMQP")  # what came out of the TLS tunnel


async def test_pulse_amqps_never_falls_back_to_plain_text() -> None:
    with TcpProxy.running() as plain:  # something listens, but speaks no TLS
        env = {"PULSE_AMQPS": "true", "PULSE_PORT": str(plain.port), "PULSE_PASSWORD": "s3cret-pw"}
        result = await asyncio.to_thread(run_server, env=env)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"tc-events: cannot reach RabbitMQ at localhost:{plain.port}: ")
    )
    assert not plain.received.startswith(b"AMQP") and b"s3cret" not in plain.received
    assert plain.received.startswith(b"\x16\x03")  # a TLS handshake, nothing else


def test_pulse_amqps_defaults_to_the_amqps_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULSE_AMQPS", "true")
    assert load_settings("test").pulse.amqp_port == 5671
    assert load_settings("test").pulse.tls is True
    monkeypatch.setenv("PULSE_PORT", "5999")
    assert load_settings("test").pulse.amqp_port == 5999
    monkeypatch.setenv("PULSE_AMQPS", "false")
    monkeypatch.delenv("PULSE_PORT")
    assert load_settings("test").pulse.amqp_port == 5672


async def test_a_broker_without_a_listener_refuses_to_start() -> None:
    """A forgotten wire fails at once, before any connection, not silently."""
    with pytest.raises(RuntimeError, match="no listener"):
        await Broker(load_settings("test").pulse).start()


def test_instances_start_on_nodes_picked_at_random_and_move_on_after_a_failure() -> None:
    settings = load_settings("test", overrides={"pulse": {"hostname": "a:1,b:2,c"}})
    assert settings.pulse.nodes == [("a", 1), ("b", 2), ("c", 5672)]
    firsts = {Broker(settings.pulse)._next_node % 3 for _ in range(60)}
    assert firsts == {0, 1, 2}  # instances spread over the nodes


async def test_start_tries_every_node_of_the_cluster_list() -> None:
    """A closed first node does not fail the start: the next node is tried at once (once
    6 of 10 starts exited 1 with the first node closed), and a start fails only when
    no node answers, naming the last one."""
    closed = free_port()
    settings = load_settings(
        "test", overrides={"pulse": {"hostname": f"127.0.0.1:{closed},127.0.0.1:5672"}}
    )
    broker = Broker(settings.pulse)
    listening(broker)
    broker._next_node = 0  # the closed node first, whatever the random start
    await broker.start()
    try:
        assert broker.is_connected and broker.queue_name
    finally:
        await broker.close()
    nowhere = load_settings(
        "test", overrides={"pulse": {"hostname": f"127.0.0.1:{closed},127.0.0.1:{free_port()}"}}
    )
    unreachable = Broker(nowhere.pulse)
    listening(unreachable)
    with pytest.raises(BrokerUnavailable, match="connection refused"):
        await unreachable.start()
    with EventsServer.running({"PULSE_HOSTNAME": f"127.0.0.1:{closed},127.0.0.1:5672"}) as server:
        assert server.stats()["broker_connected"]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_process_that_falls_behind_keeps_its_link(exchange_name: str) -> None:
    """The probe's answer comes behind every delivery the broker sent before it: with a
    backlog of seconds the link was given up as dead (four times in one benchmark) and
    the backlog lost. Deliveries coming in are a sign of life: no reconnect, none lost."""
    env = {"TC_EVENTS_PULSE__HEARTBEAT": "2"}  # a probe each second, answered within one
    with EventsServer.running(env) as server:
        binding = [{"exchange": exchange_name, "routingKeyPattern": "#"}]
        # 300 streams that read and discard: each message costs the server 300 pushes,
        # so it falls seconds behind a publisher that goes flat out.
        drains = [asyncio.ensure_future(drain(server, binding)) for _ in range(300)]
        async with SSEReader(server.url(binding)) as reader:
            await reader.wait_for("ready")
            await wait_until(lambda: server.stats()["streams"] == 301, timeout=30)
            body = json.dumps({"pad": "x" * 2_000}).encode()
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                target = await channel.get_exchange(exchange_name)
                await asyncio.gather(
                    *(
                        target.publish(aio_pika.Message(body), routing_key="k")
                        for _ in range(40_000)
                    )
                )
            await wait_until(lambda: server.stats()["deliveries"] == 40_000, timeout=100)
            stats = server.stats()
            print(f"\nafter the backlog: {stats}")
            assert stats["broker_reconnects"] == 0
            assert "the link is dead" not in server.output()
            # (Streams that could not keep up were ended as too slow: that is theirs.)
        for task in drains:
            task.cancel()


async def drain(server: EventsServer, binding: list[dict[str, str]]) -> None:
    """A stream read and thrown away, as fast as it comes."""
    target = server.url(binding).removeprefix(server.base)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        while await reader.read(1 << 20):
            pass
    finally:
        writer.close()


async def test_a_link_that_dies_in_silence_is_found_within_the_heartbeat(
    exchange_name: str,
) -> None:
    """No FIN, no RST (the proxy goes silent): once /__heartbeat__ turned 503 only after
    49 s with a heartbeat of 15, and a stream opened 3 s into the silence got `ready`.
    Now the link is probed every half heartbeat and given up when a probe goes
    unanswered; a stream opened meanwhile gets `ready` only on the new connection."""
    with TcpProxy.running() as proxy:
        env = {"PULSE_PORT": str(proxy.port), "TC_EVENTS_PULSE__HEARTBEAT": "10"}
        with EventsServer.running(env) as server:
            binding = [{"exchange": exchange_name, "routingKeyPattern": "#"}]
            async with SSEReader(server.url(binding)) as first:
                await first.wait_for("ready")
                proxy.freeze()  # the link dies without a word; new connections pass
                silent_at = asyncio.get_running_loop().time()
                await asyncio.sleep(2)
                async with SSEReader(server.url(binding)) as newcomer:
                    await wait_until(
                        lambda: "the link is dead; reconnecting" in server.output(), timeout=20
                    )
                    found_after = asyncio.get_running_loop().time() - silent_at
                    assert not newcomer.named("ready")  # not on the link that died
                    await newcomer.wait_for("ready", timeout=20)
                    await first.wait_for("ready", 2, timeout=20)  # in effect again
                    await publish(exchange_name, "after.silence", b'"after"')
                    await newcomer.wait_for("message")
                    await first.wait_for("message")
            print(f"\nthe silent link was given up {found_after:.1f} s into the silence")
            assert found_after < 30  # aiormq alone: (10 + 1) x 3 = 33 s
