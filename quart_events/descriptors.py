"""Open files: every stream holds one, and a process that runs out cannot accept anyone.

At 1,024 open files (a common default soft limit) a server once took 1,007 streams,
then reset every later connection, its health probes included, so a liveness probe
restarted it and every stream dropped, again and again, with nothing in its log. So:
the soft limit is raised to the hard one at start; ``server.max_streams`` is kept
below what the limit leaves after a reserve (broker, listeners, health probes, the
over-limit answers themselves), so the streams beyond it are answered as over the
limit instead of being reset; and a process close to the limit says so in its log
(``DescriptorWatch``).
"""

from __future__ import annotations

import errno
import logging
import os
import resource

from .settings import Settings

log = logging.getLogger(__name__)

RESERVE_BASE = 50  # descriptors kept out of max_streams: broker, listeners, files, probes
RESERVE_FRACTION = 50  # ... plus one in this many (short-lived connections, probes)
FD_DIRECTORY = "/proc/self/fd"  # Linux: one entry per open descriptor


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, hard, error)
        return soft
    return hard


def streams_allowed(open_files: int) -> int:
    """How many streams a process with ``open_files`` may hold and still answer the rest."""
    return max(1, open_files - RESERVE_BASE - open_files // RESERVE_FRACTION)


def fit_to_open_files(settings: Settings) -> tuple[Settings, int]:
    """The settings with ``max_streams`` within the open files limit (raised first), and
    that limit."""
    open_files = raise_open_files_limit()
    allowed = streams_allowed(open_files)
    server = settings.server
    if server.max_streams <= allowed:
        return settings, open_files
    log.warning(
        "server.max_streams lowered from %d to %d: the open files limit is %d "
        "(raise it where the service is started, e.g. LimitNOFILE= or ulimit -n)",
        server.max_streams,
        allowed,
        open_files,
    )
    fitted = server.model_copy(update={"max_streams": allowed})
    return settings.model_copy(update={"server": fitted}), open_files


class DescriptorWatch:
    """Says in the log when the process is close to its open files limit.

    Why a watch and not the accept errors themselves: under uvloop, libuv meets a
    failed accept by accepting and closing the connection with a descriptor it keeps
    in reserve, and never tells the application; the client only sees a reset. So
    the count of open descriptors is read on each tick (the pings' timer), and a
    line is logged while fewer than ``RESERVE_BASE // 2`` are left."""

    def __init__(self, open_files: int) -> None:
        self.open_files = open_files
        self.warned = False

    def check(self) -> int:
        """The descriptors open now (0 where that cannot be read)."""
        try:
            in_use = len(os.listdir(FD_DIRECTORY))
        except OSError as error:
            if error.errno not in (errno.EMFILE, errno.ENFILE):
                return 0
            in_use = self.open_files  # not even one left to read the count with
        nearly_out = in_use >= self.open_files - RESERVE_BASE // 2
        if nearly_out:
            log.error(
                "open files nearly exhausted: %d of %d in use; new connections are refused "
                "(raise the limit, or see what holds them)",
                in_use,
                self.open_files,
            )
        elif self.warned:
            log.warning("open files back to %d of %d", in_use, self.open_files)
        self.warned = nearly_out
        return in_use
