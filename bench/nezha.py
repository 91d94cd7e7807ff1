"""`payscope compare` on every latency fault of the Nezha data set: is the injected service ranked first, with the
right component (`network` for a network delay, `service` for CPU contention or consumption)?

Needs a checkout of the data set (https://github.com/IntelligentDDS/Nezha, MIT; tests/data holds three of its
cases): `python -m bench nezha --repo PATH`. Each trace CSV is converted to OTLP/JSON as
`tests/data/realdata/nezha/README.md` describes; each incident (the first minute file after the injection that
the checkout holds, from the injection on) is compared with a fault-free minute of the same system.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

LATENCY_FAULTS = {"network_delay": "network", "cpu_contention": "service", "cpu_consumed": "service"}
BASELINES = {"2022": "construct_data/2022-08-23/trace/17_00_trace.csv",  # Online Boutique
             "2023": "construct_data/2023-01-30/trace/11_39_trace.csv"}  # TrainTicket


def service_of(pod: str) -> str:
    """A pod's deployment: its name less the two generated suffixes."""
    parts = pod.split("-")
    return "-".join(parts[:-2]) if len(parts) > 2 else pod


def convert(csv_path: Path, out: Path) -> tuple[float, float]:
    """One Nezha trace CSV as one OTLP/JSON request; the first and last span start, in Unix seconds."""
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    pods = {(r["TraceID"], r["SpanID"]): r["PodName"] for r in rows}
    child_services: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        child_services[(r["TraceID"], r["ParentID"])].add(service_of(r["PodName"]))
    spans: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        service = service_of(r["PodName"])
        parent = pods.get((r["TraceID"], r["ParentID"]))
        if parent is None or service_of(parent) != service:
            kind = 2  # SERVER: no parent, or one in another service
        elif child_services[(r["TraceID"], r["SpanID"])] - {service}:
            kind = 3  # CLIENT: a child in another service
        else:
            kind = 1
        name, attributes = r["OperationName"], []
        if m := re.fullmatch(r"([\w.]+)\.(\w+)/(\w+)", name):
            attributes += [{"key": "rpc.system", "value": {"stringValue": "grpc"}},
                           {"key": "rpc.service", "value": {"stringValue": f"{m.group(1)}.{m.group(2)}"}},
                           {"key": "rpc.method", "value": {"stringValue": m.group(3)}}]
        if (m := re.match(r"HTTP (GET|POST|PUT|DELETE|PATCH)", name)) and kind == 3:
            attributes.append({"key": "http.request.method", "value": {"stringValue": m.group(1)}})
        span = {"traceId": r["TraceID"], "spanId": r["SpanID"], "name": name, "kind": kind,
                "startTimeUnixNano": r["StartTimeUnixNano"], "endTimeUnixNano": r["EndTimeUnixNano"],
                "attributes": attributes, "status": {}}
        if r["ParentID"] not in ("root", ""):
            span["parentSpanId"] = r["ParentID"]
        spans[(service, r["PodName"])].append(span)
    request = {"resourceSpans": [
        {"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}},
                                     {"key": "k8s.pod.name", "value": {"stringValue": pod}}]},
         "scopeSpans": [{"scope": {"name": "nezha-csv"}, "spans": found}]} for (service, pod), found in spans.items()]}
    with gzip.open(out, "wt") as f:
        f.write(json.dumps(request) + "\n")
    starts = [int(r["StartTimeUnixNano"]) for r in rows]
    return min(starts) / 1e9, max(starts) / 1e9


def payscope(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "payscope", *args], check=True, capture_output=True,
                          text=True).stdout


def cases(repo: Path) -> list[dict[str, Any]]:
    """Every latency injection whose incident minute the checkout holds."""
    out = []
    for faults in sorted(repo.glob("rca_data/*/*-fault_list.json")):
        day = faults.parent.name
        for injections in json.loads(faults.read_text()).values():
            for f in injections:
                if f["inject_type"] not in LATENCY_FAULTS:
                    continue
                at = datetime.datetime.fromisoformat(f["inject_time"])
                minutes = [repo / f"rca_data/{day}/trace/{at + datetime.timedelta(minutes=k):%H_%M}_trace.csv"
                           for k in (1, 2)]
                found = next((p for p in minutes if p.is_file() and p.stat().st_size > 0), None)
                out.append({"id": f"{day}_{at:%H%M}_{f['inject_type']}_{service_of(f['inject_pod'])}",
                            "service": service_of(f["inject_pod"]), "component": LATENCY_FAULTS[f["inject_type"]],
                            "injected": int(f["inject_timestamp"]), "file": found,
                            "baseline": repo / BASELINES[day[:4]]})
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench nezha")
    parser.add_argument("--repo", type=Path, help="a checkout of the Nezha data set")
    args = parser.parse_args(argv)
    if args.repo is None:
        print("nezha: skipped (needs --repo PATH, a checkout of the Nezha data set)")
        return
    tally: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        converted: dict[Path, tuple[float, float]] = {}

        def otlp(csv_path: Path) -> Path:
            out = work / (csv_path.parent.parent.name + "_" + csv_path.stem + ".otlp.jsonl.gz")
            if csv_path not in converted:
                converted[csv_path] = convert(csv_path, out)
            return out

        for case in cases(args.repo):
            if case["file"] is None:
                print(f"  {case['id']:58} no trace file in the checkout")
                tally["no file"] += 1
                continue
            store = str(work / f"{case['id']}.db")
            payscope("import", "traces", str(otlp(case["baseline"])), str(otlp(case["file"])), "--store", store)
            base, (first, last) = converted[case["baseline"]], converted[case["file"]]
            doc = json.loads(payscope("compare", "--store", store, "--format", "json",
                                      "--baseline", f"{base[0]}..{base[1] + 0.001}",
                                      "--incident", f"{max(first, case['injected'])}..{last + 0.001}"))
            hops = doc["hops"]
            top = (hops[0]["service"], hops[0]["component"]) if hops else None
            if top == (case["service"], case["component"]):
                verdict = "right"
            elif not hops:
                verdict = "nothing above the noise"
            elif top[0] == case["service"]:
                verdict = "right service, another component"
            else:
                verdict = "another service"
            tally[verdict] += 1
            print(f"  {case['id']:58} {verdict:32} first: {top}")
    judged = sum(n for k, n in tally.items() if k != "no file")
    print(f"compare on {judged} Nezha latency injections: " + ", ".join(f"{k} {n}" for k, n in tally.most_common()))
