"""The fixed-rate timer: no drift, and no burst of missed ticks after a stall."""

from __future__ import annotations

import asyncio
import time

from quart_events.timer import every

INTERVAL = 0.1
STALL = 1.0  # ten intervals


async def test_ticks_missed_during_a_stall_are_skipped_not_made_up() -> None:
    """Told by counts and by the lateness each tick reports, not by gaps between ticks
    (a busy machine moves those): made-up ticks would come in a burst, each reporting
    that it was due up to a whole stall ago."""
    ticks: list[float] = []  # the lateness of each

    def action(lateness: float) -> None:
        ticks.append(lateness)
        if len(ticks) == 2:
            time.sleep(STALL)  # the event loop stalls for ten intervals

    timer = asyncio.ensure_future(every(INTERVAL, action))
    await asyncio.sleep(2 * INTERVAL + STALL + 3 * INTERVAL)
    timer.cancel()
    after_stall = ticks[2:]
    assert after_stall, "no tick after the stall"
    # A made-up tick reports lateness of up to the stall (0.9 s for the first).
    assert max(after_stall) < STALL / 2, f"ticks made up after the stall: {ticks}"
    # At most the two before, and one per interval after: a busy machine makes fewer.
    assert len(ticks) <= 2 + 3 + 2, f"ticks made up after the stall: {ticks}"
