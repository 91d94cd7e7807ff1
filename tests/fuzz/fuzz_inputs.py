"""A coverage-guided fuzzer (atheris) over what payscope reads from the outside: OTLP protobuf and JSON
requests, trace and log records in them, every log line format. Every input must be read or refused with
an InputError; anything else (an exception, a hang past -timeout, memory past -rss_limit_mb) is a crash.

Run by tests/test_fuzz.py for a bounded time; by hand for longer:
    .venv/bin/python tests/fuzz/fuzz_inputs.py -max_total_time=3600 -rss_limit_mb=2048 -timeout=10
"""

import sys

import atheris

with atheris.instrument_imports():
    from payscope.collector import configs, logparse
    from payscope.collector.otlp import decode_logs, decode_traces
    from payscope.errors import InputError


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 5)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        if target == 0:
            decode_traces(body, "application/x-protobuf")
        elif target == 1:
            decode_logs(body, "application/x-protobuf")
        elif target == 2:
            decode_traces(body, "application/json")
        elif target == 3:
            decode_logs(body, "application/json")
        elif target == 4:
            line = body.decode("utf-8", "replace")
            for parser in logparse.FORMATS.values():
                parser(line)
        else:
            text = body.decode("utf-8", "replace")
            configs.parse_nginx(text, "fuzz.conf", "svc")
            configs.parse_gunicorn(text, "fuzz.py", "svc")
    except InputError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
