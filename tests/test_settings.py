"""Settings: profiles, the user config, environment variables, and their mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from quart_events.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("TC_EVENTS_", "PULSE_")) or name == "PORT":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./user-config.yml unless a test writes one


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_built_in_defaults_reach_the_local_broker() -> None:
    settings = load_settings()
    assert (settings.pulse.hostname, settings.pulse.amqp_port, settings.pulse.vhost) == (
        "localhost",
        5672,
        "/",
    )
    assert (
        settings.pulse.username == "guest" and settings.pulse.password.get_secret_value() == "guest"
    )
    assert settings.pulse.namespace == "guest"
    assert settings.server.ping_interval == 20
    assert settings.pulse.tls is False


def test_profiles() -> None:
    assert load_settings("test").server.ping_interval == 1
    assert load_settings("production").server.host == "0.0.0.0"
    assert load_settings("development").server.host == "127.0.0.1"
    with pytest.raises(SettingsError, match="unknown profile `staging`"):
        load_settings("staging")


def test_user_config_overrides_built_ins_by_profile(tmp_path: Path) -> None:
    config = write(
        tmp_path / "mine.yml",
        """
defaults:
  server: {ping_interval: 7}
  pulse: {hostname: rabbit.internal}
test:
  server: {ping_interval: 3}
""",
    )
    assert load_settings("test", config).server.ping_interval == 3
    development = load_settings("development", config)
    assert development.server.ping_interval == 7 and development.pulse.hostname == "rabbit.internal"
    assert development.server.port == 12345  # untouched keys keep the built-in value


def test_user_config_yml_in_the_working_directory_is_read(tmp_path: Path) -> None:
    write(tmp_path / "user-config.yml", "development:\n  server: {port: 4444}\n")
    assert load_settings().server.port == 4444


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"config file .*nope\.yml does not exist"):
        load_settings(config_file=tmp_path / "nope.yml")


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yml", "test:\n  server:\n    ping_intervall: 3\n")
    with pytest.raises(SettingsError) as caught:
        load_settings("test", config)
    assert str(caught.value).startswith(f"{config} (profile test): server.ping_intervall:")


def test_wrong_type_names_file_and_key_but_not_the_value(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.yml", "defaults:\n  pulse:\n    port: not-a-port-s3cret\n")
    with pytest.raises(SettingsError) as caught:
        load_settings("test", config)
    message = str(caught.value)
    assert f"{config} (profile defaults): pulse.port:" in message
    assert "s3cret" not in message


def test_unknown_profile_or_section_in_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="unknown profile `staging`"):
        load_settings(config_file=write(tmp_path / "a.yml", "staging: {}\n"))
    with pytest.raises(SettingsError, match=r"\(profile test\): server.x: Extra inputs"):
        load_settings("test", write(tmp_path / "b.yml", "test:\n  server: {x: 1}\n"))
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(config_file=write(tmp_path / "c.yml", "test: [\n"))


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.yml", "test:\n  server: {ping_interval: 3}\n")
    monkeypatch.setenv("TC_EVENTS_SERVER__PING_INTERVAL", "0.5")
    monkeypatch.setenv("TC_EVENTS_PULSE__VHOST", "/tc")
    settings = load_settings("test", config)
    assert settings.server.ping_interval == 0.5 and settings.pulse.vhost == "/tc"


def test_taskcluster_deployment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "PULSE_HOSTNAME": "pulse.example",
        "PULSE_PORT": "5671",
        "PULSE_USERNAME": "tc-events",
        "PULSE_PASSWORD": "pw",
        "PULSE_VHOST": "/v",
        "PORT": "8081",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings("production")
    assert settings.pulse.hostname == "pulse.example" and settings.pulse.port == 5671
    assert settings.pulse.namespace == "tc-events"  # defaults to the username
    assert settings.server.port == 8081
    monkeypatch.setenv("PULSE_NAMESPACE", "ns")
    assert load_settings().pulse.namespace == "ns"


def test_flags_override_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TC_EVENTS_SERVER__PORT", "1111")
    monkeypatch.setenv("PORT", "2222")
    assert load_settings(overrides={"server": {"port": 3333}}).server.port == 3333
    assert load_settings().server.port == 1111


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULSE_PORT", "abc")
    with pytest.raises(SettingsError, match=r"environment variable PULSE_PORT: pulse\.port"):
        load_settings()


def test_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PULSE_PASSWORD", "hunter2-very-secret")
    settings = load_settings()
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    assert settings.pulse.password.get_secret_value() == "hunter2-very-secret"


def test_example_config_is_valid_and_complete() -> None:
    import yaml

    example = Path(__file__).resolve().parent.parent / "user-config-example.yml"
    settings = load_settings("production", example)
    document = yaml.safe_load(example.read_text())
    shown = {(section, key) for section, keys in document["defaults"].items() for key in keys}
    every = {
        (section, key)
        for section in ("server", "pulse")
        for key in type(getattr(settings, section)).model_fields
    }
    assert every <= shown, f"not in the example: {sorted(every - shown)}"


def test_prefetch_count_of_earlier_versions_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write(tmp_path / "old.yml", "defaults:\n  pulse: {prefetch_count: 500}\n")
    settings = load_settings("development", config)
    assert settings.pulse.read_ahead == 100
    assert "pulse.prefetch_count is no longer used (see pulse.read_ahead)" in caplog.text


def test_the_health_port_must_be_a_port_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TC_EVENTS_SERVER__METRICS_PORT", "9000")
    for taken in ("9000", "12345"):
        monkeypatch.setenv("TC_EVENTS_SERVER__HEALTH_PORT", taken)
        with pytest.raises(SettingsError, match="health_port must be a port of its own"):
            load_settings()
    monkeypatch.setenv("TC_EVENTS_SERVER__HEALTH_PORT", "9001")
    assert load_settings().server.health_port == 9001
