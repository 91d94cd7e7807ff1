"""Whose time a grown network gap is, on traces written by hand as OTLP/JSON and imported through the real command
line, so that what was added where is known exactly: `compare` names, of an edge's two ends, the one whose other
edges grew too, in any kind of request; `network_latency` judges a gap that grew on the calls it grew in.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import payscope, payscope_json

MS = 1_000_000
T0 = 1_767_000_000_000_000_000
BASELINE = (T0, T0 + 60_000 * MS)
INCIDENT = (T0 + 120_000 * MS, T0 + 180_000 * MS)

# (caller, callee) -> (gap ms, callee's own ms), for one request sent at this many ms into its window
Timing = Callable[[str, str, random.Random], tuple[float, float]]


def _span(trace: str, span: str, parent: str | None, name: str, kind: int, start: int, end: int) -> dict[str, Any]:
    out = {"traceId": trace, "spanId": span, "name": name, "kind": kind, "startTimeUnixNano": str(start),
           "endTimeUnixNano": str(end), "attributes": [], "status": {}}
    if parent:
        out["parentSpanId"] = parent
    return out


def _write(path: Path, flows: dict[str, list[str]], timing: dict[str, Timing], seed: int = 3) -> None:
    """Traces of each flow (entry service -> its callees, called one after another), 200 requests a window, a
    window's timings from ``timing["baseline"]`` or ``timing["incident"]``."""
    rng = random.Random(seed)
    spans: dict[str, list[dict[str, Any]]] = {}
    ids = iter(range(1, 10**9))

    def new_id(width: int) -> str:
        return f"{rng.getrandbits(4 * width - 20) << 20 | next(ids):0{width}x}"

    for label, (lo, _) in (("baseline", BASELINE), ("incident", INCIDENT)):
        for i in range(200):
            entry, callees = list(flows.items())[i % len(flows)]
            trace, root = new_id(32), new_id(16)
            start = lo + i * 250 * MS
            t = start + MS
            for callee in callees:
                gap, own = timing[label](entry, callee, rng)
                client, server = new_id(16), new_id(16)
                half = int(gap * MS / 2)
                end = t + 2 * half + int(own * MS)
                spans.setdefault(entry, []).append(_span(trace, client, root, f"POST /{callee}", 3, t, end))
                spans.setdefault(callee, []).append(_span(trace, server, client, f"POST /{callee}", 2, t + half,
                                                          end - half))
                t = end
            spans.setdefault(entry, []).append(_span(trace, root, None, f"GET /{entry}", 2, start, t + MS))
    request = {"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
         "scopeSpans": [{"scope": {"name": "by-hand"}, "spans": found}]} for service, found in spans.items()]}
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(request) + "\n")


def _compare(tmp_path: Path, flows: dict[str, list[str]], timing: dict[str, Timing]) -> list[dict[str, Any]]:
    tmp_path.mkdir(exist_ok=True)
    traces, store = tmp_path / "t.otlp.jsonl.gz", str(tmp_path / "s.db")
    _write(traces, flows, timing)
    payscope("import", "traces", str(traces), "--store", store, check=True)
    window = [f"{lo / 1e9}..{hi / 1e9}" for lo, hi in (BASELINE, INCIDENT)]
    return payscope_json("compare", "--store", store, "--baseline", window[0], "--incident", window[1])["hops"]


def _gaps_into(tmp_path: Path, callee: str) -> list[dict[str, Any]]:
    """`analyze`'s network_latency findings on the calls into ``callee``, of the store :func:`_compare` made."""
    return [f for f in payscope_json("analyze", "--store", str(tmp_path / "s.db"))["findings"]
            if f["kind"] == "network_latency" and f["edge"]["callee"] == callee]


def _healthy(_: str, __: str, rng: random.Random) -> tuple[float, float]:
    return rng.uniform(0.8, 1.2), rng.uniform(1.5, 2.5)


