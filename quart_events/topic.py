"""AMQP topic matching as a trie, equal to RabbitMQ's topic exchange.

Words are separated by ``.``; ``*`` matches exactly one word, ``#`` zero or more.
Empty words are words (``a..b`` has three), and an empty key or pattern has no
words at all, as in RabbitMQ. Each pattern holds a set of items (the streams
bound with it); ``match`` returns the union, so an item matched by several
patterns comes back once.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


def split_words(key: str) -> list[str]:
    return key.split(".") if key else []


class _Node(Generic[T]):
    __slots__ = ("children", "items")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.items: set[T] = set()


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
        for word in split_words(pattern):
            node = node.children.setdefault(word, _Node())
        if item not in node.items:
            node.items.add(item)
            self._size += 1

    def discard(self, pattern: str, item: T) -> None:
        path = [self._root]
        for word in split_words(pattern):
            child = path[-1].children.get(word)
            if child is None:
                return
            path.append(child)
        if item not in path[-1].items:
            return
        path[-1].items.discard(item)
        self._size -= 1
        # Prune branches that hold nothing any more, so churn does not grow the trie.
        words = split_words(pattern)
        for depth in range(len(words), 0, -1):
            node = path[depth]
            if node.items or node.children:
                break
            del path[depth - 1].children[words[depth - 1]]

    def match(self, routing_key: str) -> set[T]:
        words = split_words(routing_key)
        found: set[T] = set()
        seen: set[tuple[int, int]] = set()  # (node id, position): bounds work with many `#`
        stack = [(self._root, 0)]
        while stack:
            node, position = stack.pop()
            mark = (id(node), position)
            if mark in seen:
                continue
            seen.add(mark)
            if position == len(words):
                found |= node.items
            else:
                child = node.children.get(words[position])
                if child is not None:
                    stack.append((child, position + 1))
                star = node.children.get("*")
                if star is not None:
                    stack.append((star, position + 1))
            hash_node = node.children.get("#")
            if hash_node is not None:
                # `#` swallows zero or more words: continue after it from here to the end.
                for rest in range(position, len(words) + 1):
                    stack.append((hash_node, rest))
        return found
