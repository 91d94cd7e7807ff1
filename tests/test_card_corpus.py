"""No card number, CVV or cookie reaches the store or any command's output, however it is written or
wherever it sits; ordinary numbers come back unchanged.

A corpus of generated card numbers (Visa, Mastercard, Amex and Discover prefixes and lengths, Luhn-valid,
whole or grouped by a space, dash, %20 or +, as strings, integers and floats) goes into span names,
event names, attribute keys and values (in arrays too), URLs, exception messages and stack traces,
status messages, resource attributes, log bodies and log attributes. It is sent three ways: from a
plain OpenTelemetry SDK to `payscope collect`, through `payscope run` (the exact bytes that leave it are
checked), and through `payscope ingest logs`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf.internal.encoder import _VarintBytes  # type: ignore[attr-defined]
from hypothesis import given, settings
from hypothesis import strategies as st

from payscope.collector.store import open_store
from tests.cards import card_numbers, ordinary_numbers, spelled, written_forms
from tests.helpers import CapturingHandler, CollectorProcess, payscope

EMITTER = Path(__file__).parent / "services" / "card_emitter.py"
PANS_PER_SPAN = 12
SPANS = 200           # 2,400 card numbers
ORDINARY_PER_SPAN = 50  # 10,000 ordinary numbers
CVV_MARKERS = [b"CVV 417", b"cvc2=999", b"SECRETCOOKIE", b"\"417\""]


def _corpus(seed: int) -> tuple[dict[str, Any], list[str], list[list[int | str]]]:
    rng = random.Random(seed)
    pans = card_numbers(SPANS * PANS_PER_SPAN + 3, rng)
    ordinary = ordinary_numbers(SPANS * ORDINARY_PER_SPAN, rng)
    spans, kept = [], []
    for i in range(SPANS):
        p = pans[i * PANS_PER_SPAN:(i + 1) * PANS_PER_SPAN]
        numbers = ordinary[i * ORDINARY_PER_SPAN:(i + 1) * ORDINARY_PER_SPAN]
        kept.append(numbers)
        as_float = float(p[3]) if len(p[3]) <= 16 else int(p[3])
        attributes: dict[str, Any] = {
            "payment.card": spelled(p[1], rng), "payment.card_int": int(p[2]), "payment.card_float": as_float,
            "payment.cards": [int(p[4]), int(p[5])], f"seen.{p[6]}": "yes",
            "url.full": f"https://psp.test/pay?pan={p[7][:4]}%20{p[7][4:8]}%20{p[7][8:]}&order=ord-{i}",
            "card_cvv": "417", "cardCvv": 4171, "payment.note": "CVV 417, cvc2=999, Cookie: sid=SECRETCOOKIE; x=1",
            "dd.trace_id": str(rng.randrange(2**63, 2**64)), "order.id": f"ord-{i}",
            **{f"n.{j}": value for j, value in enumerate(numbers)}}
        spans.append({
            "name": f"charge {spelled(p[0], rng)}", "attributes": attributes,
            "event": f"tokenize {spelled(p[8], rng)}", "event_attributes": {"card": int(p[9])},
            "exception": f"card {spelled(p[10], rng)} declined", "status": f"declined: {p[11]}",
            "log": f"charging card {spelled(p[1], rng)} for ord-{i}, trace_id={attributes['dd.trace_id']}, "
                   f"amounts {' '.join(str(n) for n in numbers[:6])}",
            "log_attributes": {"payment.card_int": int(p[2]), "card_cvv": "417"}})
    resource = {"service.name": "cards", "host.name": spelled(pans[-1], rng), "deployment.card": int(pans[-2])}
    return {"spans": spans, "resource": resource}, pans, kept


def _leaks(blob: bytes, pans: list[str]) -> list[str]:
    """The card numbers (any spelling, or as a protobuf varint) and CVV markers found in ``blob``."""
    found = [pan for pan in pans if any(form in blob for form in written_forms(pan))
             or _VarintBytes(int(pan)) in blob]
    return found + [marker.decode() for marker in CVV_MARKERS if marker in blob]


def _store_bytes(store_path: Path) -> bytes:
    parts = [store_path.read_bytes()]
    for suffix in ("-wal", "-shm"):
        side = Path(f"{store_path}{suffix}")
        if side.exists():
            parts.append(side.read_bytes())
    return b"".join(parts)


def _outputs(store_path: Path, trace_ids: list[str]) -> bytes:
    """What the commands print about those traces and their logs, as a user would see it."""
    out = []
    for args in (["failures", "--limit", "0"], ["logs", "--format", "json", "--limit", "0"],
                 *(["show", tid] for tid in trace_ids[:1]),
                 *(["show", tid, "--format", "json"] for tid in trace_ids[1:2])):
        proc = payscope(*args, "--store", str(store_path), env={"COLUMNS": "400"})
        assert proc.returncode == 0, (args, proc.stderr)
        out.append(proc.stdout + proc.stderr)
    return "".join(out).encode()


def _check_ordinary(store_path: Path, kept: list[list[int | str]]) -> None:
    with open_store(str(store_path), readonly=True) as store:
        seen = 0
        for summary in store.traces(limit=None):
            for span in store.trace(summary.trace_id):
                if "order.id" not in span.attributes:
                    continue
                i = int(span.attributes["order.id"].removeprefix("ord-"))
                assert [span.attributes[f"n.{j}"] for j in range(ORDINARY_PER_SPAN)] == kept[i]
                assert span.attributes["dd.trace_id"].isdigit()  # a decimal trace id, kept
                assert span.attributes["cardCvv"] == span.attributes["card_cvv"] == "[REDACTED]"
                seen += 1
        assert seen == SPANS


def test_a_plain_sdk_sends_card_numbers_and_none_is_stored_or_shown(tmp_path: Path, collector: CollectorProcess,
                                                                     store_path: Path) -> None:
    corpus, pans, kept = _corpus(1)
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    done = subprocess.run([sys.executable, str(EMITTER), str(tmp_path / "corpus.json")], cwd=tmp_path,
                          env=dict(os.environ, EMIT_COLLECTOR=collector.http_url), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["spans"] == SPANS and store.counts()["logs"] == SPANS
        trace_ids = [t.trace_id for t in store.traces(limit=None)]
    assert _leaks(_store_bytes(store_path), pans) == []
    assert _leaks(_outputs(store_path, trace_ids), pans) == []
    _check_ordinary(store_path, kept)


def test_payscope_run_lets_no_card_number_leave_the_program(tmp_path: Path, capture: str) -> None:
    corpus, pans, _ = _corpus(2)
    (tmp_path / "corpus.json").write_text(json.dumps(corpus))
    resource = ",".join(f"{k}={v}" for k, v in corpus["resource"].items() if k != "service.name")
    done = subprocess.run([sys.executable, "-m", "payscope", "run", "--service", "cards", "--collector", capture,
                           "--", sys.executable, str(EMITTER), str(tmp_path / "corpus.json")],
                          cwd=tmp_path, env=dict(os.environ, OTEL_RESOURCE_ATTRIBUTES=resource),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "emitted 200" in done.stdout, done.stderr
    deadline = time.monotonic() + 20
    def sent_so_far() -> bytes:
        return b"".join(CapturingHandler.bodies)

    while time.monotonic() < deadline and (sent_so_far().count(b"charging card") < SPANS
                                           or sent_so_far().count(b"tokenize ") < SPANS):
        time.sleep(0.2)
    time.sleep(0.5)  # anything sent twice would arrive by now
    sent = sent_so_far()
    # all of it was sent, each log record once
    assert sent.count(b"charging card") == SPANS and sent.count(b"tokenize ") == SPANS
    assert _leaks(sent, pans) == [] and b"declined" in sent


def test_ingested_log_files_keep_no_card_number(tmp_path: Path, store_path: Path) -> None:
    rng = random.Random(3)
    pans = card_numbers(3000, rng)
    json_lines, text_lines = [], []
    for i in range(0, 2000, 4):
        json_lines.append(json.dumps({
            "time": f"2026-11-25T10:{i // 60 % 60:02d}:{i % 60:02d}Z", "level": "error",
            "message": f"charge {spelled(pans[i], rng)} failed", "host": spelled(pans[i + 1], rng),
            "card": int(pans[i + 2]), "card_float": float(pans[i + 3]) if len(pans[i + 3]) <= 16 else pans[i + 3],
            "card_cvv": "417", "note": "Cookie: sid=SECRETCOOKIE"}))
    for i in range(2000, 3000):
        text_lines.append(f"2026-11-25 10:00:{i % 60:02d},100 ERROR charging card {spelled(pans[i], rng)} "
                          f"CVV 417 for ord-{i}")
    (tmp_path / "gateway.jsonl").write_text("\n".join(json_lines) + "\n")
    (tmp_path / "payment.log").write_text("\n".join(text_lines) + "\n")
    proc = payscope("ingest", "logs", str(tmp_path / "gateway.jsonl"), str(tmp_path / "payment.log"),
                    "--store", str(store_path))
    assert proc.returncode == 0, proc.stderr
    with open_store(str(store_path), readonly=True) as store:
        assert store.counts()["logs"] == len(json_lines) + len(text_lines)
    assert _leaks(_store_bytes(store_path), pans) == []
    assert _leaks(_outputs(store_path, []), pans) == []


_PIECES = ["4111", "1111", " ", "-", "%20", "5500 0000 0000 0004", "cvv=", "CVC", "Authorization: Bearer x",
           "cookie=a", "\u00a0", "order 12", "ord-77", "Security code 123", "é", "0", "9", "\uff14\uff11\uff11\uff11",
           "\uff11", "\uff10", "\u0664\u0661\u0661\u0661", "4111\u00a01111"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=6)), max_size=14))
def test_the_request_scan_never_misses_what_masking_would_change(parts: list[str]) -> None:
    """The fast path skips per-string masking when the byte scan finds nothing: so whatever redact_text would
    change, the scan must find."""
    from payscope.instrumentation.redaction import may_need_redaction, redact_text

    text = "".join(parts)
    if redact_text(text) != text:
        assert may_need_redaction(text.encode())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([p.encode() for p in _PIECES]), st.binary(max_size=8),
                          st.sampled_from([b"\x00", b"\xc2", b"\xa0", b"b", b"D", b"\t", b"%", b"+", b"\xef\xbc",
                                           b"\x90", b"\x99", b"\x9a", b"7", b"c", b"cv", b"CvN", b"cSc", b"coOKIE",
                                           b"sEcurity", b"verificatioN", b"v"])), max_size=24))
def test_the_request_scan_finds_what_the_digit_pattern_alone_finds(parts: list[bytes]) -> None:
    """The scan looks for a run of 13 bytes of the pattern's class before it runs the pattern: it must answer
    as the pattern (and the no-break space, and the words) alone would, on any bytes."""
    import re

    from payscope.instrumentation.redaction import may_need_redaction

    raw = b"".join(parts)
    pattern = re.compile(rb"[0-9][0-9 \t+\-%bBdD]{11,}[0-9]|[0-9]\xc2\xa0[0-9]|\xef\xbc[\x90-\x99]")
    plain = pattern.search(raw) is not None or any(
        word in raw.lower() for word in (b"cvv", b"cvc", b"cvn", b"csc", b"security", b"verification",
                                         b"authorization", b"cookie"))
    assert may_need_redaction(raw) == plain


_CUT_PIECES = [*_PIECES, "4111111111111111", "trace_id=", "\"trace_id\": \"", "4111 1111 1111 1111", "%2b", "%2D",
               "+", "\t", "\n", "=", "\"", "1795000000000000000", "fee29476311624273bfd1d338d0038ec", "b", "d"]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_CUT_PIECES), st.text(alphabet="0123456789 -+%2bdBD\t\n=\"x", max_size=8),
                          st.text(max_size=4)), max_size=16), st.data())
def test_text_that_needs_no_masking_has_no_piece_that_does(parts: list[str], data: st.DataObject) -> None:
    """The log ingest skips masking the strings a parser cuts from lines the block scan passes: so no piece of
    such text, cut anywhere but between two digits, may be changed by redact_text, whatever stood before it
    (a decimal id kept after ``trace_id=`` is a card number once cut from it)."""
    from payscope.instrumentation.redaction import redact_text, text_may_need_redaction

    text = "".join(parts)
    cuts = [i for i in range(len(text) + 1)
            if not (0 < i < len(text) and text[i - 1].isdigit() and text[i].isdigit())]
    start = data.draw(st.sampled_from(cuts))
    end = data.draw(st.sampled_from([c for c in cuts if c >= start]))
    if not text_may_need_redaction(text):
        assert redact_text(text[start:end]) == text[start:end]
    if redact_text(text) != text:
        assert text_may_need_redaction(text)


def test_sparse_card_numbers_among_clean_log_lines_are_masked(tmp_path: Path) -> None:
    """Most lines of a log hold nothing to mask, and their strings skip masking block by block: a card
    number on one line of a block, in any field, still never reaches the store."""
    from payscope.analyzers.correlate import Linker
    from payscope.collector.logingest import ingest

    rng = random.Random(11)
    pans = card_numbers(8, rng)
    lines = [json.dumps({"time": f"2026-11-25T10:00:{i % 60:02d}.{i % 1000:03d}Z", "level": "info",
                         "msg": f"order ord-{i} received", "order_id": f"ord-{i}", "amount": i * 7})
             for i in range(1000)]
    lines[130] = lines[130][:-1] + f', "trace_id": "{spelled(pans[0], rng)}", "span": "{pans[1]}"}}'
    lines[300] = lines[300][:-1] + f', "note": "\\u00{ord(pans[2][0]):x}{pans[2][1:]}"}}'  # an escaped first digit
    lines[555] = lines[555][:-1] + ', "request_id": 4.2e15}'  # 4200000000000000: Visa's length, Luhn-valid
    lines[777] = lines[777][:-1] + f', "user": {{"card_number": "x", "ref": "{pans[4]}"}}, "host": "{pans[5]}"}}'
    (tmp_path / "orders.jsonl").write_text("\n".join(lines) + "\n")
    text = [f"2026-11-25 10:00:{i % 60:02d},100 INFO step {i} done" for i in range(600)]
    text[400] = "2026-11-25 10:00:40,100 ERROR charge failed"
    text.insert(401, f"  request_id={'-'.join(pans[6][j:j + 4] for j in range(0, 16, 4))}")
    (tmp_path / "payment.log").write_text("\n".join(text) + "\n")
    store_path = tmp_path / "logs.db"
    with open_store(str(store_path)) as store:
        report = ingest(store, [str(tmp_path / "orders.jsonl"), str(tmp_path / "payment.log")],
                        linker=Linker(store))
        assert report.to_json()["unparsed"] == 0
        stored = {r.message: r for _, r in store.search_logs(_all_logs())}
    assert len(stored) == 1000 + 600
    assert stored["order ord-42 received"].attributes == {"order_id": "ord-42", "amount": 294}
    assert _leaks(_store_bytes(store_path), [*pans[:3], *pans[4:], "4200000000000000"]) == []
    assert stored["order ord-777 received"].attributes["user"]["card_number"] == "[REDACTED]"


def _all_logs() -> Any:
    from payscope.collector.store.api import LogQuery

    return LogQuery(limit=None)
