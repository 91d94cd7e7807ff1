"""`payscope ingest config`: timeouts declared by nginx, Envoy and gunicorn, mapped onto edges."""

from __future__ import annotations

from pathlib import Path

import pytest

from payscope.collector.configs import nginx_time_ms, parse_nginx
from payscope.errors import InputError
from tests.helpers import DATA, SCENARIOS, payscope, payscope_json

CONFIGS = DATA / "configs"


def test_nginx_times() -> None:
    assert nginx_time_ms("300ms", "x") == 300
    assert nginx_time_ms("1m30s", "x") == 90_000
    assert nginx_time_ms("5", "x") == 5000
    with pytest.raises(InputError, match="not an nginx time"):
        nginx_time_ms("fast", "f.conf:3")


def test_nginx_inherits_and_maps_locations(tmp_path: Path) -> None:
    declared = parse_nginx((CONFIGS / "nginx.conf").read_text(), "nginx.conf", "storefront")
    assert len(declared) == 1
    d = declared[0]
    assert (d.caller, d.callee, d.timeout_ms, d.connect_ms, d.retries) == ("storefront", "checkout", 300, 5000, 1)
    with pytest.raises(InputError, match="never closed"):
        parse_nginx("http { server { location / { proxy_pass http://a;", "bad.conf", "x")


def test_ingest_configs_and_analysis_uses_them(tmp_path: Path) -> None:
    store = str(tmp_path / "s.db")
    payscope("import", "traces", str(SCENARIOS / "marketplace.otlp.jsonl.gz"), "--store", store, check=True)
    nginx = payscope_json("ingest", "config", str(CONFIGS / "nginx.conf"), "--service", "storefront",
                          "--store", store)["declared"]
    assert nginx[0]["callee"] == "checkout"
    envoy = payscope_json("ingest", "config", str(CONFIGS / "envoy.yaml"), "--service", "wallet",
                          "--store", store)["declared"]
    assert envoy[0] == {"caller": "wallet", "callee": "ledger", "operation": "*", "timeout_ms": 300.0,
                        "connect_ms": 5000.0, "retries": 2, "total_ms": 1000.0, "file": str(CONFIGS / "envoy.yaml"),
                        "where": "route /entries"}
    gunicorn = payscope_json("ingest", "config", str(CONFIGS / "gunicorn.conf.py"), "--service", "checkout",
                             "--store", store)["declared"]
    assert gunicorn[0]["timeout_ms"] == 10_000
    doc = payscope_json("analyze", "--store", store)
    edges = {(e["caller"], e["callee"]): e for e in doc["edges"]}
    assert edges[("storefront", "checkout")]["timeout"]["source"] == "declared"
    assert edges[("wallet", "ledger")]["timeout"] == {
        "value_ms": 300.0, "source": "declared",
        "evidence": {"file": str(CONFIGS / "envoy.yaml"), "where": "route /entries", "connect_ms": 5000.0,
                     "retries": 2}}
    kinds = {(f["kind"], f["edge"]["caller"], f["edge"]["callee"]) for f in doc["findings"]}
    # the declared 300 ms sits below the time checkout itself waits on wallet: an inversion, now visible
    assert ("timeout_inversion", "storefront", "checkout") in kinds
    assert ("connect_timeout_too_long", "wallet", "ledger") in kinds
    again = payscope_json("ingest", "config", str(CONFIGS / "envoy.yaml"), "--service", "wallet", "--store", store)
    assert again["declared"] == envoy  # re-ingesting a file replaces what it declared before


def test_unknown_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    proc = payscope("ingest", "config", str(path), "--store", str(tmp_path / "s.db"))
    assert proc.returncode == 2 and "not an nginx, Envoy or gunicorn config" in proc.stderr
    proc = payscope("ingest", "config", str(CONFIGS / "gunicorn.conf.py"), "--store", str(tmp_path / "s.db"))
    assert proc.returncode == 2 and "needs --service" in proc.stderr