def test_the_end_named_is_the_one_whose_other_edges_grew_in_any_kind_of_request(tmp_path: Path) -> None:
    """ledger's network is slow; api's requests also find cache a little slower (drift above the noise). api has
    two grown edges in its kind of request, ledger one; web's requests show ledger's second grown edge."""
    flows = {"api": ["ledger", "cache"], "web": ["ledger"]}

    def incident(caller: str, callee: str, rng: random.Random) -> tuple[float, float]:
        if callee == "ledger":
            return rng.uniform(80, 120), rng.uniform(1.5, 2.5)
        return rng.uniform(9, 11), rng.uniform(1.5, 2.5)  # cache: about 9 ms more than its 1 ms

    hops = _compare(tmp_path, flows, {"baseline": _healthy, "incident": incident})
    assert (hops[0]["service"], hops[0]["component"]) == ("ledger", "network"), hops
    on_ledger = [h for h in hops if h["edge"] and "ledger" in (h["edge"]["caller"], h["edge"]["callee"])]
    assert {h["edge"]["caller"] for h in on_ledger} == {"api", "web"}, hops  # both kinds of request
    assert all((h["service"], h["component"]) == ("ledger", "network") for h in on_ledger), hops


def test_a_gap_that_grew_is_judged_on_the_calls_it_grew_in(tmp_path: Path) -> None:
    """ledger has one worker. Bursts of three calls queue behind each other all along (the second and third wait
    for the first), and in the second half of the period every answer also loses 300 ms on the wire. The gap is
    large at the median over the whole period; what grew is the wire, paid by every call, queued or not."""
    rng = random.Random(5)
    ids = iter(range(1, 10**9))

    def new_id(width: int) -> str:
        return f"{rng.getrandbits(4 * width - 20) << 20 | next(ids):0{width}x}"

    web: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for burst in range(120):
        sent = T0 + burst * 1000 * MS
        wire = 300.0 if burst >= 60 else 0.0
        free_at = sent
        for _ in range(3):  # sent together; ledger takes them one at a time
            trace, root, client, server = new_id(32), new_id(16), new_id(16), new_id(16)
            begins = max(sent + MS, free_at)
            ends = begins + int(rng.uniform(18, 22) * MS)
            free_at = ends
            answered = ends + MS + int((wire + rng.uniform(0, 10)) * MS)
            web.append(_span(trace, root, None, "GET /pay", 2, sent - MS, answered + MS))
            web.append(_span(trace, client, root, "POST /ledger", 3, sent, answered))
            ledger.append(_span(trace, server, client, "POST /ledger", 2, begins, ends))
    path, store = tmp_path / "t.otlp.jsonl.gz", str(tmp_path / "s.db")
    request = {"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
         "scopeSpans": [{"scope": {"name": "by-hand"}, "spans": found}]}
        for service, found in (("web", web), ("ledger", ledger))]}
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(request) + "\n")
    payscope("import", "traces", str(path), "--store", store, check=True)
    found = [f for f in payscope_json("analyze", "--store", store)["findings"] if f["kind"] == "network_latency"]
    assert [(f["edge"]["caller"], f["edge"]["callee"]) for f in found] == [("web", "ledger")], found
    assert found[0]["metrics"]["cause"] == "link", found[0]
    assert "The gap grew from" in found[0]["explanation"]


def test_a_starved_service_is_told_from_its_slow_network_by_the_fastest_calls(tmp_path: Path) -> None:
    """ledger is starved of CPU: its own work takes longer, and a third of the calls to it wait 100-200 ms before it
    picks them up (the gap grows) while the others are picked up as fast as before. A delay on the wire would have
    slowed every call; the fastest did not slow, so the gaps are ledger's own slowness."""
    flows = {"api": ["ledger", "cache"], "web": ["ledger"]}

    def starved(caller: str, callee: str, rng: random.Random) -> tuple[float, float]:
        if callee != "ledger":
            return _healthy(caller, callee, rng)
        late = rng.uniform(100, 200) if rng.random() < 1 / 3 else 0.0
        return rng.uniform(0.8, 1.2) + late, rng.uniform(30, 50)

    hops = _compare(tmp_path, flows, {"baseline": _healthy, "incident": starved})
    assert (hops[0]["service"], hops[0]["component"]) == ("ledger", "service"), hops
    assert not any(h["component"] == "network" and h["service"] == "ledger" for h in hops), hops


def test_a_slow_service_behind_a_slow_wire_is_both(tmp_path: Path) -> None:
    """ledger's own work grows (it is slower under load) and every answer loses 100 ms on the wire as well: the
    fastest calls lost the 100 ms too, so the gaps stay the network's, and ledger's own time is listed beside."""
    flows = {"api": ["ledger", "cache"], "web": ["ledger"]}

    def both(caller: str, callee: str, rng: random.Random) -> tuple[float, float]:
        if callee != "ledger":
            return _healthy(caller, callee, rng)
        return rng.uniform(95, 105), rng.uniform(30, 50)

    hops = _compare(tmp_path, flows, {"baseline": _healthy, "incident": both})
    assert (hops[0]["service"], hops[0]["component"]) == ("ledger", "network"), hops
    assert ("ledger", "service") in {(h["service"], h["component"]) for h in hops}, hops


