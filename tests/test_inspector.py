"""The inspector page at ``/``, driven in Debian's headless Chromium with selenium,
against a real server process and the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
import taskcluster
from browser import Inspector, driven_chromium
from helpers import (
    AMQP_URL,
    EventsServer,
    RatePublisher,
    SSEReader,
    connect_target,
    declare_exchange,
    delete_exchange,
    publish,
)

pytestmark = [pytest.mark.broker]

QUEUE = "exchange/taskcluster-queue/v1/"
# The queue's exchanges keyed by task, with the method of Taskcluster's client for
# each; task-group-resolved is keyed by task group only.
TASK_EXCHANGES = {
    "task-defined": "taskDefined",
    "task-pending": "taskPending",
    "task-running": "taskRunning",
    "artifact-created": "artifactCreated",
    "task-completed": "taskCompleted",
    "task-failed": "taskFailed",
    "task-exception": "taskException",
}
QUEUE_EXCHANGES = {**TASK_EXCHANGES, "task-group-resolved": "taskGroupResolved"}
TASK_ID = "fN1kYkcFQXKUBy2dSlZ4XA"
GROUP_ID = "Xr3aWtmsQlGbqDeUe3vPdg"


# --- serving, without a browser ------------------------------------------------


def test_page_and_every_asset_come_from_the_package(server: EventsServer) -> None:
    """No build step, no CDN: the page names only its own files, each is served."""
    page = httpx.get(server.base + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    modules: list[str] = []
    for asset in assets:
        assert not urllib.parse.urlsplit(asset).netloc, asset  # nothing from elsewhere
        answer = httpx.get(f"{server.base}/{asset}")
        assert answer.status_code == 200, asset
        if asset.endswith(".js"):
            assert answer.headers["content-type"].startswith("text/javascript")
            modules.append(answer.text)
    imports = {name for text in modules for name in re.findall(r'from "\./([^"]+)"', text)}
    assert imports == {"messages.js", "presets.js", "stream.js"}
    for name in imports:
        assert httpx.get(f"{server.base}/static/{name}").status_code == 200
    for text in [page.text, *modules]:
        assert "://" not in text  # no absolute URL anywhere: works offline, behind any prefix


# --- the page in a browser -----------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with driven_chromium() as chromium:
        yield chromium


@pytest.fixture
def page(driver: Any, server: EventsServer) -> Inspector:
    inspector = Inspector(driver, server)
    inspector.open()
    return inspector


@pytest.fixture
def topic() -> Iterator[str]:
    """A fresh topic exchange on the broker, by name."""
    name = f"exchange/test/{uuid.uuid4().hex[:12]}"
    asyncio.run(declare_exchange(name))
    try:
        yield name
    finally:
        asyncio.run(delete_exchange(name))


def send(exchange: str, key: str, payload: Any, routes: tuple[str, ...] = ()) -> None:
    headers = {"CC": [f"route.{route}" for route in routes]} if routes else None
    asyncio.run(publish(exchange, key, json.dumps(payload).encode(), headers))


@pytest.mark.browser
def test_presets_fill_the_pattern_as_the_taskcluster_clients_do(page: Inspector) -> None:
    events = taskcluster.QueueEvents({"rootUrl": "https://tc.example.com"})
    expected: list[dict[str, str]] = []
    for name, method in QUEUE_EXCHANGES.items():
        kinds = ["taskId", "taskGroupId"] if name in TASK_EXCHANGES else ["taskGroupId"]
        for kind in kinds:
            identifier = TASK_ID if kind == "taskId" else GROUP_ID
            page.add_preset(name, kind, identifier)
            binding = getattr(events, method)({kind: identifier})
            expected.append(
                {"exchange": binding["exchange"], "routingKeyPattern": binding["routingKeyPattern"]}
            )
    # the fresh page's blank row gave way to the first preset
    assert page.bindings() == expected
    assert page.element("preset-message").text == ""

    page.add_preset("task-group-resolved", "taskId", TASK_ID)
    assert page.element("preset-message").text == (
        "task-group-resolved messages are keyed by taskGroupId, not taskId"
    )
    page.add_preset("task-completed", "taskId", "not.a.slug")
    assert "22 characters" in page.element("preset-message").text
    assert len(page.bindings()) == len(expected)  # neither added anything

    page.open()
    page.add_preset("*", "taskId", TASK_ID)  # every exchange keyed by taskId
    assert [b["exchange"] for b in page.bindings()] == [QUEUE + name for name in TASK_EXCHANGES]


@pytest.mark.browser
def test_connect_publish_see_the_row_and_its_payload(page: Inspector, topic: str) -> None:
    page.set_binding(0, topic, "task.#")
    page.click("add-binding")
    page.set_binding(1, topic, "route.index.#")
    page.click("connect")
    page.wait_state("ready")
    page.wait(lambda: re.fullmatch(r"last ping \d+ s ago", page.element("ping-age").text))

    payload = {"status": {"taskId": TASK_ID, "state": "completed"}, "note": "<img src=x>"}
    send(topic, "task.a.b", payload, routes=("index.project.foo",))
    send(topic, "other.key", {"only": "by route"}, routes=("index.other", "notify.x"))
    send(topic, "unrelated", {"never": "shown"})
    page.wait(lambda: len(page.rows()) == 2, what="two rows")
    newest, oldest = page.rows()
    assert oldest[1:] == [topic, "task.a.b", "index.project.foo"]
    assert newest[1:] == [topic, "other.key", "index.other, notify.x"]
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", oldest[0])

    # expand the row: the payload pretty-printed, as text (the markup is not markup)
    page.driver.find_elements("css selector", "#messages tbody.message tr")[1].click()
    shown = page.element("messages").find_element("css selector", "td.payload pre").text
    assert json.loads(shown) == payload
    assert shown == json.dumps(payload, indent=2)
    assert page.driver.find_elements("css selector", "#messages img") == []
    # and closed again
    page.driver.find_elements("css selector", "#messages tbody.message tr")[1].click()
    assert page.driver.find_elements("css selector", "td.payload") == []
    assert page.counts() == {"received": 2, "in": 2, "dropped": 0}


@pytest.mark.browser
def test_bindings_travel_in_the_page_url_and_the_copies_work(page: Inspector, topic: str) -> None:
    page.set_binding(0, topic, "a.*")
    page.click("add-binding")
    page.set_binding(1, topic, "b.# 'quoted'")
    wanted = {
        "bindings": [
            {"exchange": topic, "routingKeyPattern": "a.*"},
            {"exchange": topic, "routingKeyPattern": "b.# 'quoted'"},
        ]
    }
    page.click("add-binding")
    page.set_binding(2, topic, "removed.#")
    page.driver.find_elements("css selector", "#bindings button.remove")[2].click()
    assert page.bindings() == wanted["bindings"]
    assert json.loads(page.copied("copy-json")) == wanted

    # the page's own URL restores the bindings
    link = page.driver.current_url
    page.open()
    assert page.bindings() == [{"exchange": "", "routingKeyPattern": ""}]
    page.driver.get(link)
    page.wait(lambda: page.js("return document.body.dataset.loaded") == "true")
    assert page.bindings() == wanted["bindings"]

    # the stream URL is a stream with these bindings
    url = page.copied("copy-url")
    assert url.startswith(page.server.base + "/api/events/v1/connect/?bindings=")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert json.loads(query["bindings"][0]) == wanted

    # the listen command, run in a shell-like split, gets a message
    command = shlex.split(page.copied("copy-command"))
    assert command[:4] == ["tc-events", "listen", "--url", page.server.base]
    listen = subprocess.Popen(
        [sys.executable, "-m", "quart_events", *command[1:], "--count", "1", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while len(page.server.broker_bindings()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        send(topic, "a.x", {"via": "listen"})
        out, err = listen.communicate(timeout=30)
    finally:
        listen.kill()
    assert listen.returncode == 0, err
    assert json.loads(out)["payload"] == {"via": "listen"}


@pytest.mark.browser
@pytest.mark.parametrize(
    ("exchange", "error"),
    [
        ("amq.topic", "bindings[0]: exchange `amq.topic` is not allowed"),
        ("exchange/test/does-not-exist", "exchange/test/does-not-exist"),
    ],
)
def test_a_bad_binding_shows_the_servers_error(page: Inspector, exchange: str, error: str) -> None:
    page.set_binding(0, exchange, "#")
    page.click("connect")
    page.wait_state("error")
    assert error in page.state()
    time.sleep(1.5)  # the page does not retry a stream the server refused
    assert page.state().startswith("error")
    assert page.element("disconnect").get_attribute("disabled") is not None
    assert page.element("connect").text == "Connect"


@pytest.mark.browser
def test_filter_pause_resume_clear(page: Inspector, topic: str) -> None:
    page.set_binding(0, topic, "#")
    page.click("connect")
    page.wait_state("ready")
    for key in ("build.linux", "build.windows", "test.linux"):
        send(topic, key, {"platform": key.split(".")[1]})
    page.wait(lambda: len(page.rows()) == 3)

    page.element("filter").send_keys("linux")
    page.wait(lambda: len(page.rows()) == 2, what="two rows match linux")
    assert {row[2] for row in page.rows()} == {"build.linux", "test.linux"}
    page.element("filter").clear()
    page.element("filter").send_keys("WINDOWS")  # any case, payload included
    page.wait(lambda: [row[2] for row in page.rows()] == ["build.windows"])
    page.element("filter").clear()
    page.element("filter").send_keys("x")
    page.element("filter").clear()
    page.js("document.getElementById('filter').dispatchEvent(new Event('input'))")
    page.wait(lambda: len(page.rows()) == 3)

    page.click("pause")
    assert page.element("pause").text == "Resume"
    for n in range(4):
        send(topic, f"later.{n}", {"n": n})
    page.wait(lambda: page.counts().get("waiting") == 4, what="4 waiting")
    assert len(page.rows()) == 3  # the view holds still
    page.click("pause")
    assert page.element("pause").text == "Pause"
    page.wait(lambda: len(page.rows()) == 7)
    assert [row[2] for row in page.rows()[:4]] == [f"later.{n}" for n in (3, 2, 1, 0)]

    page.click("clear")
    assert page.rows() == []
    assert page.counts() == {"received": 0, "in": 0, "dropped": 0}
    send(topic, "after.clear", {})
    page.wait(lambda: len(page.rows()) == 1)


@pytest.mark.browser
def test_disconnect_and_reconnect_after_the_server_restarts(driver: Any, topic: str) -> None:
    """The state follows the stream: ready, reconnecting while the server is away,
    ready again on a new server on the same port, disconnected on request."""
    first = EventsServer.start()
    port = first.port
    try:
        page = Inspector(driver, first)
        page.open()
        page.set_binding(0, topic, "#")
        page.click("connect")
        page.wait_state("ready")
        first.stop()  # SIGTERM: the server's reconnect frame, then nobody listens
        page.wait_state("reconnecting")
        assert (
            page.element("state-text").text == "reconnecting: the server asked to come back later"
        )
        second = EventsServer.start(port=port)
        try:
            page.wait_state("ready", timeout=60)
            send(topic, "again", {"back": True})
            page.wait(lambda: [row[2] for row in page.rows()] == ["again"])
            page.click("disconnect")
            assert page.state() == "disconnected"
            page.wait(lambda: second.stats()["streams"] == 0, what="the stream closed")
        finally:
            second.stop()
    finally:
        first.stop()


class BadGateway(BaseHTTPRequestHandler):
    """What a proxy answers while the instance behind it restarts."""

    def do_GET(self) -> None:
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def answering_502(port: int) -> Iterator[None]:
    proxy = ThreadingHTTPServer(("127.0.0.1", port), BadGateway)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)


async def written(server: EventsServer, topic: str, publishing: Any) -> None:
    """Run ``publishing`` while a resumable stream of ``server`` listens, until that
    stream has had every message: the history holds them all."""
    url = f"{server.base}{connect_target([{'exchange': topic, 'routingKeyPattern': '#'}])}"
    async with SSEReader(url + "&resume=true") as reader:
        await reader.wait_for("ready")
        count = await publishing()
        await reader.wait_for("message", count, timeout=60)


@pytest.mark.browser
@pytest.mark.slow
def test_a_resuming_page_misses_nothing_across_restarts_and_shows_a_gap(
    driver: Any, topic: str, history_namespace: str
) -> None:
    """With "resume after reconnects": the server restarts (the browser comes back with
    its Last-Event-ID) and nothing published meanwhile is missed. Then the instance is
    away behind a proxy answering 502 (the browser gives up; the page opens the stream
    again with ``since=``) while retention removes part of what it missed: the page says
    so, and shows the rest, each message once, in order."""
    env = {
        "TC_EVENTS_HISTORY__EXCHANGES": '["exchange/test/*"]',
        "TC_EVENTS_HISTORY__MAX_BYTES": "65536",
        "TC_EVENTS_HISTORY__SEGMENT_BYTES": "4096",
        "TC_EVENTS_SERVER__RETRY_MIN_MS": "300",
        "TC_EVENTS_SERVER__RETRY_MAX_MS": "400",
    }
    other = EventsServer.start(env, namespace=history_namespace)  # the rest of the deployment
    servers = [EventsServer.start(env, namespace=history_namespace)]
    port = servers[0].port
    try:
        page = Inspector(driver, servers[0])
        page.open()
        page.set_binding(0, topic, "#")
        page.click("resume")
        assert shlex.split(page.copied("copy-command"))[-1] == "--resume"
        assert "&resume=true" in page.copied("copy-url")
        page.click("connect")
        page.wait_state("ready")
        send(topic, "k.0", {})
        page.wait(lambda: len(page.rows()) == 1)

        servers[0].stop()  # SIGTERM: its reconnect frame keeps the last id
        page.wait_state("reconnecting")
        send(topic, "k.1", {})
        send(topic, "k.2", {})
        servers.append(EventsServer.start(env, port=port, namespace=history_namespace))
        page.wait(lambda: len(page.rows()) == 3, timeout=60, what="the missed ones")
        assert [row[2] for row in page.rows()] == ["k.2", "k.1", "k.0"]

        servers[1].stop()
        with answering_502(port):
            page.wait(
                lambda: "next try in" in page.state(), timeout=30, what="the page's own retry"
            )

            async def many() -> int:
                for n in range(300):  # about 300 KiB: retention removes the first segments
                    await publish(topic, f"pad.{n}", json.dumps({"pad": "x" * 1000}).encode())
                return 300

            asyncio.run(written(other, topic, many))
        servers.append(EventsServer.start(env, port=port, namespace=history_namespace))
        page.wait_state("ready", timeout=60)
        page.wait(lambda: page.rows()[0][2] == "pad.299", timeout=60, what="the replay")
        notice = page.element("notice")
        assert notice.is_displayed()
        assert re.search(r"after position \d+ are no longer kept; resumed from \d+", notice.text)
        keys = [row[2] for row in reversed(page.rows())]
        assert keys[:3] == ["k.0", "k.1", "k.2"]
        padded = [int(key.split(".")[1]) for key in keys[3:]]
        assert padded[0] > 0 and padded == list(range(padded[0], 300))  # once, in order

        send(topic, "k.live", {})
        page.wait(lambda: page.rows()[0][2] == "k.live")
        assert len(page.rows()) == len(keys) + 1
    finally:
        for server in servers:
            server.stop()
        other.stop()


@pytest.mark.browser
@pytest.mark.slow
def test_the_page_stays_usable_at_1000_messages_a_second(page: Inspector, topic: str) -> None:
    """Every click is answered while 5,000 messages arrive at 1,000/s, every message is
    counted, and the table keeps its cap (the newest 500 rows, plus the rows someone
    expanded to read). How fast a click paints is a figure: bench/inspector_clicks.py."""
    page.set_binding(0, topic, "load.#")
    page.click("connect")
    page.wait_state("ready")
    send(topic, "load.first", {"first": True})
    page.wait(lambda: len(page.rows()) == 1)
    first = page.driver.find_element("css selector", "#messages tbody.message tr")
    first.click()  # expanded to read: it must outlive the cap
    page.wait(lambda: first.get_attribute("aria-expanded") == "true", what="the row expanded")

    publisher = RatePublisher(topic, rate=1000, seconds=5)
    publisher.start()
    publisher.started.wait(10)
    page.wait(lambda: page.counts()["received"] > 200, what="load arriving")
    pause = page.element("pause")  # found once: each poll is then one WebDriver round trip
    # A fixed number of clicks, not as many as fit in the 5 s (that was a timing: a busy
    # machine's WebDriver round trips once fitted only two); each is answered.
    under_load = 0
    for label in ("Resume", "Pause", "Resume", "Pause"):
        under_load += publisher.is_alive()
        pause.click()
        page.wait(lambda label=label: pause.text == label, timeout=30, what=f"{label} shown")
    publisher.join(30)
    assert publisher.sent == 5000
    page.wait(lambda: page.counts()["received"] == 5001, what="every message received")
    assert under_load >= 1  # the first click at least came while the load was flowing
    counts = page.counts()
    # 500 rows: the expanded first one, kept at the bottom, and the newest 499.
    keys = [row[2] for row in page.rows()]
    assert counts["in"] == len(keys) == 500
    assert keys == [f"load.{n}" for n in range(4999, 4500, -1)] + ["load.first"]
    assert first.get_attribute("aria-expanded") == "true"
    assert '"first"' in first.find_element("xpath", "following-sibling::tr").text
    assert counts["dropped"] == 5001 - counts["in"]


@pytest.fixture
def queue_exchanges() -> Iterator[list[str]]:
    """The Taskcluster queue's exchanges on the broker, as Taskcluster has them
    (declared here where missing, and removed again)."""
    names = [QUEUE + name for name in QUEUE_EXCHANGES]

    async def missing() -> list[str]:
        absent = []
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            for name in names:
                channel = await connection.channel()
                try:
                    await channel.declare_exchange(name, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    absent.append(name)
        return absent

    created = asyncio.run(missing())
    for name in created:
        asyncio.run(declare_exchange(name))
    try:
        yield names
    finally:
        for name in created:
            asyncio.run(delete_exchange(name))


def task_message(
    kind: str, task_id: str, run_id: int, state: str
) -> tuple[str, str, dict[str, Any]]:
    """(exchange, routing key, payload) as Taskcluster's queue publishes them."""
    worker = ("us-east-1", "i-0b4c9d2e")
    key = ".".join(
        [
            "primary",
            task_id,
            str(run_id),
            *worker,
            "proj-example",
            "ci",
            "taskcluster-github",
            GROUP_ID,
            "_",
        ]
    )
    status = {
        "taskId": task_id,
        "provisionerId": "proj-example",
        "workerType": "ci",
        "taskQueueId": "proj-example/ci",
        "schedulerId": "taskcluster-github",
        "taskGroupId": GROUP_ID,
        "state": state,
        "runs": [
            {"runId": run_id, "state": state, "workerGroup": worker[0], "workerId": worker[1]}
        ],
    }
    payload: dict[str, Any] = {"status": status, "runId": run_id, "version": 1}
    if kind == "artifact-created":
        payload["artifact"] = {"name": "public/logs/live.log", "storageType": "s3"}
    return QUEUE + kind, key, payload


