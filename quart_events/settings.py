"""Settings: built-in profiles, a YAML user config, environment variables, flags.

Highest first: command-line flags, ``TC_EVENTS_<SECTION>__<NAME>`` variables, the
names a Taskcluster deployment sets (``PULSE_*``, ``PORT``), the user config's
profile, its ``defaults``, the built-in profile, the built-in ``defaults``.
A mistake is refused with a message naming where it came from (file and profile,
or variable) and the key, never the value: it may be a password.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .bindings import Limits

log = logging.getLogger(__name__)

PROFILES = ("defaults", "development", "test", "production")
DEFAULT_PROFILE = "development"
USER_CONFIG = Path("user-config.yml")
ENV_PREFIX = "TC_EVENTS_"
# Variables a Taskcluster deployment already sets, as (section, key).
TASKCLUSTER_ENV = {
    "PULSE_HOSTNAME": ("pulse", "hostname"),
    "PULSE_PORT": ("pulse", "port"),
    "PULSE_USERNAME": ("pulse", "username"),
    "PULSE_PASSWORD": ("pulse", "password"),
    "PULSE_VHOST": ("pulse", "vhost"),
    "PULSE_NAMESPACE": ("pulse", "namespace"),
    "PULSE_AMQPS": ("pulse", "tls"),
    "PORT": ("server", "port"),
}


class SettingsError(Exception):
    """A setting is wrong; the message says where and which key."""


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    port: int = Field(ge=0, le=65535)
    ping_interval: float = Field(gt=0)
    cors_allow_origin: str
    max_streams: int = Field(ge=1)
    max_bindings_per_stream: int = Field(ge=0)
    max_words_per_stream: int = Field(ge=1)
    max_binding_words: int = Field(ge=1)
    max_inner_hash_words: int = Field(ge=0)
    max_pending_binds: int = Field(ge=100)
    allowed_exchanges: list[str]
    denied_exchanges: list[str]
    buffer_messages: int = Field(ge=1)
    buffer_bytes: int = Field(ge=1024)
    max_buffered_bytes: int | None = Field(default=None, ge=1024)
    max_request_line: int = Field(ge=1024)
    front_door: bool = True
    write_timeout: float = Field(gt=0)
    shutdown_grace: float = Field(gt=0)
    retry_min_ms: int = Field(ge=0)
    retry_max_ms: int = Field(ge=0)
    workers: int = Field(ge=1, le=256)
    metrics: bool
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    health_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"]
    log_format: Literal["text", "json"]
    log_client_address: bool
    certfile: Path | None = None
    keyfile: Path | None = None
    websocket_allowed_origins: list[str]
    websocket_lifetime: float = Field(gt=0)
    websocket_ping_interval: float = Field(gt=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together (TLS needs both)")
        for path in (self.certfile, self.keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a readable file")
        return self

    @model_validator(mode="after")
    def _ports_of_their_own(self) -> ServerSettings:
        if self.health_port and self.health_port in (self.port, self.metrics_port):
            raise ValueError("health_port must be a port of its own (not port or metrics_port)")
        return self

    @model_validator(mode="after")
    def _retry_window(self) -> ServerSettings:
        if self.retry_max_ms < self.retry_min_ms:
            raise ValueError("retry_max_ms must not be below retry_min_ms")
        return self

    def limits(self) -> Limits:
        return Limits(
            max_bindings=self.max_bindings_per_stream,
            max_words=self.max_words_per_stream,
            allowed_exchanges=tuple(self.allowed_exchanges),
            denied_exchanges=tuple(self.denied_exchanges),
        )


AMQP_PORT, AMQPS_PORT = 5672, 5671
# One node of `pulse.hostname`: a host name or IPv4 address with an optional port, an
# IPv6 address in brackets with an optional port, or a bare IPv6 address.
NODE = re.compile(
    r"(?P<host>[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[(?P<v6>[0-9A-Fa-f:.]+)\])"
    r"(:(?P<port>[0-9]{1,5}))?"
    r"|(?P<bare>[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*)"
)


def parse_nodes(value: str) -> list[tuple[str, int | None]]:
    """``host``, ``host:port``, ``[v6]:port`` entries, comma-separated; ``ValueError`` if not."""
    nodes: list[tuple[str, int | None]] = []
    for entry in value.split(","):
        match = NODE.fullmatch(entry.strip())
        port = int(match["port"]) if match and match["port"] else None
        if match is None or (port is not None and not 1 <= port <= 65535):
            raise ValueError(
                "must be one or more broker nodes, each `host` or `host:port`, "
                "separated by commas (no scheme)"
            )
        nodes.append((match["v6"] or match["bare"] or match["host"], port))
    return nodes


class PulseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hostname: str
    port: int | None = Field(default=None, ge=1, le=65535)  # none: 5671 with TLS, else 5672
    username: str
    password: SecretStr
    vhost: str
    namespace: str | None = None
    tls: bool
    tls_ca_file: Path | None = None
    connect_timeout: float = Field(gt=0)
    heartbeat: int = Field(ge=0, le=65535)
    start_without_broker: bool
    wait_for_broker: float = Field(ge=0)
    reconnect_min_delay: float = Field(gt=0)
    reconnect_max_delay: float = Field(gt=0)
    queue_max_length: int = Field(ge=1)
    max_message_bytes: int = Field(ge=1024)
    read_ahead: int = Field(ge=1, le=10_000)

    @model_validator(mode="before")
    @classmethod
    def _prefetch_count_is_gone(cls, values: Any) -> Any:
        """Configurations of earlier versions still load: deliveries are not acknowledged
        any more, so the prefetch window has no meaning (``read_ahead`` bounds memory)."""
        if isinstance(values, dict) and "prefetch_count" in values:
            values = {k: v for k, v in values.items() if k != "prefetch_count"}
            log.warning("pulse.prefetch_count is no longer used (see pulse.read_ahead)")
        return values

    @field_validator("hostname")
    @classmethod
    def _nodes(cls, value: str) -> str:
        parse_nodes(value)
        return value

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """The broker's nodes (a cluster may have several), each with its port."""
        return [(host, port or self.amqp_port) for host, port in parse_nodes(self.hostname)]

    @property
    def amqp_port(self) -> int:
        """The port to connect to: the one set, else AMQP's (5671 with TLS, amqps)."""
        if self.port is not None:
            return self.port
        return AMQPS_PORT if self.tls else AMQP_PORT

    @model_validator(mode="after")
    def _namespace_defaults_to_username(self) -> PulseSettings:
        if not self.namespace:
            self.namespace = self.username
        return self