def test_analyze_and_compare_put_a_starved_services_gaps_on_it_alike(tmp_path: Path) -> None:
    """ledger is starved: 60% of the calls to it wait 100-200 ms to be picked up, the others none, and its own work
    slows. `compare` says `[service] ledger`; `analyze`'s network_latency on the calls into it says where the time
    went the same way: `callee_starved`, ledger, not the link."""
    flows = {"api": ["ledger", "cache"], "web": ["ledger"]}

    def starved(caller: str, callee: str, rng: random.Random) -> tuple[float, float]:
        if callee != "ledger":
            return _healthy(caller, callee, rng)
        late = rng.uniform(100, 200) if rng.random() < 0.6 else 0.0
        return rng.uniform(0.8, 1.2) + late, rng.uniform(30, 50)

    hops = _compare(tmp_path, flows, {"baseline": _healthy, "incident": starved})
    assert (hops[0]["service"], hops[0]["component"]) == ("ledger", "service"), hops
    found = _gaps_into(tmp_path, "ledger")
    into = {f["edge"]["caller"]: f for f in found}
    assert set(into) == {"api", "web"}, found
    for f in into.values():
        assert (f["metrics"]["cause"], f["metrics"]["common_cause"]) == ("callee_starved", "ledger"), f
        assert "ledger is slow to pick its calls up" in f["summary"] and "CPU" in f["recommendation"]["action"]


def test_a_slow_wire_with_waits_in_front_of_it_stays_the_wire(tmp_path: Path) -> None:
    """Every call to ledger loses 100 ms on the wire, and 40% of them wait 300-900 ms more in front of it (a full
    connection pool: a slow link holds every connection longer), while ledger's own work slows a little. The waits
    raise the mean far more than the fastest calls, as a starved service's would, but the fastest calls lost the
    whole delay, much more than ledger's own time grew: the gaps are the wire's, in `compare` and in `analyze`."""
    flows = {"api": ["ledger", "cache"], "web": ["ledger"]}

    def wire_and_pool(caller: str, callee: str, rng: random.Random) -> tuple[float, float]:
        if callee != "ledger":
            return _healthy(caller, callee, rng)
        waited = rng.uniform(300, 900) if rng.random() < 0.4 else 0.0
        return rng.uniform(98, 102) + waited, rng.uniform(30, 50)

    hops = _compare(tmp_path, flows, {"baseline": _healthy, "incident": wire_and_pool})
    assert (hops[0]["service"], hops[0]["component"]) == ("ledger", "network"), hops
    found = _gaps_into(tmp_path, "ledger")
    assert {f["edge"]["caller"] for f in found} == {"api", "web"}, found
    assert not any(f["metrics"]["cause"] == "callee_starved" for f in found), found


def test_a_slow_wire_that_recovers_inside_the_window_stays_the_wire(tmp_path: Path) -> None:
    """Every call to ledger loses 100 ms on the wire for the first four fifths of the incident, then none, while
    ledger's own work slows. Over the whole window the fastest tenth of the calls (those after the wire recovered)
    lost nothing, as a starved service's would; stretch by stretch, every stretch the delay acted on lost it at its
    floor: the gaps are the wire's, in `compare` and in `analyze`."""
    flows = {"api": ["ledger", "cache"], "web": ["ledger"]}
    seen = {"ledger": 0}

    def recovers(caller: str, callee: str, rng: random.Random) -> tuple[float, float]:
        if callee != "ledger":
            return _healthy(caller, callee, rng)
        seen["ledger"] += 1
        wire = rng.uniform(98, 102) if seen["ledger"] <= 160 else rng.uniform(0.8, 1.2)
        return wire, rng.uniform(30, 50)

    hops = _compare(tmp_path, flows, {"baseline": _healthy, "incident": recovers})
    assert seen["ledger"] == 200
    assert (hops[0]["service"], hops[0]["component"]) == ("ledger", "network"), hops
    found = _gaps_into(tmp_path, "ledger")
    assert found and not any(f["metrics"]["cause"] == "callee_starved" for f in found), found
