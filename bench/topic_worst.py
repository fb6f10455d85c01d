"""The worst patterns clients may send, at the default limits: time to match one key and
memory held, for the trie (``#`` at most at the end) and the bit-parallel part
(``#`` inside a pattern).

Each case fills a process up to its bound (``server.max_binding_words`` words, of which
at most ``server.max_inner_hash_words`` in inner-``#`` patterns, ``max_words_per_stream``
per stream) with patterns that all stay alive for a 128-word key of ``a`` words, and also
shows what the same patterns cost without the bounds (as the issue measured them).

    .venv/bin/python bench/topic_worst.py
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Callable

from quart_events.topic import TopicTrie

DEFAULTS = {"max_binding_words": 50_000, "max_inner_hash_words": 8192, "per_stream": 2000}
KEY = ".".join(["a"] * 128)


def plain_pattern(rng: random.Random, words: int) -> str:
    """``a`` and ``*`` words: every one stays alive for a key of ``a`` words."""
    return ".".join(rng.choice(["a", "*"]) for _ in range(words))


def inner_hash_pattern(rng: random.Random, words: int) -> str:
    """The issue's shape: ``a.*.a.*...#.a.#.a...``."""
    head = [rng.choice(["a", "*"]) for _ in range(words // 2)]
    tail = [rng.choice(["#", "a", "a"]) for _ in range(words - words // 2)]
    return ".".join([*head, "#", *tail])


def fill(make: Callable[[random.Random, int], str], total_words: int) -> list[str]:
    rng = random.Random(7)
    patterns, words = [], 0
    while words + 120 <= total_words:
        patterns.append(make(rng, 119))
        words += 120
    return patterns


def measure(name: str, patterns: list[str]) -> None:
    tracemalloc.start()
    trie: TopicTrie[int] = TopicTrie()
    for n, pattern in enumerate(patterns):
        trie.add(pattern, n)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    began = time.perf_counter()
    trie.match(KEY)  # builds the bit-parallel masks when there are inner-`#` patterns
    first = time.perf_counter() - began
    times = []
    for _ in range(5):
        began = time.perf_counter()
        matched = trie.match(KEY)
        times.append(time.perf_counter() - began)
    words = len(patterns) * 120
    print(
        f"{name:<44} {len(patterns):>6,} patterns {words:>8,} words  "
        f"match {sorted(times)[2] * 1000:8.2f} ms (first {first * 1000:7.1f} ms)  "
        f"memory {held / 2**20:6.1f} MiB ({held / words:5.0f} B/word)  matched {len(matched):,}"
    )


def main() -> None:
    print(f"key: 128 words; limits: {DEFAULTS}")
    measure("plain, one stream at its bound", fill(plain_pattern, DEFAULTS["per_stream"]))
    measure("plain, the process at its bound", fill(plain_pattern, DEFAULTS["max_binding_words"]))
    measure("inner #, one stream at its bound", fill(inner_hash_pattern, DEFAULTS["per_stream"]))
    measure(
        "inner #, the process at its bound",
        fill(inner_hash_pattern, DEFAULTS["max_inner_hash_words"]),
    )
    print("without the bounds (20 streams x 100 patterns of 120 words, the issue's case):")
    measure("inner #, 240,000 words", fill(inner_hash_pattern, 240_000))


if __name__ == "__main__":
    main()
