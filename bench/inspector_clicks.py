"""Click-to-paint of the inspector page while 1,000 messages a second arrive.

Measured in the page as a browser measures responsiveness: from the click event's
time stamp to the frame after its handlers ran. Also the same clicks seen through
WebDriver (its round trips and polling included), and both on a quiet page. A real
server process, the local RabbitMQ and Debian's headless Chromium (``./dev install``).

    .venv/bin/python bench/inspector_clicks.py [--seconds 5] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from browser import Inspector, driven_chromium
from helpers import (
    EventsServer,
    RatePublisher,
    declare_exchange,
    delete_exchange,
    publish,
)
from selenium.common.exceptions import StaleElementReferenceException

RECORDER = """window.clickToPaint = [];
document.addEventListener("click", (event) => {
  const began = event.timeStamp;
  const painted = () => clickToPaint.push(performance.now() - began);
  requestAnimationFrame(() => setTimeout(painted));
}, true);"""


def summary(seconds: list[float]) -> str:
    if not seconds:
        return "no clicks"
    ordered = sorted(seconds)
    median, worst = ordered[len(ordered) // 2] * 1000, ordered[-1] * 1000
    return f"{len(ordered)} clicks, median {median:.0f} ms, max {worst:.0f} ms"


class Clicker:
    """Pause, resume and expand a row; each click timed from here until it shows."""

    def __init__(self, page: Inspector) -> None:
        self.page = page
        self.pause = page.element("pause")
        self.outside: list[float] = []

    def timed(self, action: Any, done: Any) -> None:
        began = time.perf_counter()
        action()
        while not done():
            if time.perf_counter() - began > 30:
                raise RuntimeError("no answer to a click in 30 s")
        self.outside.append(time.perf_counter() - began)

    def round(self) -> None:
        self.timed(self.pause.click, lambda: self.pause.text == "Resume")
        self.timed(self.pause.click, lambda: self.pause.text == "Pause")
        driver = self.page.driver
        row = driver.find_element("css selector", "#messages tbody.message tr")
        try:
            expanded = row.get_attribute("aria-expanded")
            self.timed(row.click, lambda: row.get_attribute("aria-expanded") != expanded)
        except StaleElementReferenceException:
            pass  # newer rows pushed it out: the page counts that click anyway

    def painted(self) -> list[float]:
        """The page's measures so far (a click that is still to paint is left out)."""
        time.sleep(0.5)
        return [ms / 1000 for ms in self.page.js("return clickToPaint.splice(0)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rate", type=int, default=1000)
    args = parser.parse_args()
    topic = f"exchange/bench/{uuid.uuid4().hex[:12]}"
    asyncio.run(declare_exchange(topic))
    try:
        with EventsServer.running() as server, driven_chromium() as driver:
            page = Inspector(driver, server)
            page.open()
            page.set_binding(0, topic, "load.#")
            page.click("connect")
            page.wait_state("ready")
            asyncio.run(publish(topic, "load.first", json.dumps({}).encode()))
            page.wait(lambda: len(page.rows()) == 1)
            page.js(RECORDER)
            clicker = Clicker(page)
            for _ in range(5):
                clicker.round()
            quiet, quiet_outside = clicker.painted(), clicker.outside[:]
            clicker.outside.clear()
            page.click("clear")
            page.js("clickToPaint.length = 0")
            publisher = RatePublisher(topic, rate=args.rate, seconds=args.seconds)
            publisher.start()
            publisher.started.wait(10)
            page.wait(lambda: page.counts()["received"] > args.rate // 5, what="load arriving")
            page.js("clickToPaint.length = 0")
            while publisher.is_alive():
                clicker.round()
            loaded = clicker.painted()
            publisher.join(30)
            print(f"quiet page: click to paint {summary(quiet)}")
            print(f"quiet page: through WebDriver {summary(quiet_outside)}")
            print(f"{args.rate:,} messages/s: click to paint {summary(loaded)}")
            print(f"{args.rate:,} messages/s: through WebDriver {summary(clicker.outside)}")
            print(f"messages published {publisher.sent:,}, counts line: {page.counts()}")
    finally:
        asyncio.run(delete_exchange(topic))


if __name__ == "__main__":
    main()
