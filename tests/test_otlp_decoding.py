"""A protobuf traces request is decoded one of two ways: with its spans' attributes left encoded (the fast way,
for a request whose bytes hold nothing to mask), or as the OTLP message. Both must give the same spans, the same
rejections and the same refusals, on any request: generated here with hypothesis, among them secrets' keys,
numbers as long as card numbers, events, links, bad ids, and bytes damaged after encoding."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from payscope.collector.otlp import _LiteRequest, _parse_traces, decode_traces, spans_from_request
from payscope.collector.store.codec import _put_any, decode_span
from payscope.errors import InputError

PROTOBUF = "application/x-protobuf"
KEYS = st.sampled_from([
    "http.route", "http.response.status_code", "http.request.method", "url.path", "url.full", "server.address",
    "peer.service", "order_id", "x-request-id", "Idempotency-Key", "payscope.timeout.read_ms", "error.type",
    "authorization", "http.request.header.authorization", "password", "note", "user_agent.original",
    "payscope.amount", "rpc.service", "rpc.method", "app.payment.ID"])
SCALAR = (st.text(alphabet="abc/-_ 0123456789{}", max_size=14) | st.integers(-2**63, 2**63 - 1)
          | st.sampled_from([0, 200, 503, 10**12 - 1, 10**12, 4111111111111111, -4111111111111111])
          | st.floats(allow_nan=False) | st.booleans() | st.binary(max_size=4))
VALUE = SCALAR | st.lists(SCALAR, max_size=3) | st.dictionaries(st.sampled_from(["a", "card", "n"]), SCALAR,
                                                                  max_size=2)


def _put(target: Any, value: Any) -> None:
    """An attribute's value as the store's own encoder writes it, and bytes as bytes."""
    if isinstance(value, bytes):
        target.bytes_value = value
    else:
        _put_any(target, value)


SPAN = st.fixed_dictionaries({
    "trace_id": st.sampled_from([bytes(range(1, 17)), b"\x07" * 16, bytes(16), b"\x01" * 8]),
    "span_id": st.binary(min_size=8, max_size=8) | st.sampled_from([bytes(8), b"\x02" * 4]),
    "parent": st.sampled_from([b"", b"\x03" * 8, b"\x04" * 3]),
    "kind": st.integers(0, 7), "name": st.sampled_from(["POST /pay", "GET", "charge"]),
    "start": st.integers(0, 2**62), "length": st.integers(-5, 10**9),
    "status": st.integers(0, 2), "message": st.sampled_from(["", "ReadTimeout", "declined"]),
    "attributes": st.lists(st.tuples(KEYS, VALUE), max_size=6),
    "events": st.integers(0, 1), "links": st.integers(0, 1)})


def _request(spans: list[dict[str, Any]], services: list[str]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for n, service in enumerate(services):
        resource_spans = req.resource_spans.add()
        kv = resource_spans.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", service
        scope = resource_spans.scope_spans.add()
        scope.scope.name = "test"
        for s in spans[n::len(services)]:
            span = scope.spans.add(trace_id=s["trace_id"], span_id=s["span_id"], parent_span_id=s["parent"],
                                   kind=s["kind"], name=s["name"], start_time_unix_nano=s["start"],
                                   end_time_unix_nano=max(0, s["start"] + s["length"]))
            span.status.code, span.status.message = s["status"], s["message"]
            for key, value in s["attributes"]:
                kv = span.attributes.add()
                kv.key = key
                _put(kv.value, value)
            for _ in range(s["events"]):
                span.events.add(name="exception", time_unix_nano=s["start"])
            for _ in range(s["links"]):
                span.links.add(trace_id=b"\x09" * 16, span_id=b"\x08" * 8)
    return req


def _as_message(raw: bytes) -> Any:
    """The decoding of a request as the OTLP message, or the refusal's message."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(raw)
    except Exception:
        return "refused"
    return _summary(spans_from_request(request, raw))


def _fast(raw: bytes) -> Any:
    try:
        return _summary(decode_traces(raw, PROTOBUF))
    except InputError as exc:
        assert "\n" not in str(exc)
        return "refused"