class HistorySettings(BaseModel):
    """What the deployment keeps for resumable streams (``history.py``)."""

    model_config = ConfigDict(extra="forbid")

    exchanges: list[str] = []  # shell patterns of the exchanges kept; none: no history
    max_age: str = Field(default="1D", pattern=r"^[0-9]+(Y|M|D|h|m|s)$")  # RabbitMQ's x-max-age
    max_bytes: int = Field(default=2**30, ge=2**16)  # the stream's x-max-length-bytes
    # Retention removes whole segments (x-stream-max-segment-size-bytes).
    segment_bytes: int = Field(default=100 * 2**20, ge=2**12)
    # Replays read at once per process: each holds a consumer of the stream, and each
    # of those costs the broker open files (1,000 at once ran it out: emfile).
    max_replays: int = Field(default=50, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    server: ServerSettings
    pulse: PulseSettings
    history: HistorySettings = HistorySettings()


class _TaskclusterEnv(PydanticBaseSettingsSource):
    """``PULSE_*`` and ``PORT``, the names Taskcluster's deployments set."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, dict[str, str]] = {}
        for variable, (section, key) in TASKCLUSTER_ENV.items():
            if variable in os.environ:
                found.setdefault(section, {})[key] = os.environ[variable]
        return found


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SettingsError(f"{origin}: not valid YAML: {error}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SettingsError(f"{origin}: must be a mapping of profiles ({', '.join(PROFILES)})")
    for name, section in document.items():
        if name not in PROFILES:
            raise SettingsError(
                f"{origin}: unknown profile `{name}` (profiles are {', '.join(PROFILES)})"
            )
        if section is not None and not isinstance(section, dict):
            raise SettingsError(f"{origin}: profile `{name}` must be a mapping")
    return document


def _layers(profile: str, config_file: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """The YAML layers, highest first, each with where it came from."""
    builtin = _read_yaml(
        resources.files(__package__).joinpath("default-config.yml").read_text(), "built-in config"
    )
    user: dict[str, Any] = {}
    user_origin = ""
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"config file {config_file} does not exist")
        user_origin = str(config_file)
    elif USER_CONFIG.is_file():
        config_file, user_origin = USER_CONFIG, str(USER_CONFIG)
    if config_file is not None:
        try:
            text = config_file.read_text()
        except OSError as error:
            raise SettingsError(f"config file {config_file}: {error.strerror}") from None
        user = _read_yaml(text, user_origin)
    layers = []
    for document, origin in ((user, user_origin), (builtin, "built-in config")):
        if profile != "defaults":
            layers.append((f"{origin} (profile {profile})", document.get(profile) or {}))
        layers.append((f"{origin} (profile defaults)", document.get("defaults") or {}))
    return layers


def _has_key(document: Mapping[str, Any], loc: tuple[Any, ...]) -> bool:
    node: Any = document
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


SourceMaker = Callable[
    [type[BaseSettings], PydanticBaseSettingsSource, PydanticBaseSettingsSource],
    PydanticBaseSettingsSource,
]


@dataclass(frozen=True)
class _Source:
    """One place settings come from: how pydantic reads it, and whether it holds a key
    (to name it in an error)."""

    make: SourceMaker
    holds: Callable[[tuple[Any, ...]], str | None]


def _environment_variable(loc: tuple[Any, ...]) -> str | None:
    if len(loc) < 2:
        return None
    variable = f"{ENV_PREFIX}{loc[0]}__{loc[1]}".upper()
    if variable in {name.upper() for name in os.environ}:
        return f"environment variable {variable}"
    return None


def _taskcluster_variable(loc: tuple[Any, ...]) -> str | None:
    for name, place in TASKCLUSTER_ENV.items():
        if place == tuple(loc[:2]) and name in os.environ:
            return f"environment variable {name}"
    return None


def _yaml_source(origin: str, document: dict[str, Any]) -> _Source:
    return _Source(
        lambda cls, _init, _env: InitSettingsSource(cls, document),
        lambda loc: origin if _has_key(document, loc) else None,
    )


def _sources(
    overrides: Mapping[str, Any], layers: list[tuple[str, dict[str, Any]]]
) -> list[_Source]:
    """Every source of settings, highest first: the one list that builds them and that
    names where a wrong value came from."""
    return [
        _Source(
            lambda cls, init, _env: init,
            lambda loc: "command line" if _has_key(overrides, loc) else None,
        ),
        _Source(lambda cls, _init, env: env, _environment_variable),
        _Source(lambda cls, _init, _env: _TaskclusterEnv(cls), _taskcluster_variable),
        *(_yaml_source(origin, document) for origin, document in layers),
    ]


def _origin(loc: tuple[Any, ...], sources: list[_Source]) -> str:
    return next((found for source in sources if (found := source.holds(loc))), "settings")


def load_settings(
    profile: str | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings of one profile; ``overrides`` are nested, e.g. {"server": {"port": 1}}."""
    profile = profile or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise SettingsError(f"unknown profile `{profile}` (profiles are {', '.join(PROFILES)})")
    overrides = dict(overrides or {})
    sources = _sources(overrides, _layers(profile, config_file))

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return tuple(
                source.make(settings_cls, init_settings, env_settings) for source in sources
            )

    try:
        loaded = _Layered(**overrides)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            loc = tuple(item["loc"])
            key = ".".join(str(part) for part in loc)
            problems.append(f"{_origin(loc, sources)}: {key}: {item['msg']}")
        raise SettingsError("; ".join(problems)) from None
    return loaded
