"""AMQP topic matching, equal to RabbitMQ's topic exchange, at a bounded cost.

Words are separated by ``.``; ``*`` matches exactly one word, ``#`` zero or more.
Empty words are words (``a..b`` has three), and an empty key or pattern has no
words at all, as in RabbitMQ. Each pattern holds a set of items (the streams
bound with it); ``match`` returns the union, so an item matched by several
patterns comes back once.

A run of wildcards is stored in one canonical form (``#.*.#`` as ``*.#``: the
same words match), so ``#`` never follows ``#`` or precedes ``*``. Then:

- Patterns with no ``#`` but at the end (nearly all: ``primary.<taskId>.*.*.#``,
  ``route.index.#``) live in a trie. A trie node of depth d can only be reached
  by the key's d-th word, and a final ``#`` matches whatever follows, so a match
  visits each node at most once: its cost is at most the trie's size, and in
  practice the few nodes on the key's own paths.
- Patterns with a ``#`` inside (``#.a.#.b``) are the ones a plain trie walk keeps
  revisiting (every node after a ``#`` stays alive for every later word; a few
  hundred such patterns once made one 128-word key take seconds). They are
  matched bit-parallel, all at once: every pattern word is one bit of a Python
  integer, and each word of the key is a handful of integer operations over all
  of them (shift-and, with ``#`` as a self-loop). Its cost per key word grows
  with the number of such pattern words divided by the machine word, not with
  how the patterns interleave.

What a process may hold, and so the worst case, is bounded where bindings are
admitted (``server.max_words_per_stream``, ``server.max_binding_words`` and
``server.max_inner_hash_words``); docs/performance.md has the figures.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


def split_words(key: str) -> list[str]:
    return key.split(".") if key else []


def canonical_words(pattern: str) -> list[str]:
    """The pattern's words with each run of wildcards as its ``*`` words, then one ``#``."""
    words: list[str] = []
    stars, hashed = 0, False
    for word in [*split_words(pattern), None]:
        if word == "*":
            stars += 1
        elif word == "#":
            hashed = True
        else:
            words.extend(["*"] * stars)
            if hashed:
                words.append("#")
            stars, hashed = 0, False
            if word is not None:
                words.append(word)
    return words


def pattern_words(pattern: str) -> int:
    """How many words the pattern holds once stored: what it costs to keep and match."""
    return max(1, len(canonical_words(pattern)))


def inner_hash(pattern: str) -> bool:
    """Whether the pattern has a ``#`` before its last word (matched bit-parallel)."""
    return _inner_hash(canonical_words(pattern))


def _inner_hash(words: list[str]) -> bool:
    """A ``#`` before the last word: the trie would keep revisiting what follows it."""
    return "#" in words[:-1]


class _Node(Generic[T]):
    __slots__ = ("children", "hash_leaf", "items")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] | None = None  # made when it has a child
        self.items: set[T] | None = None  # made when a pattern ends here
        self.hash_leaf: set[T] | None = None  # the items of this node's pattern + ".#"


class _Trie(Generic[T]):
    """Patterns whose only ``#`` (if any) is their last word."""

    def __init__(self) -> None:
        self.root: _Node[T] = _Node()

    def add(self, words: list[str], item: T) -> bool:
        node, final_hash = self.root, bool(words) and words[-1] == "#"
        for word in words[:-1] if final_hash else words:
            if node.children is None:
                node.children = {}
            child = node.children.get(word)
            if child is None:
                child = node.children[word] = _Node()
            node = child
        if final_hash:
            if node.hash_leaf is None:
                node.hash_leaf = set()
            items = node.hash_leaf
        else:
            if node.items is None:
                node.items = set()
            items = node.items
        if item in items:
            return False
        items.add(item)
        return True

    def discard(self, words: list[str], item: T) -> bool:
        final_hash = bool(words) and words[-1] == "#"
        path_words = words[:-1] if final_hash else words
        path = [self.root]
        for word in path_words:
            children = path[-1].children
            child = children.get(word) if children is not None else None
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        items = node.hash_leaf if final_hash else node.items
        if items is None or item not in items:
            return False
        items.discard(item)
        if not items:
            if final_hash:
                node.hash_leaf = None
            else:
                node.items = None
        # Prune branches that hold nothing any more, so churn does not grow the trie.
        for depth in range(len(path_words), 0, -1):
            node = path[depth]
            if node.items or node.children or node.hash_leaf:
                break
            parent = path[depth - 1]
            assert parent.children is not None
            del parent.children[path_words[depth - 1]]
            if not parent.children:
                parent.children = None
        return True

    def match(self, keys: list[str], found: set[T]) -> None:
        """Add the items of every pattern that matches the key's words to ``found``."""
        alive = [self.root]
        for word in keys:
            after = []
            for node in alive:
                if node.hash_leaf is not None:
                    found |= node.hash_leaf  # `#` takes this word and every one after it
                children = node.children
                if children is not None:
                    child = children.get(word)
                    if child is not None:
                        after.append(child)
                    star = children.get("*")
                    if star is not None:
                        after.append(star)
            if not after:
                return
            alive = after
        for node in alive:
            if node.items is not None:
                found |= node.items
            if node.hash_leaf is not None:
                found |= node.hash_leaf  # `#` matches no word at all too


