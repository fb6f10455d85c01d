"""The ``tc-events`` command: user mistakes become one clear line and an exit code.

Exit codes: 0 fine, 1 a failure (invalid bindings, broker unreachable, bad
settings), 2 a usage error (click's own). Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from . import logs
from .app import create_app
from .bindings import BindingError, parse_bindings
from .broker import check_broker
from .descriptors import fit_to_open_files
from .errors import BrokerUnavailable, StartupError
from .options import EXIT_FAILURE, config_option, profile_option, run_loop, settings_of
from .serve import serve_app
from .settings import Settings, load_settings
from .startup import check_files
from .supervisor import Supervisor, check_port
from .tools import listen, publish

log = logging.getLogger("quart_events")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log at debug level and show tracebacks.")
@click.version_option(package_name="quart_events")
@click.pass_context
def main(context: click.Context, debug: bool) -> None:
    """Stream RabbitMQ topic exchanges to browsers as Server-Sent Events.

    A drop-in for Taskcluster's events service: clients open
    /api/events/v1/connect/?bindings=<JSON> and receive every matching message.
    """
    context.obj = {"debug": debug}
    logs.configure("info", "text", debug)


@main.command()
@profile_option
@config_option
@click.option("--host", default=None, help="Address to listen on (setting server.host).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="Port to listen on (server.port)."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes sharing the port, each with its own broker queue (server.workers).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Least important log lines shown (server.log_level).",
)
@click.option(
    "--certfile",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PEM certificate: serve TLS and HTTP/2 (server.certfile; needs --keyfile).",
)
@click.option(
    "--keyfile",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PEM private key of --certfile (server.keyfile).",
)
@click.option("--worker-index", type=int, default=None, hidden=True)
@click.pass_context
def server(
    context: click.Context,
    profile: str | None,
    config_file: Path | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    log_level: str | None,
    certfile: Path | None,
    keyfile: Path | None,
    worker_index: int | None,
) -> None:
    """Run the events service until SIGTERM, SIGINT or SIGHUP."""
    options = {
        "host": host,
        "port": port,
        "workers": workers,
        "log_level": log_level,
        "certfile": certfile,
        "keyfile": keyfile,
    }
    overrides: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    flags: dict[str, Any] = {"server": overrides} if overrides else {}
    if worker_index is not None:
        overrides["workers"] = 1
        overrides["health_port"] = None  # the parent answers it for all workers
        # The parent checked the broker at start; a worker started later (after a death)
        # during an outage waits for it, as a running one does, instead of dying.
        flags = {"server": overrides, "pulse": {"start_without_broker": True}}
    settings = settings_of(profile, config_file, flags)
    debug = context.obj["debug"]
    logs.configure(settings.server.log_level, settings.server.log_format, debug, worker_index)
    try:
        check_files(settings)
        if settings.server.workers > 1:
            if not settings.pulse.start_without_broker:
                run_loop(check_broker(settings.pulse))
            check_port(settings)
            _log_settings(settings)
            sys.exit(Supervisor(_worker_command(), settings).run())
        if worker_index is None:
            _log_settings(settings)
        settings, open_files = fit_to_open_files(settings)
        app = create_app(
            settings, reload=lambda: load_settings(profile, config_file, flags), lifecycle=False
        )
        run_loop(serve_app(app, reuse_port=worker_index is not None, open_files=open_files))
    except (BrokerUnavailable, StartupError) as error:
        if debug:
            raise
        click.echo(f"tc-events: {error}", err=True)
        sys.exit(EXIT_FAILURE)


def _log_settings(settings: Settings) -> None:
    """The effective settings, once, at start; secrets show as asterisks."""
    log.info("settings: %s", json.dumps(settings.model_dump(mode="json"), sort_keys=True))


def _worker_command() -> list[str]:
    """A worker runs this very command line (the parent's own arguments)."""
    return [sys.executable, "-m", "quart_events", *sys.argv[1:]]


@main.command("check-bindings")
@click.argument("bindings_json", metavar="JSON")
@profile_option
@config_option
def check_bindings(bindings_json: str, profile: str | None, config_file: Path | None) -> None:
    """Validate bindings exactly as the server does.

    JSON is the value of the `bindings` query parameter, e.g.
    '{"bindings": [{"exchange": "exchange/x", "routingKeyPattern": "#"}]}';
    `-` reads it from standard input. Limits (count, allowed exchanges) come
    from the settings of --profile and --config. Exits 0 when valid, 1 with
    the message a client would get when not.
    """
    if bindings_json == "-":
        bindings_json = sys.stdin.read()
    settings = settings_of(profile, config_file, {})
    try:
        bindings = parse_bindings(bindings_json, settings.server.limits())
    except BindingError as error:
        click.echo(str(error), err=True)
        sys.exit(EXIT_FAILURE)
    count = len(bindings)
    click.echo(f"{count} binding{'s' if count != 1 else ''}, valid:")
    for binding in bindings:
        click.echo(f"  {binding.exchange}  {binding.routing_key_pattern}")


main.add_command(listen)
main.add_command(publish)
