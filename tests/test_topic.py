"""Topic matching: unit cases, and the trie against RabbitMQ itself on random keys."""

from __future__ import annotations

import asyncio
import functools
import random
import uuid

import aio_pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quart_events.topic import Bound, TopicTrie, canonical_words, split_words


def matches(pattern: str, key: str) -> bool:
    trie: TopicTrie[str] = TopicTrie()
    trie.add(pattern, "x")
    return bool(trie.match(key))


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("#", "", True),
        ("#", "a.b", True),
        ("*", "", False),
        ("", "", True),
        ("", "a", False),
        ("a..b", "a..b", True),
        ("a.*.b", "a..b", True),
        ("#.b", "b", True),
        ("#.b", "a.a.b", True),
        ("#.b", "a.b.c", False),
        ("a.#.#.b", "a.b", True),
        ("#.*", "", False),
        ("#.*", "a", True),
        ("*.#.*", "a", False),
        ("*.#.*", "a.b", True),
        ("a.*", "a.*", True),
        ("a.b", "a.*", False),
        ("a.", "a", False),
        ("a.", "a.", True),
    ],
)
def test_match(pattern: str, key: str, expected: bool) -> None:
    assert matches(pattern, key) is expected


def test_items_matched_by_several_patterns_come_back_once() -> None:
    trie: TopicTrie[str] = TopicTrie()
    for pattern in ("a.#", "*.b", "a.b", "#"):
        trie.add(pattern, "stream")
    trie.add("a.b", "other")
    assert trie.match("a.b") == {"stream", "other"}
    assert len(trie) == 5


def test_discard_prunes_and_keeps_the_rest() -> None:
    trie: TopicTrie[str] = TopicTrie()
    trie.add("a.b.c", "x")
    trie.add("a.#", "y")
    trie.discard("a.b.c", "x")
    trie.discard("a.b.c", "x")  # twice is harmless
    trie.discard("never.added", "x")
    assert trie.match("a.b.c") == {"y"}
    assert len(trie) == 1
    trie.discard("a.#", "y")
    assert len(trie) == 0 and trie.match("a.b") == set()
    assert trie._trie.root.children is None  # nothing left behind


def reference_match(pattern: str, key: str) -> bool:
    """AMQP topic matching written the plain way, to check the trie against."""
    words, keys = split_words(pattern), split_words(key)

    @functools.cache
    def matches_from(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return matches_from(i + 1, j) or (j < len(keys) and matches_from(i, j + 1))
        return j < len(keys) and words[i] in ("*", keys[j]) and matches_from(i + 1, j + 1)

    return matches_from(0, 0)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(["a", "b", "", "*", "#"]), max_size=7), max_size=8),
    st.lists(st.sampled_from(["a", "b", "", "*", "#"]), max_size=9),
)
def test_the_trie_equals_plain_matching(patterns: list[list[str]], key_words: list[str]) -> None:
    trie: TopicTrie[int] = TopicTrie()
    texts = [".".join(words) for words in patterns]
    for n, pattern in enumerate(texts):
        trie.add(pattern, n)
    key = ".".join(key_words)
    assert trie.match(key) == {n for n, p in enumerate(texts) if reference_match(p, key)}


def test_runs_of_wildcards_are_stored_in_one_form() -> None:
    assert canonical_words("#.*.#.a.#.#.*") == ["*", "#", "a", "*", "#"]
    assert canonical_words("a.#.#") == ["a", "#"] and canonical_words("*.*") == ["*", "*"]


@pytest.mark.timeout(10)
def test_the_worst_patterns_a_client_may_send_match_in_bounded_time() -> None:
    """100 patterns of 255 bytes (the most a stream may bind) made of wildcards, against
    keys of up to 128 words: once 28 s for one match, now a few thousand steps."""
    rng = random.Random(7)
    trie: TopicTrie[int] = TopicTrie()
    patterns = []
    for n in range(100):
        words: list[str] = []
        while len(".".join(words)) < 253:
            words.append(rng.choice(["#", "*", "#", "a"] if n % 2 else ["#", "*"]))
        patterns.append(".".join(words)[:255].rstrip("."))
        trie.add(patterns[-1], n)
    for length in (10, 60, 128):
        key = ".".join(["a"] * length)
        expected = {n for n, p in enumerate(patterns) if reference_match(p, key)}
        assert trie.match(key) == expected


def test_many_hashes_stay_fast() -> None:
    trie: TopicTrie[int] = TopicTrie()
    trie.add(".".join(["#"] * 30) + ".z", 1)
    assert trie.match(".".join(["a"] * 200)) == set()
    assert trie.match(".".join(["a"] * 200) + ".z") == {1}


def random_words(rng: random.Random, alphabet: list[str], low: int, high: int) -> str:
    return ".".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