class _InnerHashPatterns(Generic[T]):
    """Patterns with a ``#`` inside, matched bit-parallel (shift-and).

    Pattern p of n words has bits ``offset .. offset + n``: bit ``offset + i`` set
    means "its first i words matched". A word of the key moves bit i on when
    pattern word i is that word or ``*``; a bit whose next word is ``#`` stays (the
    ``#`` takes the word) and also sets the bit after it (the ``#`` ends here: it
    may take no word at all). Masks are rebuilt lazily after the patterns changed.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[str, ...], set[T]] = {}
        self._built = False
        self._start = self._star = self._hash = self._accept = 0
        self._literal: dict[str, int] = {}
        self._pattern_at: dict[int, tuple[str, ...]] = {}  # accept bit -> pattern

    def add(self, words: list[str], item: T) -> bool:
        key = tuple(words)
        items = self.items.get(key)
        if items is None:
            items = self.items[key] = set()
            self._built = False
        if item in items:
            return False
        items.add(item)
        return True

    def discard(self, words: list[str], item: T) -> bool:
        key = tuple(words)
        items = self.items.get(key)
        if items is None or item not in items:
            return False
        items.discard(item)
        if not items:
            del self.items[key]
            self._built = False
        return True

    def _build(self) -> None:
        """The masks, in time linear in the pattern words (bits set in byte arrays)."""
        size = sum(len(pattern) + 1 for pattern in self.items)
        start, star, hashes, accept = (bytearray(size // 8 + 1) for _ in range(4))
        positions: dict[str, list[int]] = {}
        self._pattern_at = {}
        offset = 0
        for pattern in self.items:
            _set_bit(start, offset)
            for i, word in enumerate(pattern):
                if word == "*":
                    _set_bit(star, offset + i)
                elif word == "#":
                    _set_bit(hashes, offset + i)
                else:
                    positions.setdefault(word, []).append(offset + i)
            end = offset + len(pattern)
            _set_bit(accept, end)
            self._pattern_at[end] = pattern
            offset = end + 1
        self._start, self._star = _to_int(start), _to_int(star)
        self._hash, self._accept = _to_int(hashes), _to_int(accept)
        # Each literal's mask with the stars in: one dict look-up and one AND per key word.
        self._literal = {}
        for word, bits in positions.items():
            mask = bytearray(bits[-1] // 8 + 1)
            for bit in bits:
                _set_bit(mask, bit)
            self._literal[word] = _to_int(mask) | self._star
        self._built = True

    def match(self, keys: list[str], found: set[T]) -> None:
        if not self.items:
            return
        if not self._built:
            self._build()
        hashes, star, literal = self._hash, self._star, self._literal
        alive = self._start
        alive |= (alive & hashes) << 1
        for word in keys:
            alive = ((alive & literal.get(word, star)) << 1) | (alive & hashes)
            alive |= (alive & hashes) << 1
            if not alive:
                return
        matched = alive & self._accept
        while matched:
            low = matched & -matched
            found |= self.items[self._pattern_at[low.bit_length() - 1]]
            matched ^= low


def _set_bit(bits: bytearray, index: int) -> None:
    bits[index >> 3] |= 1 << (index & 7)


def _to_int(bits: bytearray) -> int:
    return int.from_bytes(bits, "little")


class TopicTrie(Generic[T]):
    """Patterns of one exchange, each with the items bound by it."""

    def __init__(self) -> None:
        self._trie: _Trie[T] = _Trie()
        self._inner: _InnerHashPatterns[T] = _InnerHashPatterns()
        self._size = 0

    def __len__(self) -> int:
        """The number of (pattern, item) pairs held."""
        return self._size

    def add(self, pattern: str, item: T) -> None:
        words = canonical_words(pattern)
        part = self._inner if _inner_hash(words) else self._trie
        if part.add(words, item):
            self._size += 1

    def discard(self, pattern: str, item: T) -> None:
        words = canonical_words(pattern)
        part = self._inner if _inner_hash(words) else self._trie
        if part.discard(words, item):
            self._size -= 1

    def match(self, routing_key: str) -> set[T]:
        """The items of every pattern that matches ``routing_key`` (a new set)."""
        keys = split_words(routing_key)
        found: set[T] = set()
        self._trie.match(keys, found)
        self._inner.match(keys, found)
        return found


class Bound(Generic[T]):
    """Items bound by (exchange, pattern) pairs, matched as RabbitMQ routes a message:
    by its routing key or any of its ``CC`` keys, each item once."""

    def __init__(self) -> None:
        self._tries: dict[str, TopicTrie[T]] = {}

    def add(self, exchange: str, pattern: str, item: T) -> None:
        self._tries.setdefault(exchange, TopicTrie()).add(pattern, item)

    def discard(self, exchange: str, pattern: str, item: T) -> None:
        trie = self._tries.get(exchange)
        if trie is not None:
            trie.discard(pattern, item)
            if not len(trie):
                del self._tries[exchange]

    def match(self, exchange: str, routing_key: str, cc: list[str]) -> set[T]:
        trie = self._tries.get(exchange)
        if trie is None:
            return set()
        found = trie.match(routing_key)
        for key in cc:
            found |= trie.match(key)
        return found
