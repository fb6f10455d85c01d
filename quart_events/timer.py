"""A fixed-rate timer for periodic work (pings, the stuck-stream sweep)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def every(interval: float, action: Callable[[float], Awaitable[None] | None]) -> None:
    """Call ``action(lateness)`` every ``interval`` seconds, on a fixed schedule.

    The time ``action`` takes does not push later ticks back; ticks missed while the
    event loop stalled (or the machine paused) are skipped, not made up in a burst.
    ``lateness`` is how long after its time the tick came (seconds). An ``action`` that
    returns an awaitable is awaited before the next tick is planned.
    """
    loop = asyncio.get_running_loop()
    tick = loop.time()
    while True:
        tick += interval
        now = loop.time()
        if tick < now:  # behind: go on from the next tick still ahead
            tick += (int((now - tick) / interval) + 1) * interval
        await asyncio.sleep(tick - now)
        done = action(loop.time() - tick)
        if inspect.isawaitable(done):
            await done
