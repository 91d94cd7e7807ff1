"""The settings file, ``payscope.toml``: where it is and what it holds. `payscope run` reads its ``[run]`` and
``[keys]`` (``wrapper.load_config``), the analysis its ``[orders]`` (``analyzers.orders.configured_rules``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_FILE = "payscope.toml"


class ConfigError(Exception):
    """payscope.toml could not be used; the message names the file and what is wrong."""


def config_path(env: Mapping[str, str]) -> Path | None:
    """The settings file: the one ``PAYSCOPE_CONFIG`` names, else ``./payscope.toml`` when there is one."""
    named = env.get("PAYSCOPE_CONFIG")
    config = Path(named) if named else Path(CONFIG_FILE)
    return config if named or config.is_file() else None


def read_config(path: Path) -> dict[str, Any]:
    """The document of a ``payscope.toml``; ConfigError naming the file and what is wrong."""
    import tomllib

    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


