"""What `payscope run` calls a service when nobody names it, and the environment it gives the program."""

from __future__ import annotations

import pytest

from payscope.instrumentation.wrapper import environment


@pytest.mark.parametrize(("command", "name"), [
    (["python", "app.py"], "app"),
    (["python3.11", "-u", "/srv/payments/worker.py", "--queue", "x"], "worker"),
    (["python", "-m", "celery", "-A", "tasks", "worker"], "celery"),
    (["python", "-m", "payments.api"], "payments"),
    (["python", "-c", "print('x')"], "python"),
    (["gunicorn", "-w", "4", "app:app"], "gunicorn"),
    (["/usr/local/bin/uvicorn", "api:app"], "uvicorn"),
])
def test_the_service_is_named_after_the_program(command: list[str], name: str) -> None:
    assert environment(command, None, None, base={})["OTEL_SERVICE_NAME"] == name


def test_flags_win_over_the_environment() -> None:
    base = {"OTEL_SERVICE_NAME": "from-env", "PAYSCOPE_COLLECTOR": "http://10.0.0.5:4318"}
    env = environment(["python", "app.py"], None, None, base=base)
    assert (env["OTEL_SERVICE_NAME"], env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("from-env", "http://10.0.0.5:4318")
    env = environment(["python", "app.py"], "order", "http://127.0.0.1:9999", base=base)
    assert (env["OTEL_SERVICE_NAME"], env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("order", "http://127.0.0.1:9999")
    assert env["OTEL_PYTHON_DISTRO"] == env["OTEL_PYTHON_CONFIGURATOR"] == "payscope"