@pytest.mark.browser
def test_a_task_group_followed_with_a_preset(page: Inspector, queue_exchanges: list[str]) -> None:
    """Real Taskcluster-shaped messages through the preset's bindings; the README's
    screenshot is this page (``SCREENSHOT_DIR=docs`` writes docs/inspector.png)."""
    page.add_preset("*", "taskGroupId", GROUP_ID)
    assert len(page.bindings()) == 8  # the seven task exchanges and task-group-resolved
    page.click("connect")
    page.wait_state("ready")
    tasks = ["Zq5EpJGmT0aLzVmXbD3pAw", "c3MBNRiVQO2KVcWY1yB4kA", "H1lV5mY0T3-rGw0o2Bd6qg"]
    sent = [
        task_message("task-running", tasks[0], 0, "running"),
        task_message("artifact-created", tasks[0], 0, "running"),
        task_message("task-running", tasks[1], 0, "running"),
        task_message("task-completed", tasks[0], 0, "completed"),
        task_message("task-failed", tasks[1], 0, "failed"),
        task_message("task-running", tasks[2], 1, "running"),
    ]
    routes = ("index.project.example.latest", "tc-treeherder.v2.example.4f0c1b2")
    for exchange, key, payload in sent:
        send(exchange, key, payload, routes=routes)
    # another group's message is not for these bindings
    other_exchange, other_key, other = task_message("task-completed", tasks[2], 0, "completed")
    send(other_exchange, other_key.replace(GROUP_ID, "AAAAAAAAAAAAAAAAAAAAAA"), other)
    page.wait(lambda: len(page.rows()) == len(sent))
    assert [row[1:3] for row in page.rows()] == [[e, k] for e, k, _ in reversed(sent)]
    assert all(row[3] == ", ".join(routes) for row in page.rows())

    page.driver.find_elements("css selector", "#messages tbody.message tr")[2].click()
    page.js("document.activeElement.blur()")
    shot = Path(os.environ.get("SCREENSHOT_DIR", "/tmp")) / "inspector.png"
    assert page.driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
