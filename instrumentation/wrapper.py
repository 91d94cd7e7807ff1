"""`payscope run -- CMD`: start any Python program under OpenTelemetry auto-instrumentation, configured by payscope.

The program is exec'd in place of this process, so its exit code, standard streams and signals are
its own. Inside it, OpenTelemetry's own sitecustomize loads payscope's distro and configurator (by
entry point); nothing of the program changes. Before the exec, a relay process is forked that does the
exporting (see `relay.py`); ``PAYSCOPE_EXPORT=inprocess`` keeps the export inside the program instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, config_path, read_config
from .keys import CANONICAL

DEFAULT_COLLECTOR = "http://127.0.0.1:4318"


def _auto_instrumentation_dir() -> str:
    import opentelemetry.instrumentation.auto_instrumentation as auto

    return str(Path(auto.__file__).parent)


_RUN_SETTINGS = {"service": "OTEL_SERVICE_NAME", "collector": "PAYSCOPE_COLLECTOR", "export": "PAYSCOPE_EXPORT",
                 "quiet": "PAYSCOPE_QUIET", "request_id_header": "PAYSCOPE_REQUEST_ID_HEADER",
                 "emit_sw8": "PAYSCOPE_EMIT_SW8"}


def load_config(path: Path) -> dict[str, str]:
    """Environment settings from a ``payscope.toml``: ``[run]`` (service, collector, export, quiet,
    request_id_header) and
    ``[keys]`` (canonical key = list of field names holding it)."""
    document = read_config(path)
    unknown = set(document) - {"run", "keys", "orders"}  # [orders] is the analysis' (what counts as a charge)
    if unknown:
        raise ConfigError(f"{path}: unknown table [{sorted(unknown)[0]}] (known: [run], [keys], [orders])")
    settings: dict[str, str] = {}
    run_table = document.get("run", {})
    for key, value in run_table.items():
        if key not in _RUN_SETTINGS:
            raise ConfigError(f"{path}: [run] {key} is not a setting (known: {', '.join(_RUN_SETTINGS)})")
        if key == "export" and value not in ("relay", "inprocess"):
            raise ConfigError(f"{path}: [run] export must be \"relay\" or \"inprocess\", not {value!r}")
        if key in ("quiet", "emit_sw8"):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: [run] {key} must be true or false")
            if value:
                settings[_RUN_SETTINGS[key]] = "1"
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: [run] {key} must be a non-empty string")
        settings[_RUN_SETTINGS[key]] = value
    fields = []
    for canonical, names in document.get("keys", {}).items():
        if canonical not in CANONICAL:
            raise ConfigError(f"{path}: [keys] {canonical} is not a business key (known: {', '.join(CANONICAL)})")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not all(isinstance(n, str) and n and "," not in n and "=" not in n
                                                 for n in names):
            raise ConfigError(f"{path}: [keys] {canonical} must be a list of field names")
        fields += [f"{name}={canonical}" for name in names]
    if fields:
        settings["PAYSCOPE_KEY_FIELDS"] = ",".join(fields)
    return settings


def environment(command: Sequence[str], service: str | None, collector: str | None,
                base: dict[str, str] | None = None, config: Path | None = None) -> dict[str, str]:
    """The environment the program runs in: flags, then the environment, then ``payscope.toml``."""
    env = dict(os.environ if base is None else base)
    if config is None:
        config = config_path(env)
    if config is not None:
        from_file = load_config(config)
        # key names from both apply; the environment's come later, so they win a clash
        fields = ",".join(filter(None, [from_file.pop("PAYSCOPE_KEY_FIELDS", ""), env.get("PAYSCOPE_KEY_FIELDS")]))
        env = {**from_file, **env}
        if fields:
            env["PAYSCOPE_KEY_FIELDS"] = fields
    name = service or env.get("OTEL_SERVICE_NAME") or _program_name(command)
    env["OTEL_SERVICE_NAME"] = name
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector or env.get("PAYSCOPE_COLLECTOR") or DEFAULT_COLLECTOR
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    env["OTEL_PYTHON_DISTRO"] = "payscope"
    env["OTEL_PYTHON_CONFIGURATOR"] = "payscope"
    env.setdefault("OTEL_PROPAGATORS", "payscope")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    auto_dir = _auto_instrumentation_dir()
    cwd = os.getcwd()
    paths = [auto_dir] + ([cwd] if cwd not in paths else []) + [p for p in paths if p != auto_dir]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _program_name(command: Sequence[str]) -> str:
    words = [w for w in command if not w.startswith("-")]
    if not words:
        return "unknown_service"
    head = Path(words[0]).name
    if head.startswith("python") and len(words) > 1:
        if "-m" in command:
            return command[list(command).index("-m") + 1].split(".")[0]
        if "-c" in command:
            return head  # a one-liner has no name of its own
        return Path(words[1]).stem
    return head


def run(command: Sequence[str], service: str | None = None, collector: str | None = None,
        config: Path | None = None) -> None:
    """Replace this process with ``command`` under instrumentation; never returns."""
    if not command:
        print("payscope run: give the command to run after --, e.g. payscope run -- python app.py",
              file=sys.stderr)
        sys.exit(2)
    executable = shutil.which(command[0])
    if executable is None:
        print(f"payscope run: {command[0]}: command not found", file=sys.stderr)
        sys.exit(127)
    try:
        env = environment(command, service, collector, config=config)
    except ConfigError as exc:
        print(f"payscope run: {exc}", file=sys.stderr)
        sys.exit(2)
    env.pop("PAYSCOPE_RELAY", None)
    if env.get("PAYSCOPE_EXPORT", "relay") != "inprocess":
        from .relay import start

        path = start(env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/"))
        if path:  # otherwise the program exports in-process
            env["PAYSCOPE_RELAY"] = path
    os.execve(executable, [command[0], *command[1:]], env)