@pytest.mark.broker
@pytest.mark.slow
async def test_trie_equals_rabbitmq_on_random_keys_and_patterns() -> None:
    rng = random.Random(20261127)
    patterns = sorted(
        {random_words(rng, ["a", "b", "", "*", "#", "#"], 0, 5) for _ in range(400)}
        | {"#", "*", "", "a", "#.#", "*.*.*", "a.#.b", "#.a.#"}
    )[:160]
    keys = sorted(
        {random_words(rng, ["a", "b", "", "c"], 0, 6) for _ in range(400)}
        | {"", ".", "..", "a", "*", "#", "a.*", ".".join(["a"] * 40), ".".join(["b", "a"] * 20)}
    )
    trie: TopicTrie[int] = TopicTrie()
    for index, pattern in enumerate(patterns):
        trie.add(pattern, index)
    expected = {index: set() for index in range(len(patterns))}  # type: dict[int, set[str]]
    for key in keys:
        for index in trie.match(key):
            expected[index].add(key)

    sentinel = "sentinel-" + uuid.uuid4().hex
    connection = await aio_pika.connect(
        "amqp://guest:guest@127.0.0.1/", client_properties={"connection_name": "test:topic"}
    )
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"exchange/test/topic-{uuid.uuid4().hex[:8]}",
            aio_pika.ExchangeType.TOPIC,
            auto_delete=True,
        )
        received: dict[int, set[str]] = {index: set() for index in range(len(patterns))}
        done = {index: asyncio.Event() for index in range(len(patterns))}
        for index, pattern in enumerate(patterns):
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(exchange, routing_key=pattern)
            await queue.bind(exchange, routing_key=sentinel)

            async def on_message(
                message: aio_pika.abc.AbstractIncomingMessage, i: int = index
            ) -> None:
                key = message.body.decode()
                if key == sentinel:
                    done[i].set()
                else:
                    received[i].add(key)

            await queue.consume(on_message, no_ack=True)
        for key in keys:
            await exchange.publish(aio_pika.Message(key.encode()), routing_key=key)
        await exchange.publish(aio_pika.Message(sentinel.encode()), routing_key=sentinel)
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in done.values())), 30)
    finally:
        await connection.close()
    mismatches = {
        patterns[i]: (sorted(received[i] - expected[i]), sorted(expected[i] - received[i]))
        for i in received
        if received[i] != expected[i]
    }
    assert not mismatches
    assert sum(map(len, received.values())) > 1000  # the comparison covered real traffic


def test_inner_hash_patterns_come_and_go() -> None:
    """The bit-parallel part is rebuilt after each change and agrees with plain matching."""
    rng = random.Random(11)
    trie: TopicTrie[int] = TopicTrie()
    held: dict[int, str] = {}
    keys = [random_words(rng, ["a", "b", ""], 0, 8) for _ in range(40)]
    for step in range(300):
        if held and rng.random() < 0.4:
            n = rng.choice(list(held))
            trie.discard(held.pop(n), n)
        else:
            pattern = random_words(rng, ["a", "b", "*", "#", ""], 1, 6)
            held[step] = pattern
            trie.add(pattern, step)
        key = rng.choice(keys)
        assert trie.match(key) == {n for n, p in held.items() if reference_match(p, key)}
    assert len(trie) == len(held)


def test_the_issues_costly_patterns_match_as_rabbitmq_would() -> None:
    """The shape that once took 102 ms per 128-word key for one stream, at the most a
    stream may hold (bench/topic_worst.py prints the time)."""
    words = [["a" if (i + n) % 2 else "*" for i in range(60)] for n in range(16)]
    patterns = [
        ".".join([*w, *("#" if (i + n) % 3 == 0 else "a" for i in range(59))])
        for n, w in enumerate(words)
    ]
    trie: TopicTrie[int] = TopicTrie()
    for n, pattern in enumerate(patterns):
        trie.add(pattern, n)
    for key in (".".join(["a"] * 128), ".".join(["a"] * 119), ".".join(["a"] * 127 + ["b"])):
        assert trie.match(key) == {n for n, p in enumerate(patterns) if reference_match(p, key)}


def test_bound_items_match_by_routing_key_or_any_cc_key_once() -> None:
    """As RabbitMQ routes to a queue: the routing key or a ``CC`` key, the queue once."""
    bound: Bound[str] = Bound()
    bound.add("ex", "primary.#", "a")
    bound.add("ex", "route.index.#", "a")
    bound.add("ex", "route.index.#", "b")
    bound.add("other", "#", "c")
    assert bound.match("ex", "primary.task", ["route.index.x"]) == {"a", "b"}
    assert bound.match("ex", "nothing", ["route.notify.x"]) == set()
    assert bound.match("missing", "primary.task", []) == set()
    bound.discard("ex", "route.index.#", "b")
    assert bound.match("ex", "nothing", ["route.index.x"]) == {"a"}
    bound.discard("other", "#", "c")
    assert bound.match("other", "k", []) == set()
