"""Several worker processes on one port, and the parent that keeps them running.

Why not hypercorn's own ``workers``: it ends only the first worker cleanly and
kills the rest, and it bypasses the shutdown that ends every stream with the
reconnect frame. Here each worker is a whole ``tc-events server`` process with its
own broker connection, its own exclusive queue and its own listening socket
(``SO_REUSEPORT``, so the kernel spreads connections evenly; one shared socket piles
them onto whichever process accepts first). The parent holds no broker connection
and serves nothing but ``server.health_port`` when it is set (``health.py``: it
answers for all workers, from their beats, however busy they are).

- SIGTERM, SIGINT or SIGHUP to the parent (or to the whole process group): every worker ends
  its streams with the reconnect frame; the parent waits for them, up to
  ``server.shutdown_grace`` plus a margin, then kills what is left, and exits 0.
- SIGHUP is taken as SIGTERM (a closed terminal or a service manager's reload ends
  the service cleanly, with the reconnect frame, instead of killing it).
- A worker that dies is started again after a backoff, and the log says so. A
  worker waits for the broker as a running one does (the parent checked it at
  start), so an outage never makes workers die at start. When every worker keeps
  dying right after its start the parent gives up and exits 1; while one is
  healthy, the parent never takes it down: the others are retried (backoff up to
  8 s) for as long as it takes.
- The parent's metrics directory (``tc-events-metrics-<pid>-*``) is removed at its
  end; one left by a parent that was killed is removed by the next start.
- A worker ends when the parent dies (``PR_SET_PDEATHSIG``, SIGKILL), so no orphan
  holds the port; a worker that hangs is found by its silence (``liveness.py``),
  killed and started again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import multiprocess

from .errors import ListenFailed
from .health import HealthPort, WorkersHealth
from .liveness import LIVENESS_FD, SILENT_AFTER, Pulse
from .metrics import MULTIPROCESS_DIR
from .serve import listen
from .settings import Settings

log = logging.getLogger(__name__)

KILL_MARGIN = 5.0  # seconds past the shutdown grace before workers are killed
EARLY_DEATH = 5.0  # a worker that dies sooner than this after its start failed at start
GIVE_UP_AFTER = 5  # early deaths in a row of one worker before the parent gives up
RESTART_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
POLL = 0.1
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
METRICS_DIR_PREFIX = "tc-events-metrics-"


def remove_stale_metrics_directories() -> None:
    """Remove the metrics directories of parents that are gone (killed, so they could
    not remove their own): ``tc-events-metrics-<pid>-*`` whose pid is not running."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name[len(METRICS_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by a parent that is gone", path)
        except PermissionError:
            pass  # another user's process is running: not ours to touch


