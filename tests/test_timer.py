"""The fixed-rate timer: no drift, and no burst of missed ticks after a stall."""

from __future__ import annotations

import asyncio
import itertools
import time

from quart_events.timer import every


async def test_ticks_missed_during_a_stall_are_skipped_not_made_up() -> None:
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    def action(lateness: float) -> None:
        ticks.append(loop.time())
        if len(ticks) == 2:
            time.sleep(0.5)  # the event loop stalls for ten intervals

    timer = asyncio.ensure_future(every(0.05, action))
    await asyncio.sleep(0.8)
    timer.cancel()
    gaps = [later - earlier for earlier, later in itertools.pairwise(ticks)]
    after_stall = gaps[2:]
    assert after_stall and min(after_stall) > 0.03, f"a burst of ticks: {gaps}"
    assert len(ticks) <= 2 + 1 + int(0.3 / 0.05) + 1  # the stalled ticks are not made up
