"""Bad input: one line naming the file and what was wrong, exit 2, and nothing of a rejected file stored; held
by hand-picked cases and by generated junk (hypothesis) over the trace importers and the log ingester."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payscope.collector.importers import ImportReport, read_trace_file
from payscope.collector.logingest import ingest
from payscope.collector.store import open_store
from payscope.errors import InputError
from tests.helpers import payscope

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=20)
KEYS = st.sampled_from(["traceID", "spanID", "traceId", "id", "parentId", "spans", "data", "startTime",
                        "timestamp", "duration", "tags", "processes", "processID", "references", "logs", "kind",
                        "localEndpoint", "name", "operationName", "resourceSpans"])
# junk shaped like the formats: their own keys, any values
SHAPED = st.recursive(JSON, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=6),
                      max_leaves=25)


def _read_all(path: Path) -> int:
    report = ImportReport(str(path))
    return sum(len(batch.spans) for batch in read_trace_file(path, report))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=SHAPED)
def test_junk_trace_documents_are_refused_or_read_never_crash(document: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "junk.json"
        path.write_text(json.dumps(document))
        try:
            _read_all(path)
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)  # one line


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
                      min_size=1, max_size=12))
def test_junk_log_files_are_refused_whole_or_ingested(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "junk.log"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        with open_store(str(Path(tmp) / "s.db")) as store:
            try:
                report = ingest(store, [str(path)])
            except InputError as exc:
                assert str(exc) and "\n" not in str(exc)
                assert store.counts()["logs"] == 0  # nothing of the rejected file
            else:
                assert store.counts()["logs"] == report.stored > 0


@pytest.mark.parametrize("setup, says", [
    (lambda d: (d / "bin.log").write_bytes(bytes(range(256)) * 10) and d / "bin.log", "binary data"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "an empty directory"),
    (lambda d: (d / "words.log").write_text("hello\nworld\n") and d / "words.log", "no line is in a known"),
    (lambda d: (d / "cut.log.gz").write_bytes(b"\x1f\x8b\x08\x00garbage") and d / "cut.log.gz", "corrupt"),
])
def test_bad_log_inputs_exit_2_with_one_line(setup: Any, says: str, tmp_path: Path) -> None:
    target = setup(tmp_path)
    good = tmp_path / "good.log"
    good.write_text("2026-11-25 10:00:00,100 INFO order ord-1 paid\n")
    store = tmp_path / "s.db"
    proc = payscope("ingest", "logs", str(good), str(target), "--store", str(store))
    assert proc.returncode == 2 and says in proc.stderr and target.name in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    if says != "no line is in a known":  # refused before any file was read: the good one is not stored either
        assert not store.exists() or payscope("logs", "--store", str(store), "--format", "json",
                                               check=True).stdout.count('"message"') == 0


# --- the OTLP decoders, every log format parser, the config parsers -------------------------------

def _otlp_json() -> Any:
    ids = st.text("0123456789abcdefABCDEFxyz", max_size=34)
    value = st.fixed_dictionaries({}, optional={
        "stringValue": st.text(max_size=20), "intValue": st.integers(-2**70, 2**70).map(str),
        "doubleValue": st.floats(allow_nan=True), "boolValue": st.booleans()})
    attribute = st.fixed_dictionaries({"key": st.text(max_size=12), "value": value})
    span = st.fixed_dictionaries({}, optional={
        "traceId": ids, "spanId": ids, "parentSpanId": ids, "name": st.text(max_size=20),
        "kind": st.integers(-3, 9), "startTimeUnixNano": st.integers(-5, 2**66).map(str),
        "endTimeUnixNano": st.integers(-5, 2**66).map(str), "attributes": st.lists(attribute, max_size=4),
        "status": st.fixed_dictionaries({}, optional={"code": st.integers(-1, 4), "message": st.text(max_size=9)})})
    return st.fixed_dictionaries({"resourceSpans": st.lists(st.fixed_dictionaries({
        "resource": st.fixed_dictionaries({"attributes": st.lists(attribute, max_size=3)}),
        "scopeSpans": st.lists(st.fixed_dictionaries({"spans": st.lists(span, max_size=4)}), max_size=2)}),
        max_size=2)}) | JSON


def _decoded_or_refused(decode: Any, *args: Any) -> None:
    try:
        decoded = decode(*args)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for span in decoded.spans:  # what is accepted fits the store's columns
        assert 0 <= span.row.start_ns <= span.row.end_ns < 2**63


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_otlp_json())
def test_otlp_json_decoder_reads_or_refuses_never_crashes(document: Any) -> None:
    from payscope.collector.otlp import decode_logs, decode_traces

    body = json.dumps(document).encode()
    _decoded_or_refused(decode_traces, body, "application/json")
    _decoded_or_refused(decode_logs, body, "application/json")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=300))
def test_otlp_protobuf_decoder_reads_or_refuses_never_crashes(body: bytes) -> None:
    from payscope.collector.otlp import decode_logs, decode_traces

    _decoded_or_refused(decode_traces, body, "application/x-protobuf")
    _decoded_or_refused(decode_logs, body, "application/x-protobuf")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(line=st.text(max_size=200) | JSON.map(json.dumps)
       | st.lists(st.sampled_from(["ts=", "level=", "msg=", '"', "=", "a", " ", "\\", "2026-11-25T10:00:00Z",
                                   "[", "]", "ERROR", "trace_id="]), max_size=40).map("".join))
def test_every_log_parser_takes_any_line(line: str) -> None:
    from payscope.collector import logparse

    for name, parser in logparse.FORMATS.items():
        fields = parser(line)
        assert fields is None or isinstance(fields, dict), name


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200) | st.lists(st.sampled_from(
    ["location", "/", "{", "}", ";", "proxy_read_timeout", "5s", "10", "timeout", "=", "upstream", " ", "\n",
     "#", "server", "'"]), max_size=40).map("".join))
def test_config_parsers_read_or_refuse_never_crash(text: str) -> None:
    from payscope.collector import configs

    for parse in (configs.parse_nginx, configs.parse_gunicorn):
        try:
            parse(text, "junk.conf", "svc")
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)
    try:
        document = json.loads(text)
    except ValueError:
        return
    try:
        configs.parse_envoy(document, "junk.json", "svc")
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
