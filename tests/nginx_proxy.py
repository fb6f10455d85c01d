"""A real nginx (Debian's package) with the configuration of docs/deploying.md.

The configuration is read from the document and only its ports (a server line per
instance), its access log's place and, when asked, its read timeout, path prefix and
worker processes are changed, so the document cannot drift from what is tested and
measured (``tests/test_nginx.py``, ``bench/rolling.py``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from helpers import ROOT, free_port, wait_for_port

UPSTREAM, LISTEN, READ_TIMEOUT, LOCATION, PROXY_PASS = (
    "server 127.0.0.1:12345 max_fails=0;   # tc-events (server.host, server.port)",
    "listen 8080;",
    "proxy_read_timeout 60s;",
    "location / {",
    "proxy_pass http://tc_events;",
)


WORKERS = "worker_processes auto;"


def documented_config(
    upstream_port: int | list[int],
    port: int,
    read_timeout: str | None = None,
    prefix: str | None = None,
    worker_processes: int | None = None,
) -> str:
    """The nginx configuration of docs/deploying.md, with these ports (a line per
    instance, as it says); with ``prefix`` served under that path, as it says to."""
    text = (ROOT / "docs" / "deploying.md").read_text()
    match = re.search(r"```nginx\n(.*?)```", text, re.DOTALL)
    assert match, "docs/deploying.md has no nginx configuration"
    config = match.group(1)
    for placeholder in (UPSTREAM, LISTEN, READ_TIMEOUT, LOCATION, PROXY_PASS, WORKERS):
        assert placeholder in config, f"docs/deploying.md lost `{placeholder}`"
    ports = upstream_port if isinstance(upstream_port, list) else [upstream_port]
    servers = "\n        ".join(f"server 127.0.0.1:{each} max_fails=0;" for each in ports)
    config = config.replace(UPSTREAM, servers)
    config = config.replace(LISTEN, f"listen 127.0.0.1:{port};")
    if read_timeout is not None:
        config = config.replace(READ_TIMEOUT, f"proxy_read_timeout {read_timeout};")
    if worker_processes is not None:  # as docs/deploying.md sizes them for more streams
        config = config.replace(WORKERS, f"worker_processes {worker_processes};")
    if prefix is not None:  # docs/deploying.md: "Under a path prefix"
        config = config.replace(LOCATION, f"location {prefix} {{")
        config = config.replace(PROXY_PASS, "proxy_pass http://tc_events/;")
    return config


@contextlib.contextmanager
def nginx(
    upstream_port: int | list[int],
    read_timeout: str | None = None,
    path_prefix: str | None = None,
    access_log: list[str] | None = None,
    worker_processes: int | None = None,
    error_log: list[str] | None = None,
) -> Iterator[str]:
    """A real nginx in front of ``upstream_port``; yields its base URL."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("Debian's nginx is not installed: run ./dev install")
    prefix = Path(tempfile.mkdtemp(prefix="tc-events-nginx-"))
    (prefix / "logs").mkdir()
    port = free_port()
    config = documented_config(upstream_port, port, read_timeout, path_prefix, worker_processes)
    # (its own access log: Debian's nginx logs to /var/log/nginx by default)
    config = config.replace("http {", f"http {{\n    access_log {prefix}/access.log;", 1)
    (prefix / "nginx.conf").write_text(config)
    process = subprocess.Popen(
        [
            binary,
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-g",
            f"daemon off; user root; pid {prefix}/nginx.pid; error_log {prefix}/error.log;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if access_log is not None:  # its lines, for the test to read
            access_log += (prefix / "access.log").read_text().splitlines()
        if error_log is not None:
            error_log += (prefix / "error.log").read_text().splitlines()
        shutil.rmtree(prefix, ignore_errors=True)
