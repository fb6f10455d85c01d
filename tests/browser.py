"""Headless Chromium as the EventSource client: the browser's own reconnect rules.

A tiny HTTP server (the collector) serves a page that opens an EventSource to the
events server and reports every event back with a POST; the test reads the reports.
Chromium is Debian's package, installed by ``./dev``. Also: Chromium driven by
selenium (``driven_chromium``) and the inspector page as a user meets it
(``Inspector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from helpers import EventsServer

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


class Inspector:
    """The page as a user meets it: fields, buttons, the state and the table."""

    def __init__(self, driver: Any, server: EventsServer, base: str | None = None) -> None:
        self.driver = driver
        self.server = server
        self.base = base or server.base  # where the page is: the server, or a proxy of it
        origin = "/".join(self.base.split("/")[:3])
        permissions = ["clipboardReadWrite", "clipboardSanitizedWrite"]
        driver.execute_cdp_cmd(
            "Browser.grantPermissions", {"permissions": permissions, "origin": origin}
        )

    def open(self, query: str = "") -> None:
        self.driver.get(f"{self.base}/{query}")
        self.wait(lambda: self.js("return document.body.dataset.loaded") == "true")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def element(self, element_id: str) -> Any:
        return self.driver.find_element("id", element_id)

    def click(self, element_id: str) -> None:
        self.element(element_id).click()

    def wait(self, condition: Any, timeout: float = 20, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"not in {timeout} s: {what or condition}; {self.state()}")
            time.sleep(0.05)

    def state(self) -> str:
        return str(self.element("state").text)

    def wait_state(self, prefix: str, timeout: float = 20) -> None:
        self.wait(lambda: self.state().startswith(prefix), timeout, f"state {prefix}")

    def bindings(self) -> list[dict[str, str]]:
        rows = self.driver.find_elements("css selector", "#bindings tbody tr")
        return [
            {
                "exchange": row.find_element("css selector", "input.exchange").get_attribute(
                    "value"
                ),
                "routingKeyPattern": row.find_element(
                    "css selector", "input.routingKeyPattern"
                ).get_attribute("value"),
            }
            for row in rows
        ]

    def set_binding(self, index: int, exchange: str, pattern: str) -> None:
        row = self.driver.find_elements("css selector", "#bindings tbody tr")[index]
        for selector, text in (("input.exchange", exchange), ("input.routingKeyPattern", pattern)):
            field = row.find_element("css selector", selector)
            field.clear()
            field.send_keys(text)

    def add_preset(self, exchange: str, kind: str, identifier: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.element("preset-exchange")).select_by_value(exchange)
        Select(self.element("preset-kind")).select_by_value(kind)
        self.element("preset-id").clear()
        self.element("preset-id").send_keys(identifier)
        self.click("preset-add")

    def rows(self) -> list[list[str]]:
        """The visible message rows, newest first: time, exchange, routing key, routes."""
        return list(
            self.js(
                """return [...document.querySelectorAll('#messages tbody.message')]
                    .filter(b => !b.hidden)
                    .map(b => [...b.rows[0].cells].map(c => c.textContent));"""
            )
        )

    def counts(self) -> dict[str, int]:
        text = self.element("counts").text
        return {name: int(number) for number, name in re.findall(r"(\d+) ([a-z]+)", text)}

    def copied(self, button: str) -> str:
        """What a copy button put on the clipboard (it shows it on the page too)."""
        self.js("document.getElementById('copied').textContent = ''")
        self.click(button)
        self.wait(lambda: self.element("copied").text != "")
        shown = str(self.element("copied").text).split("\n", 1)[1]
        clipboard = self.driver.execute_async_script(
            "navigator.clipboard.readText().then(arguments[0], e => arguments[0]('' + e))"
        )
        assert clipboard == shown
        return shown
