"""Log parsing, ingestion and linking: real formats, broken files, and precision without trace ids."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from payscope.analyzers.correlate import Linker
from payscope.collector import logparse
from payscope.collector.logingest import ingest
from payscope.collector.store import LogQuery, open_store
from payscope.model import LogRecord, Span
from tests.helpers import DATA, payscope, payscope_json

REAL_LINES = (DATA / "logs" / "formats.txt").read_text().splitlines()


@pytest.mark.parametrize("index, fmt, checks", [
    (0, "nginx-error", {"event": "upstream_timeout", "callee": "127.0.0.1", "path": "/orders/ord-77",
                        "timeout_phase": "reading response header from upstream"}),
    (1, "envoy", {"event": "upstream_timeout", "flags": "UT", "request_id": "7d15bcc7-0a1b-4c2d-8e9f-aabbccddeeff",
                  "callee": "reviews"}),
    (2, "gunicorn", {"event": "worker_timeout", "pid": 1}),
])
def test_proxy_and_server_timeout_lines(index: int, fmt: str, checks: dict[str, object]) -> None:
    line = REAL_LINES[index]
    assert logparse.detect([line]) == fmt
    fields = logparse.FORMATS[fmt](line)
    assert fields is not None
    for key, value in checks.items():
        assert fields["attributes"][key] == value


def test_ids_inside_messages() -> None:
    hotrod = logparse.FORMATS["text"](REAL_LINES[3])
    assert hotrod is not None and hotrod["level"] == "ERROR"
    assert logparse.find_ids(hotrod["message"])[:2] == ("738d1c34020ba19e", "69e77f208cb24e9b")
    java = logparse.FORMATS["java"](REAL_LINES[4])
    assert java is not None and java["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    from payscope.semconv import normalise_trace_id

    assert normalise_trace_id("738d1c34020ba19e") == "0000000000000000738d1c34020ba19e"
    assert normalise_trace_id("4BF92F35-77B3-4DA6-A3CE-929D0E0E4736") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert normalise_trace_id("0" * 32) is None


def test_json_lines_nested_as_ecs_writes_them_and_names_taken_in_their_order() -> None:
    ecs = logparse.parse_json(json.dumps({
        "@timestamp": "2026-11-19T10:00:00.250Z", "log": {"level": "warn"}, "message": "charge declined",
        "trace": {"id": "4bf92f3577b34da6a3ce929d0e0e4736"}, "span": {"id": "00f067aa0ba902b7"},
        "service": {"name": "payment"}}))
    assert ecs is not None
    assert (ecs["level"], ecs["trace_id"], ecs["span_id"]) == ("WARN", "4bf92f3577b34da6a3ce929d0e0e4736",
                                                              "00f067aa0ba902b7")
    # an earlier name in the list wins, nested or not: trace.id comes before traceid
    both = logparse.parse_json(json.dumps({"time": "2026-11-19T10:00:00Z", "msg": "x", "traceid": "a" * 32,
                                           "trace": {"id": "b" * 32}}))
    assert both is not None and both["trace_id"] == "b" * 32
    # a name that only looks nested (a top-level key with a dot) is read as it is, and what was read is no attribute
    dotted = logparse.parse_json(json.dumps({"time": "2026-11-19T10:00:00Z", "msg": "x", "trace.id": "c" * 32,
                                             "order_id": "ord-7"}))
    assert dotted is not None and dotted["trace_id"] == "c" * 32
    assert dotted["attributes"] == {"order_id": "ord-7"}
    # a nested name whose first part is no object is passed over for the names after it
    flat = logparse.parse_json(json.dumps({"time": "2026-11-19T10:00:00Z", "msg": "x", "trace": "not an object"}))
    assert flat is not None and flat["trace_id"] == "not an object"

def test_custom_nginx_log_format() -> None:
    fmt = '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent rt=$request_time ' \
          'urt=$upstream_response_time rid=$request_id us=$upstream_status'
    parse = logparse.nginx_log_format(fmt)
    fields = parse('127.0.0.1 - - [25/Nov/2026:10:00:00 +0000] "POST /orders/ord-1 HTTP/1.1" 504 167 rt=0.301 '
                   'urt=0.300 rid=abc123def456 us=504')
    assert fields is not None
    a = fields["attributes"]
    assert (a["method"], a["path"], a["upstream_response_time"], a["request_id"], a["event"]) == \
        ("POST", "/orders/ord-1", "0.300", "abc123def456", "upstream_timeout")


@pytest.mark.parametrize("text", [
    "charge failed trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7 request_id=req-123456",
    "traceparent 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 X-Request-Id: abcdef12",
    "TraceID: 4bf92f3577b34da6a3ce929d0e0e4736 SpanId=00f067aa0ba902b7", "dd.trace_id=1234567890abcdef",
    "charging order ord-7 amount 12", "ſpan_id=00f067aa0ba902b7 (a long s)", "\u212aelvin trace_id=1234567890abcdef",
    "caf\u00e9 requeſt_id=abcdef99", ""])
def test_ids_in_a_line_are_found_as_the_patterns_alone_find_them(text: str) -> None:
    parent = logparse._TRACEPARENT.search(text)
    req = logparse._REQUEST_ID.search(text)
    if parent:
        expected = (parent.group(1), parent.group(2), req.group(1) if req else None)
    else:
        trace, span = logparse._HEX_ID.search(text), logparse._SPAN_ID.search(text)
        expected = (trace.group(1) if trace else None, span.group(1) if span else None, req.group(1) if req else None)
    assert logparse.find_ids(text) == expected


@pytest.mark.parametrize("text", [
    "19/Nov/2026:10:00:00 +0000", "01/Jan/2025:23:59:59 -0730", "29/Feb/2024:00:00:00 +0100",
    "19/nov/2026:10:00:00 +0530", "19/Nov/2026:10:00:00", "31/Feb/2024:00:00:00 +0000", "19/Foo/2026:10:00:00 +0000",
    "19/Nov/2026:25:00:00 +0000", "19/Nov/2026:10:00:00 +9900", "19/Nov/2026:10:00:00 -2359"])
def test_access_log_times_are_read_as_strptime_reads_them(text: str) -> None:
    from datetime import datetime, timedelta, timezone

    from payscope.collector.logparse import parse_time

    local = timezone(timedelta(hours=2))
    expected = None
    for fmt in ("%d/%b/%Y:%H:%M:%S %z", "%d/%b/%Y:%H:%M:%S"):
        try:
            expected = datetime.strptime(text, fmt)
            break
        except ValueError:
            continue
    if expected is not None and expected.tzinfo is None:
        expected = expected.replace(tzinfo=local)
    got = parse_time(f"[{text}]", local)
    assert got == expected and (got is None or got.utcoffset() == expected.utcoffset())


def test_multiline_records_and_timezones(tmp_path: Path, store_path: Path) -> None:
    log = tmp_path / "pay.log"
    log.write_text("2026-11-25 10:00:00,100 ERROR charge failed\n"
                   "Traceback (most recent call last):\n"
                   '  File "pay.py", line 3, in charge\n'
                   "requests.exceptions.ReadTimeout: HTTPConnectionPool(host='psp', port=80): Read timed out.\n"
                   "2026-11-25 10:00:01,000 INFO next\n")
    with open_store(str(store_path)) as store:
        report = ingest(store, [str(log)], tz=logparse.parse_tz("+02:00"), clock_offset_ns=150_000_000)
        records = [r for _, r in store.search_logs(LogQuery(limit=None))]
    assert report.to_json()["records"] == 2 and report.to_json()["unparsed"] == 0
    assert "ReadTimeout" in records[0].message and records[0].message.count("\n") == 3
    # 10:00:00.100 at +02:00 is 08:00:00.100 UTC; the host's clock ran 150 ms ahead
    from datetime import datetime, timezone

    utc = datetime(2026, 11, 25, 8, 0, 0, 100_000, tzinfo=timezone.utc)
    assert records[0].time_ns == int(utc.timestamp() * 1e9) - 150_000_000
    assert records[0].source == "pay.log:1"


def test_broken_files_keep_the_rest_and_name_bad_lines(tmp_path: Path, store_path: Path) -> None:
    good = [json.dumps({"time": f"2026-11-25T10:00:0{i}Z", "level": "info", "msg": f"line {i}"}) for i in range(5)]
    mixed = tmp_path / "mixed.log"
    mixed.write_bytes("\n".join(good[:2]).encode() + b"\n\x00\xff\xfe garbage \x01\n" + b"{broken json\n"
                      + json.dumps({"time": "2026-11-25T10:00:09Z", "msg": "caf\xe9"}).encode("latin-1") + b"\n"
                      + "\n".join(good[2:]).encode() + b"\n")
    cut = tmp_path / "cut.log.gz"
    cut.write_bytes(gzip.compress(("\n".join(good * 200) + "\n").encode())[:-40])
    refused = payscope("ingest", "logs", str(mixed), str(cut), "--store", str(store_path), "--format", "json")
    assert refused.returncode == 2 and "cut.log.gz: corrupt or truncated gzip" in refused.stderr
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["logs"] == 0  # refused before either file was read
    proc = payscope("ingest", "logs", str(mixed), "--store", str(store_path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    files = {Path(f["source"]).name: f for f in doc["files"]}
    assert files["mixed.log"]["records"] == 6
    assert any("mixed.log:3" in p for p in files["mixed.log"]["problems"])
    assert any("mixed.log:4" in p for p in files["mixed.log"]["problems"])
    with open_store(str(store_path), readonly=True) as store:
        assert any("café" in r.message for _, r in store.search_logs(LogQuery(text="caf", limit=None)))


def test_card_numbers_never_stored_from_logs(tmp_path: Path, store_path: Path) -> None:
    log = tmp_path / "pay.log"
    log.write_text("2026-11-25 10:00:00,100 INFO charging card 4111 1111 1111 1111 cvv=123 "
                   "Authorization: Bearer abc.def\n")
    payscope("ingest", "logs", str(log), "--store", str(store_path), check=True)
    raw = store_path.read_bytes() + (store_path.with_name(store_path.name + "-wal").read_bytes()
                                     if store_path.with_name(store_path.name + "-wal").exists() else b"")
    assert b"4111 1111" not in raw and b"cvv=123" not in raw and b"abc.def" not in raw
    stored = payscope_json("logs", "--store", str(store_path))["records"]
    assert len(stored) == 1 and stored[0]["message"].startswith("charging card")  # the line itself was kept
    assert "1111" not in stored[0]["message"] and "abc.def" not in stored[0]["message"]


# --- linking without trace ids --------------------------------------------------------------

def _span(trace: str, sid: str, parent: str | None, service: str, kind: str, start_ms: float, end_ms: float,
          **attrs: object) -> Span:
    return Span(trace, sid, parent, service, "POST /orders/{order_id}", kind, int(start_ms * 1e6),
                int(end_ms * 1e6), 1, "", dict(attrs), [], {"service.name": service})


def _world(store_path: Path, n: int = 200, seed: int = 9) -> list[dict[str, object]]:
    """n orders through order-svc, two at a time, overlapping; each with a request id and an order id."""
    rng = random.Random(seed)
    truth = []
    spans = []
    t = 1_800_000_000_000.0
    for i in range(n):
        trace = format(rng.getrandbits(128), "032x")
        order_id = f"ord-{5000 + i}"
        rid = format(rng.getrandbits(64), "016x")
        start = t + (i // 2) * 400 + (i % 2) * 60  # pairs overlap in time on the same route
        end = start + rng.uniform(100, 300)
        spans.append(_span(trace, format(i + 1, "016x"), None, "order-svc", "server", start, end,
                           **{"http.request.method": "POST", "http.route": "/orders/{order_id}",
                              "url.path": f"/orders/{order_id}", "http.response.status_code": 200,
                              "http.request.header.x-request-id": [rid]}))
        truth.append({"trace": trace, "order": order_id, "rid": rid, "start": start, "end": end})
    with open_store(str(store_path)) as store:
        store.write(spans)
    return truth


def _lines(truth: list[dict[str, object]], kind: str) -> list[LogRecord]:
    out = []
    for item in truth:
        at = int((float(item["start"]) + 20) * 1e6)  # type: ignore[arg-type]
        if kind == "request_id":
            out.append(LogRecord(time_ns=at, service="order-svc", message="order received",
                                 attributes={"request_id": item["rid"]}, source=f"{item['trace']}"))
        elif kind == "order_id":
            out.append(LogRecord(time_ns=at, service="order-svc", message=f"charging order {item['order']}",
                                 source=f"{item['trace']}"))
        else:
            out.append(LogRecord(time_ns=at, service="order-svc", message="pool refreshed", source=f"{item['trace']}"))
    return out


@pytest.mark.parametrize("kind, method", [("request_id", "request_id"), ("order_id", "business_key")])
def test_linking_by_request_id_or_order_id_is_exact(store_path: Path, kind: str, method: str) -> None:
    truth = _world(store_path)
    with open_store(str(store_path)) as store:
        linker = Linker(store)
        linked = [linker.link(r) for r in _lines(truth, kind)]
    assert all(r.link_method == method for r in linked)
    assert all(r.trace_id == r.source for r in linked)  # the source field carries the truth here


def test_time_window_links_only_when_one_transaction_fits(store_path: Path) -> None:
    truth = _world(store_path)
    # "order received" is request-scoped: half of its lines (every other pair) carry the request id.
    # "pool refreshed" never does.
    with_id = [r for i, r in enumerate(_lines(truth, "request_id")) if i % 4 >= 2]
    without_id = [LogRecord(time_ns=r.time_ns, service=r.service, message=r.message, source=r.source)
                  for i, r in enumerate(_lines(truth, "request_id")) if i % 4 < 2]
    background = _lines(truth, "neither")
    with open_store(str(store_path)) as store:
        linker = Linker(store)
        linked = linker.link_batch(without_id + background + with_id)  # the id-less lines come first
        linked += linker.finish()
    assert all(r.link_method == "none" and r.trace_id is None for r in linked if r.message == "pool refreshed")
    plain = [r for r in linked if r.message == "order received" and "request_id" not in r.attributes]
    assert len(plain) == len(without_id)
    attached = [r for r in plain if r.link_method == "time_window"]
    assert not [r for r in attached if r.trace_id != r.source]  # overlapping transactions: ambiguous, never guessed
    assert len(attached) >= 0.4 * len(plain)  # the first of each overlapping pair is alone in its window
    assert {r.link_method for r in plain} <= {"time_window", "ambiguous"}
    assert sum(r.link_method == "ambiguous" for r in plain) > 0
    for r in plain:
        if r.link_method == "ambiguous":
            assert r.source in r.attributes["link.candidates"] and r.trace_id is None


def _busy_service(store_path: Path | str, seconds: float = 30.0, rate: float = 20.0,
                  seed: int = 4) -> tuple[str, dict[int, str | None]]:
    """A payment service at ``rate`` requests/s, several in flight at once, and its logfmt file: request lines
    that carry the trace id on some lines and not on others, and background lines that never do.

    Returns the file's text and, for each line number without an id, the trace it belongs to (None for a
    background line)."""
    rng = random.Random(seed)
    spans, lines = [], []
    t0 = 1_800_000_000_000.0
    t = t0
    while t < t0 + seconds * 1000:
        trace = format(rng.getrandbits(128), "032x")
        end = t + rng.uniform(80, 400)
        spans.append(_span(trace, format(rng.getrandbits(64), "016x"), None, "payment", "server", t, end))

        def say(at: float, message: str, trace: str = trace) -> None:
            lines.append((at, message, trace, rng.random() < 0.3))  # 30% of lines carry their trace id

        say(t + rng.uniform(0.1, 1.5), "charge started")
        say(t + (end - t) * rng.uniform(0.3, 0.6), f"calling bank for {rng.randint(100, 90000) / 100} EUR")
        if rng.random() < 0.3:
            say(end - rng.uniform(0.1, 1.5), "charge declined: bank timeout")
        t += rng.expovariate(rate / 1000)
    for kind, every in (("cache warm: {} keys", 300), ("pool resized to {} connections", 2000),
                        ("scheduler tick", 1000)):
        at = t0 + rng.uniform(0, every)
        while at < t:
            lines.append((at, kind.format(rng.randint(1, 64)), None, False))
            at += every * rng.uniform(0.8, 1.2)
    lines.sort()
    text, truth = [], {}
    for n, (at, message, trace, carries) in enumerate(lines, start=1):
        ids = f" trace_id={trace}" if carries and trace else ""
        text.append(f'ts={_iso(at)} level=info msg="{message}"{ids}\n')
        if not ids:
            truth[n] = trace
    with open_store(str(store_path)) as store:
        store.write(spans)
    return "".join(text), truth


def test_background_lines_stay_unlinked_and_request_lines_link_by_template_and_position(
        tmp_path: Path, store_path: Path) -> None:
    text, truth = _busy_service(store_path)
    log = tmp_path / "payment.log"
    log.write_text(text)
    payscope("ingest", "logs", str(log), "--store", str(store_path), check=True)
    with open_store(str(store_path), readonly=True) as store:
        records = {int(r.source.rsplit(":", 1)[1]): r for _, r in store.search_logs(LogQuery(limit=None))}
    background = [n for n, trace in truth.items() if trace is None]
    scoped = [n for n, trace in truth.items() if trace is not None]
    assert len(background) > 100 and len(scoped) > 500
    assert all(records[n].link_method == "none" for n in background)
    by_time = [n for n in scoped if records[n].link_method == "time_window"]
    right = [n for n in by_time if records[n].trace_id == truth[n]]
    assert len(right) >= 0.9 * len(by_time)
    positioned = [n for n in by_time if records[n].attributes.get("link.position")]
    assert positioned and {records[n].attributes["link.position"] for n in positioned} == {"start", "end"}
    assert len(by_time) >= 0.3 * len(scoped)  # at 20 requests/s, position picks the span that time alone cannot


def test_logs_cli_json_contract(tmp_path: Path, store_path: Path) -> None:
    truth = _world(store_path, n=4)
    log = tmp_path / "order-svc.log"
    log.write_text("".join(f'{{"time": "{_iso(float(t["start"]) + 20)}", "level": "error", '  # type: ignore[arg-type]
                           f'"msg": "payment for order {t["order"]} timed out"}}\n' for t in truth))
    payscope("ingest", "logs", str(log), "--store", str(store_path), check=True)
    doc = payscope_json("logs", "--store", str(store_path), "--order", str(truth[2]["order"]))
    assert len(doc["records"]) == 1
    rec = doc["records"][0]
    assert set(rec) >= {"time", "service", "level", "message", "source", "trace_id", "link"}
    assert rec["service"] == "order-svc" and rec["level"] == "ERROR" and rec["source"] == "order-svc.log:3"
    assert rec["trace_id"] == truth[2]["trace"] and rec["link"] == {"method": "business_key", "confidence": 0.9}
    assert len(payscope_json("logs", "--store", str(store_path), "--limit", "0")["records"]) == 4
    none = payscope("logs", "--store", str(store_path), "--grep", "no line says this", check=True)
    assert none.stdout == "" and "no log line in" in none.stderr and "matches" in none.stderr


def _iso(ms: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def test_a_line_sent_over_otlp_and_written_to_a_file_is_stored_once_with_both_sources(
        tmp_path: Path, store_path: Path) -> None:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from payscope.collector.otlp import logs_from_request

    trace_id = "fe092590d1c445df067702a6854b4f4d"
    request = ExportLogsServiceRequest()
    rl = request.resource_logs.add()
    kv = rl.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "bank"
    for i, (body, ns) in enumerate([("charged order ord-1 as ch_1", 1_796_128_181_344_996_352),
                                     ("charged order ord-2 as ch_2", 1_796_128_181_486_988_032)]):
        rec = rl.scope_logs.add().log_records.add()
        rec.time_unix_nano, rec.severity_text = ns, "INFO"
        rec.body.string_value = body
        rec.trace_id, rec.span_id = bytes.fromhex(trace_id), bytes([i + 1]) * 8
    with open_store(str(store_path)) as store:
        store.write(logs=logs_from_request(request).logs)
    log = tmp_path / "bank.log"
    log.write_text(  # the file's times are the same to the millisecond; one line was never sent
        f"2026-12-01 12:29:41,344 INFO [bank] charged order ord-1 as ch_1 trace_id={trace_id} span_id={'01' * 8}\n"
        f"2026-12-01 12:29:41,486 INFO [bank] charged order ord-2 as ch_2 trace_id={trace_id} span_id={'01' * 8}\n"
        f"2026-12-01 12:29:41,487 INFO [bank] reconciled ord-2 trace_id={trace_id}\n")
    proc = payscope("ingest", "logs", str(log), "--service", "bank", "--store", str(store_path), "--tz", "UTC",
                    "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["joined"] == 1  # ord-2's line names another span: not the same record
    with open_store(str(store_path), readonly=True) as store:
        records = sorted(store.search_logs(LogQuery(limit=None)), key=lambda x: x[1].time_ns)
    sources = [r.source for _, r in records]
    assert len(records) == 4 and sources[0] == "otlp + bank.log:1"
    assert sources.count("bank.log:2") == 1 and "bank.log:3" in sources
    again = payscope("ingest", "logs", str(log), "--service", "bank", "--store", str(store_path), "--tz", "UTC")
    assert again.returncode == 0, again.stderr
    with open_store(str(store_path), readonly=True) as store:  # read twice, stored once, each source once
        assert sorted(r.source for _, r in store.search_logs(LogQuery(limit=None))) == sorted(sources)


def _mixed_log(path: Path) -> Path:
    """4,000-odd records of Python logging with tracebacks, unreadable lines followed by continuation lines,
    impossible timestamps, card numbers and blank lines."""
    rng = random.Random(7)
    lines = []
    for i in range(4000):
        stamp = f"2026-11-25 10:{(i // 60) % 60:02d}:{i % 60:02d},{i % 1000:03d}"
        roll = rng.random()
        if roll < 0.1:  # a traceback after its line: it must stay with it, wherever the chunks are cut
            lines += [f"{stamp} ERROR charge ord-{i} failed", "Traceback (most recent call last):",
                      '  File "pay.py", line 3, in charge', "requests.exceptions.ReadTimeout: Read timed out."]
        elif roll < 0.13:  # a line no parser reads, then one that continues the record before it
            lines += ["%%% not a log line %%%", "    at com.shop.Pay.charge(Pay.java:42)"]
        elif roll < 0.15:
            lines.append(f"2026-13-45 99:99:99,000 INFO order ord-{i} at an impossible time")
        elif roll < 0.17:
            lines.append(f"{stamp} INFO paid with card 4111 1111 1111 1111 for order ord-{i}")
        else:
            lines.append(f"{stamp} INFO charging order ord-{i} amount {rng.randint(1, 999)}")
        if rng.random() < 0.05:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _ingested(path: Path, store_path: Path, workers: int) -> tuple[object, list[tuple[object, ...]]]:
    with open_store(str(store_path)) as store:
        report = ingest(store, [str(path)], workers=workers).to_json()
        records = [(r.time_ns, r.source, r.message, r.severity, r.attributes)
                   for _, r in store.search_logs(LogQuery(limit=None))]
    return report, sorted(records)


def test_long_files_parsed_by_worker_processes_give_what_parsing_here_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from payscope.collector import logingest

    log = _mixed_log(tmp_path / "payment.log")
    results = {}
    for workers in (0, 2):
        # read whole here; in dozens of chunks there, cut next to every kind of line
        monkeypatch.setattr(logingest, "CHUNK_LINES", 97 if workers else 10**9)
        results[workers] = _ingested(log, tmp_path / f"w{workers}.db", workers)
    assert results[2] == results[0]
    report, records = results[2]
    assert report["records"] == len(records) > 3000 and report["unparsed"] > 100
    assert sum(1 for r in records if "Traceback" in r[2] and r[2].count("\n") == 3) > 300
    assert not any("4111" in r[2] for r in records)


def test_a_parsing_process_killed_mid_file_loses_no_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal
    import threading
    import time

    from payscope.collector import logingest

    log = _mixed_log(tmp_path / "payment.log")
    expected = _ingested(log, tmp_path / "here.db", 0)
    monkeypatch.setattr(logingest, "CHUNK_LINES", 97)
    killed: list[int] = []

    def kill_the_first_worker() -> None:
        deadline = time.monotonic() + 20
        while not killed and time.monotonic() < deadline:
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == \
                            str(os.getpid()) and b"spawn_main" in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
                        killed.append(int(entry.name))
                        break
                except (OSError, IndexError):
                    continue
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_first_worker)
    killer.start()
    got = _ingested(log, tmp_path / "killed.db", 2)
    killer.join()
    assert killed, "no parsing process was seen to kill"
    assert got == expected


def _linked_by(store_url: str, log: Path, workers: int) -> tuple[dict[str, int], int, list[tuple[object, ...]]]:
    """`ingest logs` of the payment service's ``log`` with ``workers``: how its lines were linked, how many were
    stored, and each stored line's number, trace, link and attributes (in line number order as text)."""
    with open_store(store_url) as store:
        report = ingest(store, [str(log)], service="payment", linker=Linker(store), workers=workers).to_json()
        records = sorted((r.source.rsplit(":", 1)[1], r.trace_id, r.link_method, r.link_confidence, r.attributes)
                         for _, r in store.search_logs(LogQuery(limit=None)))
    return report["linked"], report["stored"], records