def _summary(decoded: Any) -> Any:
    return ([(e.row, e.body, e.resource) for e in decoded.spans], decoded.rejected, decoded.reasons)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spans=st.lists(SPAN, min_size=1, max_size=5), services=st.sampled_from([["pay"], ["pay", "bank"]]),
       damage=st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 255)))
def test_both_ways_of_decoding_give_the_same_answer(spans: list[dict[str, Any]], services: list[str],
                                                     damage: tuple[int, int] | None) -> None:
    raw = _request(spans, services).SerializeToString()
    if damage is not None:  # one byte changed after encoding: a truncated length, a bad tag, broken UTF-8
        at, byte = damage
        raw = raw[:at % len(raw)] + bytes([byte]) + raw[at % len(raw) + 1:]
    assert _fast(raw) == _as_message(raw)


def test_the_fast_way_is_the_one_taken_for_a_clean_request_and_reads_repeated_attributes_once() -> None:
    """A request with nothing to mask is read with its attributes encoded, and a span whose attributes another
    span already carried gets them from what was read then, with the same answer."""
    spans = [{"trace_id": bytes(range(1, 17)), "span_id": bytes([i + 1]) * 8, "parent": b"", "kind": 2,
              "name": "POST /pay", "start": 10, "length": 5, "status": 0, "message": "",
              "attributes": [("http.route", "/orders/{order_id}"), ("url.path", f"/orders/o-{i}"),
                             ("http.response.status_code", 200)], "events": 0, "links": 0} for i in range(3)]
    raw = _request(spans, ["pay"]).SerializeToString()
    request, _ = _parse_traces(raw, PROTOBUF)
    assert isinstance(request, _LiteRequest)
    assert _fast(raw) == _as_message(raw)
    assert [e.row.keys for e in decode_traces(raw, PROTOBUF).spans] == [(f"o-{i}",) for i in range(3)]


@pytest.mark.parametrize("value", [4111111111111111, 4111111111111111.0, [1, 4111111111111111]])
def test_a_number_as_long_as_a_card_number_sends_its_span_the_careful_way(value: Any) -> None:
    """Numbers are binary on the wire, where the byte scan cannot see them: a span carrying one is decoded
    whole and masked, whichever way its request was read, and the number is not stored."""
    span = {"trace_id": bytes(range(1, 17)), "span_id": b"\x05" * 8, "parent": b"", "kind": 2, "name": "charge",
            "start": 10, "length": 5, "status": 0, "message": "", "attributes": [("note", value)],
            "events": 0, "links": 0}
    raw = _request([span], ["pay"]).SerializeToString()
    assert _fast(raw) == _as_message(raw)
    (stored,) = decode_traces(raw, PROTOBUF).spans
    whole = decode_span(PbSpan.FromString(stored.body), "pay", {})
    assert "note" in whole.attributes and "4111111111111111" not in str(whole.attributes)
    assert "4111111111111111" not in repr(stored.row)


@pytest.mark.parametrize("text", ["\uff14\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11"
                                  "\uff11\uff11", "4111\u00a01111\u00a01111\u00a01111"])
def test_a_card_number_in_fullwidth_digits_or_with_no_break_spaces_is_masked(text: str) -> None:
    """Digits an East Asian input method types, and groups split by no-break spaces: the byte scan sends the
    request the careful way, where masking finds the card number."""
    span = {"trace_id": bytes(range(1, 17)), "span_id": b"\x05" * 8, "parent": b"", "kind": 2, "name": "charge",
            "start": 10, "length": 5, "status": 0, "message": "", "attributes": [("note", f"card {text} ok")],
            "events": 0, "links": 0}
    raw = _request([span], ["pay"]).SerializeToString()
    request, _ = _parse_traces(raw, PROTOBUF)
    assert not isinstance(request, _LiteRequest)
    (stored,) = decode_traces(raw, PROTOBUF).spans
    note = decode_span(PbSpan.FromString(stored.body), "pay", {}).attributes["note"]
    assert note.startswith("card ") and text not in note and "1111" not in note
