"""Options and helpers shared by the ``tc-events`` commands."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from .settings import DEFAULT_PROFILE, PROFILES, Settings, SettingsError, load_settings

EXIT_FAILURE = 1


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (leaner transports, faster I/O), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


profile_option = click.option(
    "--profile",
    type=click.Choice(PROFILES),
    default=None,
    help=f"Settings profile to apply over `defaults` (default: {DEFAULT_PROFILE}).",
)
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="YAML user config with the same profiles (default: ./user-config.yml if present).",
)


def settings_of(
    profile: str | None, config_file: Path | None, overrides: dict[str, Any]
) -> Settings:
    """The settings, or one line naming what is wrong (exit 1)."""
    try:
        return load_settings(profile, config_file, overrides)
    except SettingsError as error:
        raise click.ClickException(f"settings: {error}") from None
