"""``tc-events listen`` and ``tc-events publish``: thin commands over ``client.py``.

``listen`` is the tool to wait for something in a script: listen for a task's
completion, exit on the first message. Exit codes: 0 done, 1 the server's error
(its message on standard error) or bad input, 2 usage, 3 timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from .bindings import BindingError
from .client import Listener, ServerError, bindings_document
from .client import publish as publish_message
from .errors import BrokerUnavailable, ExchangeMissing
from .message import json_body
from .options import EXIT_FAILURE, config_option, profile_option, run_loop, settings_of

EXIT_TIMEOUT = 3


# C0 and C1 control characters and DEL: a publisher's text must never drive the
# terminal (clear it, retitle it, write the clipboard with OSC 52).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character shown as its escape (``\\x1b``)."""
    return CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def as_json_line(value: Any, indent: int | None = None) -> str:
    """JSON that any terminal or pipe takes: lone surrogates (valid JSON escapes, but not
    encodable) stay escaped."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, indent=indent)
    return text


class Terminal:
    """What ``listen`` writes: for a person (a terminal) or for a program (a pipe)."""

    def __init__(self) -> None:
        self.status_shown = False

    def message(self, message: dict[str, Any]) -> None:
        if sys.stdout.isatty():  # for a person: a heading line, then the payload
            self._end_status()
            now = datetime.now(UTC).strftime("%H:%M:%S")
            routes = f"  routes: {', '.join(message['routes'])}" if message["routes"] else ""
            heading = f"{now}  {message['exchange']}  {message['routingKey']}{routes}"
            click.echo(printable(heading))
            pretty = as_json_line(message["payload"], indent=2)
            click.echo("\n".join(printable(line) for line in pretty.split("\n")))
        else:  # for a program: one JSON object per line
            click.echo(as_json_line(message))

    def status(self, text: str) -> None:
        if sys.stderr.isatty():
            click.echo(f"\r\033[2K{printable(text)}", err=True, nl=False)
            self.status_shown = True

    def _end_status(self) -> None:
        """The status line is erased before a message is shown, so the two never share it."""
        if self.status_shown and sys.stderr.isatty():
            click.echo("\r\033[2K", err=True, nl=False)
            self.status_shown = False


@click.command()
@click.argument("bindings_json", metavar="[JSON]", required=False)
@click.option("--url", default=None, help="The server (default: the local one of the settings).")
@click.option("--exchange", "-e", "exchanges", multiple=True, help="Exchange of a binding.")
@click.option("--pattern", "-p", "patterns", multiple=True, help="Its routing-key pattern.")
@click.option("--count", type=click.IntRange(0), default=0, help="Stop after N messages.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Give up after S seconds (exit 3).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Resumable stream: miss nothing across reconnects (needs the server's history).",
)
@click.option(
    "--since",
    type=click.IntRange(0),
    default=None,
    help="With --resume: start after this position (a message id) instead of now.",
)
@profile_option
@config_option
def listen(
    bindings_json: str | None,
    url: str | None,
    exchanges: tuple[str, ...],
    patterns: tuple[str, ...],
    count: int,
    timeout: float | None,
    resume: bool,
    since: int | None,
    profile: str | None,
    config_file: Path | None,
) -> None:
    """Print the messages a stream with these bindings gets, one JSON object per line.

    Bindings as JSON (the `bindings` query parameter; `-` or no argument reads it
    from standard input), or as repeated `--exchange E --pattern P` pairs.
    """
    if exchanges or patterns:
        if bindings_json is not None or len(exchanges) != len(patterns):
            raise click.UsageError("give JSON, or as many --exchange as --pattern options")
        bindings_json = bindings_document(list(zip(exchanges, patterns, strict=True)))
    elif bindings_json in (None, "-"):
        bindings_json = sys.stdin.read()
    if url is None:
        server = settings_of(profile, config_file, {}).server
        url = f"http://{server.host}:{server.port}"
    terminal = Terminal()
    if since is not None and not resume:
        raise click.UsageError("--since needs --resume")
    listener = Listener(
        url, bindings_json, terminal.message, terminal.status, count, resume=resume, position=since
    )
    try:
        run_loop(asyncio.wait_for(listener.run(), timeout))
    except TimeoutError:
        wanted = f"{count} messages" if count > 1 else "message"
        click.echo(f"tc-events: no {wanted} within {timeout:g} s", err=True)
        sys.exit(EXIT_TIMEOUT)
    except (ServerError, BindingError) as error:
        click.echo(f"tc-events: {error}", err=True)
        sys.exit(EXIT_FAILURE)


@click.command()
@click.argument("exchange")
@click.argument("routing_key")
@click.argument("body", metavar="[JSON]", required=False)
@click.option("--route", "routes", multiple=True, help="A route: CC `route.<ROUTE>` (repeat).")
@profile_option
@config_option
def publish(
    exchange: str,
    routing_key: str,
    body: str | None,
    routes: tuple[str, ...],
    profile: str | None,
    config_file: Path | None,
) -> None:
    """Publish a JSON message as Taskcluster does (body from standard input if not given)."""
    text = sys.stdin.read() if body in (None, "-") else body
    if json_body(text.encode("utf-8", "surrogatepass")) is None:
        # The server's own rule: strict JSON, which a browser's JSON.parse takes.
        raise click.ClickException(
            "the message body is not valid JSON (NaN and Infinity are not JSON either)"
        )
    pulse = settings_of(profile, config_file, {}).pulse
    try:
        run_loop(publish_message(pulse, exchange, routing_key, text.encode(), routes))
    except (BrokerUnavailable, ExchangeMissing) as error:
        click.echo(f"tc-events: {error}", err=True)
        sys.exit(EXIT_FAILURE)