def test_lines_linked_and_stored_by_worker_processes_are_linked_as_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers link by ids and store their chunks; the lines without ids wait for one time window here, with what
    every id-linked line taught, so that the links do not depend on how the file was cut."""
    from payscope.analyzers import correlate
    from payscope.collector import logingest

    # nothing learned from the store's lines: what the lines linked by their ids teach comes from the workers
    monkeypatch.setattr(correlate.Linker, "_learn_stored", lambda self, service, times: None)
    results = {}
    for workers in (0, 2):
        store_path = tmp_path / f"w{workers}.db"
        text, truth = _busy_service(store_path, seconds=20.0, seed=7)
        log = tmp_path / f"payment-{workers}.log"
        log.write_text(text)
        monkeypatch.setattr(logingest, "CHUNK_LINES", 61 if workers else 10**9)
        results[workers] = _linked_by(str(store_path), log, workers)
    assert results[2] == results[0]
    linked, stored, records = results[2]
    assert stored == len(records) > 1000
    assert linked["trace_id"] > 200 and linked["time_window"] > 100 and linked["none"] > 50
    assert any(r[4].get("link.position") for r in records)  # taught by id-linked lines of other chunks


def test_spans_around_a_line_are_those_the_store_gives_for_that_line(tmp_path: Path) -> None:
    """The time window reads a service's server spans around a second of its lines at once and keeps, for each
    line, exactly the spans the store gives for that line alone: lines in time order, out of order, far apart,
    and spans long, short, and of other services and kinds."""
    from payscope.analyzers import correlate

    rng = random.Random(11)
    spans = []
    t0 = 1_800_000_000_000.0
    for n in range(1_500):
        start = t0 + rng.uniform(0, 60_000)
        length = rng.choice([rng.uniform(1, 400), rng.uniform(1_000, 20_000), rng.uniform(100_000, 130_000)])
        spans.append(_span(f"{n:032x}", f"{n:016x}", None, rng.choice(["payment", "payment", "bank"]),
                           rng.choice(["server", "server", "consumer", "client"]), start, start + length))
    store_path = tmp_path / "s.db"
    with open_store(str(store_path)) as store:
        store.write(spans)
        linker = Linker(store)
        times = sorted(int((t0 + rng.uniform(-2_000, 62_000)) * 1e6) for _ in range(400))
        times += [int((t0 + rng.uniform(-200_000, 200_000)) * 1e6) for _ in range(100)]  # out of order, far
        for service in ("payment", "bank", "gateway"):
            for time_ns in times:
                alone = store.server_spans_around(service, time_ns, correlate.WINDOW_SLACK_NS,
                                                  correlate.LONGEST_SPAN_NS)
                got = linker._spans_around(service, time_ns)
                assert [s.span_id for s in got] == [s.span_id for s in alone], (service, time_ns)
        assert sum(bool(linker._spans_around("payment", t)) for t in times) > 300
