"""Headless Chromium as the EventSource client: the browser's own reconnect rules.

A tiny HTTP server (the collector) serves a page that opens an EventSource to the
events server and reports every event back with a POST; the test reads the reports.
Chromium is Debian's package, installed by ``./dev``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PAGE = """<!doctype html><meta charset="utf-8"><title>follow</title><script>
let seq = 0;  // reports may arrive out of order: the test sorts them by this
const report = (kind, extra) => fetch("/report", {method: "POST",
  body: JSON.stringify({kind, seq: seq++, time: Date.now(), ...extra})});
const source = new EventSource(new URLSearchParams(location.search).get("url"));
source.onopen = () => report("open", {});
for (const name of ["ready", "message"]) {
  source.addEventListener(name, (e) => report(name, {data: e.data, lastEventId: e.lastEventId}));
}
source.onerror = (e) => report("error", {data: e.data ?? null, readyState: source.readyState});
</script>"""

CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("Debian's chromium is not installed: run ./dev install")
    return path


class Browser:
    """One headless Chromium following one stream; ``reports`` grows as events come."""

    def __init__(self) -> None:
        self._received: list[dict[str, Any]] = []
        browser = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = PAGE.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                browser._received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._process: subprocess.Popen[bytes] | None = None
        self._profile = tempfile.TemporaryDirectory(prefix="tc-events-chromium-")

    @property
    def reports(self) -> list[dict[str, Any]]:
        """What the page reported, in the order it happened."""
        return sorted(self._received, key=lambda report: int(report["seq"]))

    def kinds(self) -> list[str]:
        return [report["kind"] for report in self.reports]

    def open(self, events_url: str) -> None:
        self._thread.start()
        port = self._http.server_address[1]
        page = f"http://127.0.0.1:{port}/page.html?" + urllib.parse.urlencode({"url": events_url})
        self._process = subprocess.Popen(
            [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", page],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._http.shutdown()
        self._http.server_close()
        self._profile.cleanup()

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.kinds().count(kind) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} {kind!r} in {timeout} s: {self.reports}")
            await asyncio.sleep(0.05)

    @classmethod
    @contextlib.contextmanager
    def following(cls, events_url: str) -> Iterator[Browser]:
        browser = cls()
        try:
            browser.open(events_url)
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def driven_chromium() -> Iterator[Any]:
    """Debian's headless Chromium under selenium, through Debian's chromedriver (the
    same version as the browser: selenium never downloads one here)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        raise RuntimeError("Debian's chromium-driver is not installed: run ./dev install")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path()
    for flag in CHROMIUM_FLAGS:
        if not flag.startswith("--remote-debugging-port"):  # chromedriver picks its own
            options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    with tempfile.TemporaryDirectory(prefix="tc-events-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            yield driver
        finally:
            driver.quit()
