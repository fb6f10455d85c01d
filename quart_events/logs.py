"""Log lines: text for people (development), one JSON object per line for machines.

Libraries speak only at error level unless ``--debug``: our own one-liners say what
matters (a stream ended, the broker connected or was lost, a worker died).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

LIBRARIES = ("aio_pika", "aiormq", "hypercorn", "asyncio", "httpx", "httpcore")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and worker, pid)."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str, form: str, debug: bool = False, worker: int | None = None) -> None:
    """Log to standard error at ``level`` in ``form`` (text or json)."""
    handler = logging.StreamHandler()
    if form == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        name = f"tc-events[{worker}]" if worker is not None else "tc-events"
        text = f"%(asctime)s {name} %(name)s: %(message)s" if debug else f"{name}: %(message)s"
        handler.setFormatter(logging.Formatter(text))
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level.upper()),
        handlers=[handler],
        force=True,
    )
    for library in LIBRARIES:
        logging.getLogger(library).setLevel(logging.NOTSET if debug else logging.CRITICAL)
