"""The tc-events command: check-bindings through CliRunner, server as a real process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import free_port, run_server

from quart_events.bindings import NOT_ARRAY
from quart_events.cli import main

VALID = json.dumps(
    {
        "bindings": [
            {"exchange": "exchange/a", "routingKeyPattern": "x.#"},
            {"exchange": "exchange/b", "routingKeyPattern": "*"},
        ]
    }
)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_check_bindings_valid(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check-bindings", VALID])
    assert result.exit_code == 0
    assert result.output == "2 bindings, valid:\n  exchange/a  x.#\n  exchange/b  *\n"


def test_check_bindings_from_stdin(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check-bindings", "-"], input=VALID)
    assert result.exit_code == 0 and "2 bindings, valid" in result.output


def test_check_bindings_invalid_prints_the_client_message(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check-bindings", '{"bindings": 1}'])
    assert result.exit_code == 1
    assert result.stderr == NOT_ARRAY + "\n"


def test_check_bindings_uses_the_profile_limits(runner: CliRunner, tmp_path: object) -> None:
    amq = json.dumps({"bindings": [{"exchange": "amq.rabbitmq.log", "routingKeyPattern": "#"}]})
    result = runner.invoke(main, ["check-bindings", amq])
    assert result.exit_code == 1 and "not allowed" in result.stderr


def test_usage_errors_exit_2(runner: CliRunner) -> None:
    assert runner.invoke(main, ["check-bindings"]).exit_code == 2
    assert runner.invoke(main, ["server", "--port", "notaport"]).exit_code == 2
    assert runner.invoke(main, ["server", "--profile", "staging"]).exit_code == 2
    assert runner.invoke(main, ["nonsense"]).exit_code == 2


def test_help_explains_every_option(runner: CliRunner) -> None:
    top = runner.invoke(main, ["--help"]).output
    assert "server" in top and "check-bindings" in top
    server_help = runner.invoke(main, ["server", "--help"]).output
    for option in ("--profile", "--config", "--host", "--port"):
        assert option in server_help
    assert "standard input" in runner.invoke(main, ["check-bindings", "--help"]).output


def test_missing_config_file_is_one_clear_line(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check-bindings", "--config", "/nonexistent.yml", VALID])
    assert result.exit_code == 1
    assert "config file /nonexistent.yml does not exist" in result.stderr


def test_server_with_unreachable_broker_says_so_in_one_line() -> None:
    closed_port = free_port()
    result = run_server(
        "--port",
        str(free_port()),
        env={"PULSE_PORT": str(closed_port), "PULSE_PASSWORD": "pw-s3cret"},
    )
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert errors[-1] == (
        f"tc-events: cannot reach RabbitMQ at localhost:{closed_port}: connection refused"
    )
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr + result.stdout


@pytest.mark.broker
def test_server_with_wrong_password_says_login_refused() -> None:
    result = run_server("--port", str(free_port()), env={"PULSE_PASSWORD": "wrong"})
    assert result.returncode == 1
    assert "login refused for user 'guest'" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and "wrong" not in result.stderr


def test_server_with_bad_setting_exits_1() -> None:
    result = run_server(env={"TC_EVENTS_SERVER__PING_INTERVAL": "-1"})
    assert result.returncode == 1
    assert (
        "environment variable TC_EVENTS_SERVER__PING_INTERVAL: server.ping_interval"
        in result.stderr
    )


def test_python_m_and_console_script_agree() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quart_events", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "Usage: tc-events" in result.stdout


@pytest.mark.parametrize("hostname", ["rabbit:", "amqp://rabbit", "rabbit 2", "a:1,,b", "a:99999"])
def test_server_with_an_invalid_broker_host_names_the_setting(hostname: str) -> None:
    result = run_server(env={"PULSE_HOSTNAME": hostname})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: settings: environment variable PULSE_HOSTNAME: pulse.hostname:")
    assert "each `host` or `host:port`, separated by commas" in line


@pytest.mark.broker
def test_workers_need_a_port_they_can_share() -> None:
    result = run_server("--port", "0", "--workers", "2")
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1].endswith("several workers need a fixed port, not 0")
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--port", str(port), "--workers", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"tc-events: cannot listen on http://127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.broker
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_key_that_is_not_the_certificates_is_one_line_before_anything_starts(
    certificates: tuple[Path, Path, Path], tmp_path: Path, workers: str
) -> None:
    """Once: "listening on https://..." then "cannot listen on http://...: [X509:
    KEY_VALUES_MISMATCH]"; with --workers the workers died five times first."""
    _, cert, _ = certificates
    other_key = tmp_path / "other.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-out", str(other_key)],
        check=True,
        capture_output=True,
    )
    port = str(free_port())
    args = ["--port", port, "--workers", workers, "--certfile", str(cert)]
    result = run_server(*args, "--keyfile", str(other_key))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        f"tc-events: server.certfile {cert} / server.keyfile {other_key}: "
        "the key is not the certificate's"
    )
    assert not any("listening on" in line or "started" in line for line in lines)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    result = run_server(*args, "--keyfile", str(garbage))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("not a PEM certificate and key")


@pytest.mark.broker
def test_a_missing_metrics_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    result = run_server("--port", "0", env={"PROMETHEUS_MULTIPROC_DIR": str(missing)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"tc-events: PROMETHEUS_MULTIPROC_DIR is '{missing}', which is not a directory "
        "(the metrics of several workers are kept there)"
    )
