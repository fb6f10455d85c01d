"""AMQP topic matching as a trie, equal to RabbitMQ's topic exchange.

Words are separated by ``.``; ``*`` matches exactly one word, ``#`` zero or more.
Empty words are words (``a..b`` has three), and an empty key or pattern has no
words at all, as in RabbitMQ. Each pattern holds a set of items (the streams
bound with it); ``match`` returns the union, so an item matched by several
patterns comes back once.

The cost of a match is bounded whatever the patterns: a run of wildcards is
stored in one canonical form (``#.*.#`` as ``*.#``: the same words match), so
``#`` never follows ``#`` or precedes ``*``, and the key is matched word by word
against the set of trie nodes still alive (each node at most once per word).
A match costs at most (words in the key) x (nodes in the trie) steps, with no
backtracking however many ``#`` the patterns hold.
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


class _Node(Generic[T]):
    __slots__ = ("children", "hash_child", "is_hash", "items")

    def __init__(self, is_hash: bool = False) -> None:
        self.is_hash = is_hash  # reached by `#`: stays alive as it takes more words
        self.children: dict[str, _Node[T]] = {}
        self.items: set[T] = set()
        self.hash_child: _Node[T] | None = None  # children["#"], looked up on every step


class TopicTrie(Generic[T]):
    """Patterns of one exchange, each with the items bound by it."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._size = 0

    def __len__(self) -> int:
        """The number of (pattern, item) pairs held."""
        return self._size

    def add(self, pattern: str, item: T) -> None:
        node = self._root
        for word in canonical_words(pattern):
            child = node.children.get(word)
            if child is None:
                child = node.children[word] = _Node(is_hash=word == "#")
                if word == "#":
                    node.hash_child = child
            node = child
        if item not in node.items:
            node.items.add(item)
            self._size += 1

    def discard(self, pattern: str, item: T) -> None:
        words = canonical_words(pattern)
        path = [self._root]
        for word in words:
            child = path[-1].children.get(word)
            if child is None:
                return
            path.append(child)
        if item not in path[-1].items:
            return
        path[-1].items.discard(item)
        self._size -= 1
        # Prune branches that hold nothing any more, so churn does not grow the trie.
        for depth in range(len(words), 0, -1):
            node = path[depth]
            if node.items or node.children:
                break
            parent, word = path[depth - 1], words[depth - 1]
            del parent.children[word]
            if word == "#":
                parent.hash_child = None

    def match(self, routing_key: str) -> set[T]:
        """The items of every pattern that matches ``routing_key`` (a new set)."""
        alive: dict[int, _Node[T]] = {}
        _enter(alive, self._root)
        for word in split_words(routing_key):
            after: dict[int, _Node[T]] = {}
            for node in alive.values():
                if node.is_hash:
                    after[id(node)] = node  # `#` takes this word too
                children = node.children
                if children:
                    child = children.get(word)
                    if child is not None:
                        _enter(after, child)
                    star = children.get("*")
                    if star is not None:
                        _enter(after, star)
            if not after:
                return set()
            alive = after
        found: set[T] = set()
        for node in alive.values():
            if node.items:
                found |= node.items
        return found


def _enter(alive: dict[int, _Node[T]], node: _Node[T]) -> None:
    """``node`` is reached; so is the ``#`` after it, which may match no word at all."""
    alive[id(node)] = node
    if node.hash_child is not None:
        alive[id(node.hash_child)] = node.hash_child
