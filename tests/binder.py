"""A recording stand-in for the broker's binding calls, for unit tests of pure logic.

What RabbitMQ itself ends up with is checked against the real broker elsewhere
(test_connect.py, test_broker.py).
"""

from __future__ import annotations

import asyncio

from quart_events.bindings import Binding
from quart_events.errors import BindFailed, NotConnected

MISSING_EXCHANGE = "exchange/missing"


class RecordingBinder:
    """Records bind/unbind in order; each call waits for ``release``; connections are
    counted in ``generation`` as the broker does."""

    def __init__(self) -> None:
        self.generation = 1
        self.is_connected = True
        self.link_confirmed = True
        self.calls: list[tuple[str, Binding]] = []
        self.bound: set[Binding] = set()
        self.missing = {MISSING_EXCHANGE}
        self.release = asyncio.Event()
        self.release.set()

    def confirm_link(self) -> None:
        """The link is always confirmed here."""

    def reconnect(self) -> None:
        """A new connection: nothing is bound on it."""
        self.generation += 1
        self.is_connected = True
        self.bound.clear()

    def lose(self) -> None:
        self.is_connected = False

    async def bind(self, binding: Binding, generation: int) -> None:
        self.calls.append(("bind", binding))
        await self.release.wait()
        if not self.is_connected or generation != self.generation:
            raise NotConnected("lost")
        if binding.exchange in self.missing:
            raise BindFailed.missing(binding.exchange)
        self.bound.add(binding)

    async def unbind(self, binding: Binding, generation: int) -> None:
        self.calls.append(("unbind", binding))
        await self.release.wait()
        if self.is_connected and generation == self.generation:
            self.bound.discard(binding)


async def settle() -> None:
    """Let every ready callback and task run."""
    for _ in range(50):
        await asyncio.sleep(0)
