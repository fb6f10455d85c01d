"""Exchange-to-exchange bindings deliver as a queue per client would: a stream bound to
B, with B bound from A, gets what is published to A and routed on to B (once the hub
looked up the trie of A, the exchange a delivery names, and delivered it to nobody)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from helpers import AMQP_URL, EventsServer, SSEReader, queues_of, wait_until

pytestmark = pytest.mark.broker


@pytest.fixture
async def exchanges() -> AsyncIterator[tuple[aio_pika.abc.AbstractExchange, ...]]:
    """A, B bound from A for `task.#`, and C bound to nothing."""
    connection = await aio_pika.connect(
        AMQP_URL, client_properties={"connection_name": "test:exchange-to-exchange"}
    )
    suffix = uuid.uuid4().hex[:8]
    channel = await connection.channel()
    made = [
        await channel.declare_exchange(
            f"exchange/test/e2e-{name}-{suffix}", aio_pika.ExchangeType.TOPIC
        )
        for name in "abc"
    ]
    a, b, _ = made
    await b.bind(a, routing_key="task.#")
    try:
        yield tuple(made)
    finally:
        for exchange in made:
            await exchange.delete()
        await connection.close()


async def test_a_message_routed_on_by_an_exchange_binding_reaches_the_streams_of_its_exchange(
    server: EventsServer, exchanges: tuple[aio_pika.abc.AbstractExchange, ...]
) -> None:
    a, b, c = exchanges

    def bound(exchange: aio_pika.abc.AbstractExchange, pattern: str) -> str:
        return server.url([{"exchange": exchange.name, "routingKeyPattern": pattern}])

    async with (
        SSEReader(bound(b, "task.#")) as on_b,
        SSEReader(bound(c, "task.#")) as on_c,
        SSEReader(bound(a, "task.one")) as on_a,
    ):
        for reader in (on_b, on_c, on_a):
            await reader.wait_for("ready")
        await a.publish(aio_pika.Message(b'{"n": 1}'), routing_key="task.one")
        await a.publish(aio_pika.Message(b'{"n": 2}'), routing_key="other.two")  # not on to B
        await b.publish(aio_pika.Message(b'{"n": 3}'), routing_key="task.three")
        await on_b.wait_for("message", 2)
        await on_a.wait_for("message")
        # B's stream: what came through A's binding (naming A, as RabbitMQ delivers it)
        # and what was published to B; nothing else.
        assert [(m["exchange"], m["payload"]) for m in on_b.data("message")] == [
            (a.name, {"n": 1}),
            (b.name, {"n": 3}),
        ]
        assert [m["payload"] for m in on_a.data("message")] == [{"n": 1}]
        # C never got those messages: its stream gets none, though its pattern matches.
        await c.publish(aio_pika.Message(b'{"n": 4}'), routing_key="task.four")
        await on_c.wait_for("message")
        assert [m["payload"] for m in on_c.data("message")] == [{"n": 4}]
    # Every exchange's queue goes once its last binding does.
    await wait_until(lambda: not server.broker_bindings(), timeout=10)
    await wait_until(lambda: len(queues_of(server.namespace, every=True)) == 1, timeout=10)
    assert server.stats()["bindings"] == 0
