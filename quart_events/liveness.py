"""Liveness of a worker, as its parent sees it: a byte down a pipe every second.

A worker that hangs (a stopped process, a loop that never yields) still holds its
share of the port, and the kernel goes on handing it new connections that nobody
answers; it does not die, so the parent would never notice. Each worker's event
loop writes a byte down a pipe that the parent reads (``LIVENESS_FD`` names the
worker's end); a worker silent for ``SILENT_AFTER`` seconds is killed and, like any
dead worker, started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

LIVENESS_FD = "TC_EVENTS_LIVENESS_FD"  # environment: the worker's end of its pipe
BEAT_INTERVAL = 1.0  # seconds between two beats of a worker
SILENT_AFTER = 10.0  # seconds without a beat before the parent kills the worker
FIRST_BEAT_WITHIN = 60.0  # seconds a new worker has to start beating (imports, broker)


CONNECTED, DISCONNECTED = b"+", b"-"  # a beat says whether the broker link is up


async def beat(fd: int, connected: Callable[[], bool]) -> None:
    """In the worker: one byte every ``BEAT_INTERVAL`` from its event loop, until the
    parent's end is closed; the byte says whether the worker's broker link is up (the
    parent answers the health port for all of its workers)."""
    os.set_blocking(fd, False)
    try:
        while True:
            with contextlib.suppress(BlockingIOError):  # the parent is behind: one is enough
                os.write(fd, CONNECTED if connected() else DISCONNECTED)
            await asyncio.sleep(BEAT_INTERVAL)
    except (BrokenPipeError, OSError):
        return
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


class Pulse:
    """In the parent: one worker's pipe and when it last beat."""

    def __init__(self, now: float) -> None:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        self.last_beat = now + FIRST_BEAT_WITHIN - SILENT_AFTER  # a first beat comes later
        self.beaten = False  # it has beaten at least once: it serves
        self.connected = False  # its last beat said its broker link was up

    def worker_started(self) -> None:
        """The worker holds its own copy of the write end: the parent's goes."""
        os.close(self.write_end)

    def silent_for(self, now: float) -> float:
        with contextlib.suppress(BlockingIOError):
            if beats := os.read(self.read_end, 4096):
                self.last_beat, self.beaten = now, True
                self.connected = beats.endswith(CONNECTED)
        return now - self.last_beat

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.read_end)