def _die_with_parent(parent: int) -> None:
    """In the worker, before it runs: SIGKILL when the parent goes (Linux).

    SIGKILL, because a hung worker never acts on SIGTERM, and an orphan that holds the
    port takes the next instance's clients. The parent dies only unclean (SIGTERM,
    SIGINT and SIGHUP to it end every worker cleanly first)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker notices no parent death
        return
    if os.getppid() != parent:  # the parent went before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    early_deaths: int = 0
    pulse: Pulse | None = None


def check_port(settings: Settings) -> None:
    """Raise ``ListenFailed`` now if the workers could not listen on the port.

    The probe binds without ``SO_REUSEPORT``, so a port that another instance's
    workers share is taken for it too (with the option the kernel would let this
    instance in beside them and split their clients); with ``SO_REUSEADDR``, as the
    workers' own sockets, so connections of a stopped instance in TIME-WAIT do not
    hold the port."""
    server = settings.server
    scheme = "https" if server.certfile is not None else "http"
    where = f"{scheme}://{server.host}:{server.port}"
    if server.port == 0:
        raise ListenFailed(f"cannot listen on {where}: several workers need a fixed port, not 0")
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((server.host, server.port))  # not listening: it takes no connection
        except OSError as error:
            raise ListenFailed(f"cannot listen on {where}: {error.strerror or error}") from None


@dataclass
class Supervisor:
    """Runs ``settings.server.workers`` workers, each ``command + ["--worker-index", i]``."""

    command: Sequence[str]
    settings: Settings
    workers: list[_Worker] = field(default_factory=list)
    stopping: bool = False

    @property
    def count(self) -> int:
        return self.settings.server.workers

    def run(self) -> int:
        health_port = self._health_port()
        remove_stale_metrics_directories()
        metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        os.environ[MULTIPROCESS_DIR] = metrics_dir
        previous = {signum: signal.signal(signum, self._stop) for signum in STOP_SIGNALS}
        try:
            self.workers = [_Worker(index) for index in range(1, self.count + 1)]
            for worker in self.workers:
                self._start(worker)
            log.info("started %d workers", self.count)
            if health_port is not None:
                health_port.start()
            code = self._watch()
            self._stop_all()
            return code
        finally:
            if health_port is not None:
                health_port.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            del os.environ[MULTIPROCESS_DIR]
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _health_port(self) -> HealthPort | None:
        """``server.health_port``, answered here for every worker (``health.py``);
        ``ListenFailed`` when it is taken."""
        server = self.settings.server
        if server.health_port is None:
            return None
        listener = listen(server.host, server.health_port, reuse_port=False)
        log.info("health probes on http://%s:%s", server.host, listener.getsockname()[1])
        return HealthPort(listener, WorkersHealth(lambda: [w.pulse for w in self.workers]))

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _start(self, worker: _Worker) -> None:
        parent = os.getpid()
        worker.started = time.monotonic()
        worker.pulse = pulse = Pulse(worker.started)
        try:
            worker.process = subprocess.Popen(
                [*self.command, "--worker-index", str(worker.index)],
                preexec_fn=lambda: _die_with_parent(parent),
                pass_fds=(pulse.write_end,),
                env={**os.environ, LIVENESS_FD: str(pulse.write_end)},
            )
        finally:
            pulse.worker_started()
        worker.restart_at = None

    def _check_alive(self, worker: _Worker, process: subprocess.Popen[bytes], now: float) -> None:
        """Kill a worker that gave no sign of life for ``SILENT_AFTER`` s (it hangs: the
        port still hands it connections); it is then started again as any dead one."""
        if worker.pulse is None:
            return
        silent = worker.pulse.silent_for(now)
        if silent > SILENT_AFTER:
            log.error(
                "worker %d (pid %d) gave no sign of life for %.0f s: killing it",
                worker.index,
                process.pid,
                silent,
            )
            process.kill()
            worker.pulse.last_beat = now  # once

    def _watch(self) -> int:
        """Until a signal: start workers that died again; 1 when they keep failing."""
        while not self.stopping:
            now = time.monotonic()
            for worker in self.workers:
                process = worker.process
                if process is not None and process.poll() is not None:
                    if self._died(worker, process, now):
                        return 1
                elif process is not None:
                    self._check_alive(worker, process, now)
                elif worker.restart_at is not None and now >= worker.restart_at:
                    self._start(worker)
            time.sleep(POLL)
        return 0

    def _died(self, worker: _Worker, process: subprocess.Popen[bytes], now: float) -> bool:
        """Note a worker's death and plan its restart; ``True`` when it is time to give up."""
        worker.process = None
        if worker.pulse is not None:
            worker.pulse.close()
            worker.pulse = None
        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
        code = process.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if now - worker.started < EARLY_DEATH:
            worker.early_deaths += 1
        else:
            worker.early_deaths = 0
        if worker.early_deaths >= GIVE_UP_AFTER and not self._any_healthy(now):
            log.error(
                "worker %d (pid %d) %s; it failed %d times right after its start: giving up",
                worker.index,
                process.pid,
                how,
                worker.early_deaths,
            )
            return True
        delay = RESTART_DELAYS[min(worker.early_deaths, len(RESTART_DELAYS) - 1)]
        log.warning(
            "worker %d (pid %d) %s; starting it again in %.1f s",
            worker.index,
            process.pid,
            how,
            delay,
        )
        worker.restart_at = now + delay
        return False

    def _any_healthy(self, now: float) -> bool:
        """A worker that runs and has outlived its start: the service is serving."""
        return any(
            w.process is not None and w.process.poll() is None and now - w.started >= EARLY_DEATH
            for w in self.workers
        )

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for them (grace plus a margin), then kill the rest."""
        running = [w.process for w in self.workers if w.process and w.process.poll() is None]
        log.info("stopping %d workers", len(running))
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.server.shutdown_grace + KILL_MARGIN
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time: killing it", process.pid)
                process.kill()
                process.wait()
