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

DEFAULT_COLLECTOR = "http://127.0.0.1:4318"


def _auto_instrumentation_dir() -> str:
    import opentelemetry.instrumentation.auto_instrumentation as auto

    return str(Path(auto.__file__).parent)


def environment(command: Sequence[str], service: str | None, collector: str | None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the program runs in."""
    env = dict(os.environ if base is None else base)
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
        return Path(words[1]).stem
    return head


def run(command: Sequence[str], service: str | None = None, collector: str | None = None) -> None:
    """Replace this process with ``command`` under instrumentation; never returns."""
    if not command:
        print("payscope run: give the command to run after --, e.g. payscope run -- python app.py",
              file=sys.stderr)
        sys.exit(2)
    executable = shutil.which(command[0])
    if executable is None:
        print(f"payscope run: {command[0]}: command not found", file=sys.stderr)
        sys.exit(127)
    env = environment(command, service, collector)
    env.pop("PAYSCOPE_RELAY", None)
    if env.get("PAYSCOPE_EXPORT", "relay") != "inprocess":
        from .relay import start

        path = start(env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/"))
        if path:  # otherwise the program exports in-process
            env["PAYSCOPE_RELAY"] = path
    os.execve(executable, [command[0], *command[1:]], env)
