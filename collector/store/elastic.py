"""The Elasticsearch store: data streams in the OpenTelemetry Collector exporter's ``otel`` shape.

Layout (docs/elasticsearch.md says more):

* spans go to the data stream ``traces-payscope.otel-default`` and log records to ``logs-payscope.otel-default``,
  each document shaped as the OpenTelemetry Collector's Elasticsearch exporter writes it in ``otel`` mode
  (``trace_id``, ``span_id``, ``parent_span_id``, ``name``, ``kind``, ``duration`` in ns, ``attributes``,
  ``resource.attributes``, ``status.code``/``message``, ``@timestamp`` in ns), plus payscope's derived facts
  under ``payscope.*`` (edge caller and callee, error class, captured timeouts, business keys), so Kibana and
  ES|QL read them directly;
* settings (clock offsets, declared timeouts) in the index ``payscope-meta``, and business keys learned from
  log lines in ``payscope-keys``;
* an ILM policy ``payscope-retention`` deletes backing indices older than the retention (7 days unless set).

Writes are idempotent across any number of collectors: a document's id is derived from its trace and span id
(a log record's from its identity), and it is created, never overwritten, so a replayed or doubled batch
stores nothing twice. A write returns once Elasticsearch has acknowledged every document of it (the translog
is fsynced per request), so what a collector acknowledged is durable. A batch is made visible in one refresh.

Foreign data: indices written by an OpenTelemetry Collector (``traces-generic.otel-default``) or ECS log
indices (Filebeat: ``message``, ``trace.id``, ``service.name``) are read through the same questions; the
facts payscope derives on write are then derived on read, from the same attributes, by the same function.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from payscope import semconv
from payscope.errors import StoreError
from payscope.model import STATUS_ERROR, STATUS_OK, STATUS_UNSET, EncodedSpan, LogRecord, Span, SpanRow, TraceSummary

from .api import SAMPLE_DIGITS, Cursor, LogQuery, Sample, Store, UnavailableError, UnsupportedError, group_traces
from .codec import decode_body
from .spool import Spool

TRACES = "traces-payscope.otel-default"
LOGS = "logs-payscope.otel-default"
META = "payscope-meta"
KEYS = "payscope-keys"
DERIVED = "payscope-derived"  # each settled trace's calls, derived once (analyzers/derived.py)
POLICY = "payscope-retention"
_HEALTH_WAIT_S = 10  # how long a red index of ours may take to become yellow before it is refused
_BULK_DOCS = 5_000
_SUMMARIES_AT_ONCE = 1_000  # traces asked for at once: summaries (a bucket each) or whole traces
_PAGE = 5_000
_MAX_TERMS = 10_000
_MAX_BUCKETS = 60_000  # below the cluster's default search.max_buckets (65,536)
_SWITCH = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}
_KINDS = {"server": "Server", "client": "Client", "producer": "Producer", "consumer": "Consumer",
          "internal": "Internal", "unspecified": "Unspecified"}
_STATUS = {STATUS_UNSET: "Unset", STATUS_OK: "Ok", STATUS_ERROR: "Error"}
_ERROR_CODES = ["Error", "STATUS_CODE_ERROR", "error", "ERROR", "2"]

_KEYWORD = {"type": "keyword", "ignore_above": 1024}
_SPAN_MAPPING: dict[str, Any] = {
    "dynamic": False,  # everything is kept in _source; only these fields are indexed
    "properties": {
        "@timestamp": {"type": "date_nanos"},
        "trace_id": {"type": "keyword"}, "span_id": {"type": "keyword"}, "parent_span_id": {"type": "keyword"},
        "name": _KEYWORD, "kind": {"type": "keyword"}, "duration": {"type": "long"},
        "status": {"properties": {"code": {"type": "keyword"}, "message": {"type": "text"}}},
        "attributes": {"type": "flattened", "ignore_above": 1024},
        "resource": {"properties": {"attributes": {"type": "flattened", "ignore_above": 1024}}},
        "events": {"type": "object", "enabled": False},
        "payscope": {"properties": {
            "service": {"type": "keyword"}, "start_ns": {"type": "long"}, "end_ns": {"type": "long"},
            "error_class": {"type": "keyword"}, "operation": _KEYWORD, "callee": {"type": "keyword"},
            "method": {"type": "keyword"}, "http_status": {"type": "integer"}, "attempt": {"type": "integer"},
            "idempotency_key": {"type": "boolean"}, "timeout_connect_ms": {"type": "double"},
            "timeout_read_ms": {"type": "double"}, "timeout_total_ms": {"type": "double"},
            "timeout_source": {"type": "keyword"}, "retry_max": {"type": "integer"}, "amount": {"type": "double"},
            "keys": {"type": "keyword"}, "caller_budget_ms": {"type": "double"}, "fault": {"type": "keyword"},
        }},
    },
}
_DERIVED_MAPPING: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "@timestamp": {"type": "date_nanos"},  # when it was derived: the retention counts from it
        "trace_id": {"type": "keyword"}, "key": {"type": "keyword"}, "span_count": {"type": "integer"},
        "body": {"type": "binary"},  # kept in _source only, never indexed
    },
}
_LOG_MAPPING: dict[str, Any] = {
    "dynamic": False,
    "properties": {
        "@timestamp": {"type": "date_nanos"},
        "body": {"properties": {"text": {"type": "match_only_text"}}},
        "severity_text": {"type": "keyword"},
        "trace_id": {"type": "keyword"}, "span_id": {"type": "keyword"},
        "attributes": {"type": "flattened", "ignore_above": 1024},
        "resource": {"properties": {"attributes": {"type": "flattened", "ignore_above": 1024}}},
        "payscope": {"properties": {
            "log_id": {"type": "long"}, "time_ns": {"type": "long"}, "source": {"type": "keyword"},
            "link_method": {"type": "keyword"}, "link_confidence": {"type": "float"},
            "service": {"type": "keyword"}, "message": {"type": "wildcard"},
        }},
    },
}


_last_second: tuple[int | None, str] = (None, "")  # the second iso_ns formatted last, and its text (one tuple:
# a thread reads both of one second); spans come by the thousand, most of them within a second or two


def iso_ns(ns: int) -> str:
    """Nanoseconds since the epoch as the ISO-8601 text a ``date_nanos`` field takes, to the nanosecond."""
    global _last_second
    seconds, frac = divmod(ns, 1_000_000_000)
    last = _last_second
    if seconds != last[0]:
        last = _last_second = (seconds, datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{last[1]}.{frac:09d}Z"


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def _line(value: Any) -> bytes:
    """One line of a bulk request's body (NDJSON), as the client would encode it."""
    return _encode(value).encode("utf-8", "surrogatepass") + b"\n"


def parse_ns(value: Any) -> int:
    """``@timestamp`` as another writer may have sent it (ISO text to the ns, or epoch milliseconds) in ns."""
    if isinstance(value, (int, float)):
        return int(value * 1_000_000)
    text = str(value)
    if text.isdigit():
        return int(text) * 1_000_000
    head, _, rest = text.partition(".")
    frac, zone = rest, "Z"
    for mark in ("Z", "+", "-"):
        if mark in rest:
            at = rest.index(mark)
            frac, zone = rest[:at], rest[at:]
            break
    offset = "+00:00" if zone == "Z" else zone
    base = datetime.fromisoformat(head + offset)
    return int(base.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def log_id(record: LogRecord) -> int:
    """A record's id, the same in every collector: 63 bits of its identity."""
    return int.from_bytes(hashlib.blake2b(record.identity().encode("utf-8", "replace"), digest_size=8).digest(),
                          "big") >> 1


def _kind(value: Any) -> str:
    text = str(value or "").lower().removeprefix("span_kind_")
    return text if text in _KINDS else "internal" if not text else "unspecified"


def _status(status: Any) -> tuple[int, str]:
    status = status or {}
    code = status.get("code")
    text = str(code).lower().removeprefix("status_code_") if code is not None else "unset"
    number = {"ok": STATUS_OK, "1": STATUS_OK, "error": STATUS_ERROR, "2": STATUS_ERROR}.get(text, STATUS_UNSET)
    return number, str(status.get("message") or "")


def _nested(source: dict[str, Any], path: str) -> Any:
    """``a.b.c`` in a document whose writer may have nested or dotted the keys."""
    if path in source:
        return source[path]
    head, _, rest = path.partition(".")
    inner = source.get(head)
    if rest and isinstance(inner, dict):
        return _nested(inner, rest)
    return None


def _flat(attrs: Any, prefix: str = "") -> dict[str, Any]:
    """Attributes as dotted keys, however the writer nested them."""
    out: dict[str, Any] = {}
    if not isinstance(attrs, dict):
        return out
    for key, value in attrs.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


class ElasticStore(Store):
    """A :class:`Store` in Elasticsearch 8 or 9 (see the module docstring)."""

    def __init__(self, url: str, *, readonly: bool = False, traces_index: str | None = None,
                 logs_index: str | None = None, spool: Path | None = None) -> None:
        from elasticsearch import Elasticsearch

        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        scheme = "https" if parts.scheme == "https" else "http"
        userinfo, _, netloc = parts.netloc.rpartition("@")
        hosts = _hosts(netloc)
        if not hosts:
            raise StoreError(f"--store {_safe(url)}: no host in the Elasticsearch URL (es://HOST:9200)")
        self.url = f"{'https' if scheme == 'https' else 'es'}://{','.join(hosts)}"
        env = os.environ
        auth: dict[str, Any] = {}
        if env.get("PAYSCOPE_ES_API_KEY"):
            auth["api_key"] = env["PAYSCOPE_ES_API_KEY"]
        elif env.get("PAYSCOPE_ES_USERNAME"):
            auth["basic_auth"] = (env["PAYSCOPE_ES_USERNAME"], env.get("PAYSCOPE_ES_PASSWORD", ""))
        elif userinfo:
            user, _, password = userinfo.partition(":")
            auth["basic_auth"] = (unquote(user), unquote(password))
        ca = query.get("ca_file") or env.get("PAYSCOPE_ES_CA_FILE")
        if ca:
            if not os.path.isfile(ca):
                raise StoreError(f"the Elasticsearch CA file {ca} does not exist")
            auth["ca_certs"] = ca
        # gzip on the wire: a reader's answers shrink to about a third (docs/elasticsearch.md); a writer's bulk
        # requests are left plain unless asked, so that the cluster's cores go to indexing
        setting = query.get("compress") or env.get("PAYSCOPE_ES_COMPRESS")
        if setting is not None and setting.lower() not in _SWITCH:
            raise StoreError(f"--store {_safe(url)}: compress must be on or off, not {setting!r}")
        compress = readonly if setting is None else _SWITCH[setting.lower()]
        # every node named is tried in turn: a cluster keeps answering while one of them is down
        self._es = Elasticsearch([f"{scheme}://{h}" for h in hosts], request_timeout=30, retry_on_timeout=True,
                                 max_retries=max(3, len(hosts)), http_compress=compress, **auth)
        self._readonly = readonly
        self._dirty = False
        self._given_url = url
        self.traces_index = traces_index or query.get("traces") or env.get("PAYSCOPE_ES_TRACES_INDEX") or TRACES
        self.logs_index = logs_index or query.get("logs") or env.get("PAYSCOPE_ES_LOGS_INDEX") or LOGS
        self.foreign = self.traces_index != TRACES  # written by another pipeline: derive facts on read
        self.foreign_logs = self.logs_index != LOGS
        self.keeps_derivations = not self.foreign  # never written into another pipeline's cluster layout
        self._retention = query.get("retention") or env.get("PAYSCOPE_ES_RETENTION") or "7d"
        self._call(self._check, "connect to")
        if not readonly and not self.foreign:
            self._call(self._install, "set up")
        self._spool: Spool | None = None
        self._stop = threading.Event()
        self._replayer: threading.Thread | None = None
        if spool is not None and not readonly:
            self._spool = Spool(spool)
            self._replayer = threading.Thread(target=self._replay, name="payscope-es-replay", daemon=True)
            self._replayer.start()

    # --- connection and layout -------------------------------------------------------
    def _call(self, fn: Any, doing: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn``, turning what Elasticsearch or the network says into one line without credentials."""
        from elasticsearch import ApiError, TransportError

        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            status = exc.meta.status
            if status == 401:
                raise StoreError(f"Elasticsearch at {self.url} refused the credentials (401): set "
                                 "PAYSCOPE_ES_API_KEY, or PAYSCOPE_ES_USERNAME and PAYSCOPE_ES_PASSWORD") from None
            if status == 403:
                raise StoreError(f"Elasticsearch at {self.url} does not allow this user to {doing} "
                                 f"payscope's indices (403: {_reason(exc)})") from None
            kind = UnavailableError if status == 429 or status >= 500 else StoreError
            raise kind(f"Elasticsearch at {self.url} could not {doing} payscope's data "
                       f"({status}: {_reason(exc)})") from None
        except TransportError as exc:
            raise UnavailableError(f"cannot reach Elasticsearch at {self.url}: {_transport_reason(exc)}") from None

    def _check(self) -> None:
        info = self._es.info()
        major = int(str(info["version"]["number"]).split(".")[0])
        if major < 8:
            raise StoreError(f"Elasticsearch at {self.url} is version {info['version']['number']}; "
                             "payscope needs 8 or 9")
        # Only the indices payscope reads or writes are judged, and a moment is given for a replica to be
        # promoted after a node is lost: a cluster red for a stranger's index, or for a second, still serves us.
        # A name gets a trailing '*' so that one not yet made matches nothing (green) instead of waiting red.
        ours = {name if "*" in name else name + "*" for name in (self.traces_index, self.logs_index, META, KEYS,
                                                                    DERIVED)}
        health = self._es.options(ignore_status=408).cluster.health(
            index=",".join(sorted(ours)), wait_for_status="yellow", timeout=f"{_HEALTH_WAIT_S}s")
        if health["status"] == "red":
            raise StoreError(f"the Elasticsearch cluster at {self.url} is red for payscope's indices "
                             f"(unassigned primary shards, still after {_HEALTH_WAIT_S} s): fix the cluster first")

    def _install(self) -> None:
        self._es.ilm.put_lifecycle(name=POLICY, policy={"phases": {
            "hot": {"actions": {"rollover": {"max_primary_shard_size": "50gb", "max_age": "1d"}}},
            "delete": {"min_age": self._retention, "actions": {"delete": {}}}}})
        settings = {"index.lifecycle.name": POLICY, "index.refresh_interval": "1s"}
        for name, pattern, mapping in (("payscope-traces", "traces-payscope.otel-*", _SPAN_MAPPING),
                                       ("payscope-logs", "logs-payscope.otel-*", _LOG_MAPPING),
                                       ("payscope-derived", f"{DERIVED}*", _DERIVED_MAPPING)):
            self._es.indices.put_index_template(name=name, index_patterns=[pattern], data_stream={}, priority=500,
                                                template={"settings": settings, "mappings": mapping})
        for index, props in ((META, {"value": {"type": "keyword", "index": False, "doc_values": False}}),
                             (KEYS, {"key": {"type": "keyword"}, "trace_id": {"type": "keyword"}})):
            if not self._es.indices.exists(index=index):
                self._es.options(ignore_status=400).indices.create(
                    index=index, mappings={"dynamic": False, "properties": props})
        for stream in (TRACES, LOGS, DERIVED):
            if not self._es.indices.exists(index=stream):
                self._es.options(ignore_status=400).indices.create_data_stream(name=stream)
        existing = self._es.indices.get_mapping(index=TRACES)
        for index, body in existing.items():
            found = body["mappings"].get("properties", {}).get("trace_id", {}).get("type")
            if found != "keyword":
                raise StoreError(f"the index {index} maps trace_id as {found or 'nothing'}, not keyword: "
                                 "it was not made by payscope; pass --store with another cluster or remove it")

    def address(self) -> str | None:
        """The URL as given (its credentials, if any, and options with it), for a collector's decoding processes
        to write what they decode themselves, a bulk request each at once. Not for another pipeline's indices,
        which payscope never writes."""
        if self._readonly or self.foreign or self.foreign_logs:
            return None
        return self._given_url

    def written_elsewhere(self) -> None:
        self._dirty = True  # refreshed before the next read, as after a write of this process

    def _refreshed(self) -> None:
        """Read this process' own writes (and those it was told of, ``written_elsewhere``): they are made
        visible before it reads. Other readers see a write within the refresh interval (1 s)."""
        if self._dirty:
            self._dirty = False
            self._call(self._es.indices.refresh, "refresh", index=f"{TRACES},{LOGS},{META},{KEYS},{DERIVED}",
                       ignore_unavailable=True, allow_no_indices=True)

    def close(self) -> None:
        self._stop.set()
        if self._replayer is not None:
            self._replayer.join(timeout=60)
            self._replayer = None
        try:
            self._refreshed()
        except StoreError:
            pass  # nothing to make visible can be made visible: the spool keeps what is not yet stored
        finally:
            self._es.close()

    def _replay(self) -> None:
        """Send spooled batches as soon as Elasticsearch takes them again."""
        assert self._spool is not None
        while not self._stop.wait(1.0):
            for claimed, body in self._spool.claim():
                try:
                    self._bulk([line + b"\n" for line in body.splitlines() if line])
                except UnavailableError:
                    self._spool.give_back(claimed)
                    break
                except StoreError as exc:  # it will never be stored: kept aside, and said, not dropped
                    os.replace(claimed, claimed.with_name(claimed.name.split(".claimed.")[0] + ".rejected"))
                    print(f"payscope: a spooled batch was refused and kept in {claimed.parent}: {exc}",
                          file=sys.stderr)
                    continue
                self._spool.done(claimed)
                if self._stop.is_set():
                    return

    # --- writing ---------------------------------------------------------------------
    def _bulk(self, lines: list[bytes]) -> int:
        """Create documents (``lines``: a bulk request's body, an action and its document each, :func:`_line`);
        return how many were new. A document that exists already (409) is not new; any other refusal fails the
        write, so the caller does not acknowledge it."""
        new = 0
        for i in range(0, len(lines), 2 * _BULK_DOCS):
            chunk = b"".join(lines[i:i + 2 * _BULK_DOCS])
            result = self._call(self._es.bulk, "write", operations=chunk)
            self._dirty = True
            failed = []
            for item in result["items"]:
                outcome = next(iter(item.values()))
                status = outcome.get("status", 500)
                if status in (200, 201):
                    new += 1
                elif status != 409:
                    failed.append(outcome)
            if failed:
                error = failed[0].get("error", {})
                retry = all(f.get("status", 500) == 429 or f.get("status", 500) >= 500 for f in failed)
                raise (UnavailableError if retry else StoreError)(
                    f"Elasticsearch at {self.url} refused {len(failed)} documents "
                    f"({error.get('type', 'error')}: {str(error.get('reason', ''))[:200]})")
        return new

    def write(self, spans: Iterable[Span | EncodedSpan] = (),
              logs: Iterable[LogRecord] = ()) -> tuple[int, int]:
        if self._readonly:
            raise StoreError("this store was opened read-only")
        if self.foreign:
            raise UnsupportedError(f"payscope writes only to its own data streams, not to {self.traces_index}")
        lines: list[bytes] = []
        resources: dict[int, bytes] = {}  # a request's spans share their resource: encoded once
        for item in spans:
            if isinstance(item, EncodedSpan):
                span, row = decode_body(item.body, item.row.service, item.resource), item.row
            else:
                span, row = item, semconv.row_of(item)
            resource = resources.get(id(span.resource))
            if resource is None:
                resource = resources[id(span.resource)] = _encode(span.resource).encode("utf-8", "surrogatepass")
            lines += [_create(TRACES, f"{row.trace_id}-{row.span_id}"), _span_line(span, row, resource)]
        log_lines: list[bytes] = []
        for record in logs:
            lid = log_id(record)
            log_lines += [_create(LOGS, str(lid)), _line(_log_doc(record, lid))]
        try:
            return (self._bulk(lines) if lines else 0), (self._bulk(log_lines) if log_lines else 0)
        except UnavailableError:
            if self._spool is None:
                raise
            # acknowledged once on disk; sent when Elasticsearch is back (how many were new is not known)
            self._spool.put(b"".join(lines + log_lines))
            return len(lines) // 2, len(log_lines) // 2

    def _update_logs(self, changes: dict[int, dict[str, Any]]) -> None:
        if self.foreign_logs:
            raise UnsupportedError(f"payscope does not change log records in {self.logs_index}")
        ids = [str(i) for i in changes]
        for start in range(0, len(ids), _BULK_DOCS):
            chunk = ids[start:start + _BULK_DOCS]
            self._refreshed()
            found = self._call(self._es.search, "read", index=LOGS, query={"ids": {"values": chunk}},
                               size=len(chunk), source=False)
            actions: list[dict[str, Any]] = []
            for hit in found["hits"]["hits"]:  # a data stream's documents change in their backing index
                actions += [{"update": {"_index": hit["_index"], "_id": hit["_id"]}},
                            {"doc": changes[int(hit["_id"])]}]
            if actions:
                result = self._call(self._es.bulk, "write", operations=actions)
                self._dirty = True
                if result.get("errors"):
                    raise StoreError(f"Elasticsearch at {self.url} refused a change of log records")

    def update_log_links(self, links: Iterable[tuple[int, str | None, str | None, str, float]]) -> None:
        self._update_logs({i: {"trace_id": t, "span_id": s, "payscope": {"link_method": m, "link_confidence": c}}
                           for i, t, s, m, c in links})

    def update_log_sources(self, sources: Iterable[tuple[int, str]]) -> None:
        self._update_logs({i: {"payscope": {"source": src}} for i, src in sources})

    def write_keys(self, pairs: Iterable[tuple[str, str]]) -> None:
        actions: list[dict[str, Any]] = []
        for key, trace_id in pairs:
            actions += [{"index": {"_index": KEYS, "_id": f"{key}\x1f{trace_id}"}}, {"key": key, "trace_id": trace_id}]
        if actions:
            self._bulk([_line(a) for a in actions])

    def set_meta(self, key: str, value: str) -> None:
        self._call(self._es.index, "write", index=META, id=key, document={"value": value})
        self._dirty = True

    def get_meta(self, key: str) -> str | None:
        self._refreshed()
        found = self._call(self._es.options(ignore_status=404).get, "read", index=META, id=key)
        return str(found["_source"]["value"]) if found.get("found") else None

    # --- reading spans ---------------------------------------------------------------
    def _search(self, index: str, **body: Any) -> dict[str, Any]:
        """One search; an index that does not exist yet holds nothing."""
        self._refreshed()
        result = dict(self._call(self._es.options(ignore_status=404).search, "read", index=index,
                                 ignore_unavailable=True, allow_no_indices=True, **body))
        if "hits" not in result:
            return {"hits": {"hits": [], "total": {"value": 0}}, "aggregations": {}}
        return result

    def _runtime(self) -> dict[str, Any]:
        """For another pipeline's documents: the fields payscope computes on write, computed in the search."""
        if not self.foreign:
            return {}
        return {
            "payscope.start_ns": {"type": "long", "script": {"source":
                "Instant t = doc['@timestamp'].value.toInstant(); "
                "emit(t.getEpochSecond() * 1000000000L + t.getNano())"}},
            "payscope.end_ns": {"type": "long", "script": {"source":
                "Instant t = doc['@timestamp'].value.toInstant(); long d = doc['duration'].size() > 0 ? "
                "doc['duration'].value : 0; emit(t.getEpochSecond() * 1000000000L + t.getNano() + d)"}},
            "payscope.service": {"type": "keyword", "script": {"source":
                "def f = doc['resource.attributes.service.name']; if (f.size() > 0) emit(f.value)"}},
        }

    def _row_source(self) -> list[str]:
        """What a row needs of a document: payscope's derived facts, or for another pipeline's documents the
        attributes to derive them from (never the events and resources a whole span carries)."""
        base = ["trace_id", "span_id", "parent_span_id", "name", "kind", "status"]
        if self.foreign:
            return [*base, "@timestamp", "duration", "attributes", "resource.attributes.service.name"]
        return [*base, "payscope"]

    def _span_hits(self, query: dict[str, Any], sort: list[Any] | None = None,
                   source: list[str] | None = None, index: str | None = None) -> Iterator[dict[str, Any]]:
        """Every span document (or of ``index``, every document) matching ``query``, paged with a point in time
        and search_after."""
        self._refreshed()
        runtime = self._runtime() if index is None else {}
        pit = self._call(self._es.open_point_in_time, "read", index=index or self.traces_index, keep_alive="1m",
                         ignore_unavailable=True)["id"]
        after: list[Any] | None = None
        try:
            while True:
                body: dict[str, Any] = {"query": query, "size": _PAGE, "pit": {"id": pit, "keep_alive": "1m"},
                                        "sort": (sort or []) + [{"_shard_doc": "asc"}], "track_total_hits": False}
                if runtime:
                    body["runtime_mappings"] = runtime
                if source is not None:
                    body["_source"] = source
                if after is not None:
                    body["search_after"] = after
                result = self._call(self._es.search, "read", **body)
                hits = result["hits"]["hits"]
                yield from hits
                if len(hits) < _PAGE:
                    return
                after = hits[-1]["sort"]
                pit = result.get("pit_id", pit)
        finally:
            try:
                self._es.close_point_in_time(id=pit)
            except Exception:  # noqa: BLE001 - the point in time expires by itself
                pass

    def _spans_of(self, trace_ids: list[str], source: list[str] | None = None) -> list[tuple[Span, SpanRow]]:
        out = []
        for hit in self._span_hits({"terms": {"trace_id": trace_ids}}, source=source):
            out.append(self._span_and_row(hit["_source"]))
        out.sort(key=lambda pair: (pair[0].start_ns, pair[0].span_id))
        return out

    def _span_and_row(self, source: dict[str, Any]) -> tuple[Span, SpanRow]:
        span = _span_of(source)
        mine = source.get("payscope")
        return span, (_row_of(span, mine) if isinstance(mine, dict) and "operation" in mine
                      else semconv.row_of(span))

    def trace(self, trace_id: str) -> list[Span]:
        return [span for span, _ in self._spans_of([trace_id.lower()])]

    def trace_rows(self, trace_id: str) -> list[SpanRow]:
        return [row for _, row in self._spans_of([trace_id.lower()], self._row_source())]

    def traces_whole(self, trace_ids: list[str]) -> dict[str, list[Span]]:
        wanted = sorted({t.lower() for t in trace_ids})
        out: dict[str, list[Span]] = {}
        for i in range(0, len(wanted), _SUMMARIES_AT_ONCE):  # each trace's spans stay in the order trace() gives
            for span, _ in self._spans_of(wanted[i:i + _SUMMARIES_AT_ONCE]):
                out.setdefault(span.trace_id, []).append(span)
        return out

    def _failed_query(self) -> dict[str, Any]:
        return {"bool": {"should": [{"terms": {"status.code": _ERROR_CODES}},
                                    {"exists": {"field": "payscope.error_class"}}], "minimum_should_match": 1}}

    def _summaries_of(self, trace_ids: list[str]) -> dict[str, TraceSummary]:
        """Trace summaries computed in Elasticsearch, one bucket per trace."""
        if not trace_ids:
            return {}
        by_start = [{"payscope.start_ns": {"order": "asc"}}]
        aggs = {"t": {"terms": {"field": "trace_id", "size": len(trace_ids)}, "aggs": {
            "start": {"min": {"field": "payscope.start_ns"}}, "end": {"max": {"field": "payscope.end_ns"}},
            "services": {"terms": {"field": "payscope.service", "size": 200}},
            "failed": {"filter": self._failed_query()},
            "root": {"filter": {"bool": {"must_not": {"exists": {"field": "parent_span_id"}}}},
                     "aggs": {"first": {"top_hits": {"size": 1, "sort": by_start,
                                                     "_source": ["name", "payscope.service", "resource"]}}}},
            "earliest": {"top_hits": {"size": 1, "sort": by_start,
                                      "_source": ["name", "payscope.service", "resource"]}},
            "error": {"filter": {"exists": {"field": "payscope.error_class"}},
                      "aggs": {"last": {"top_hits": {"size": 1, "sort": [{"payscope.start_ns": {"order": "desc"}}],
                                                     "_source": ["payscope.error_class", "payscope.service"]}}}},
            "first_start": {"top_hits": {"size": 1, "sort": by_start, "_source": ["@timestamp", "payscope.start_ns"]}},
            "last_end": {"top_hits": {"size": 1, "sort": [{"payscope.end_ns": {"order": "desc"}}],
                                      "_source": ["@timestamp", "duration", "payscope.end_ns"]}},
        }}}
        body: dict[str, Any] = {"query": {"terms": {"trace_id": trace_ids}}, "size": 0, "aggs": aggs}
        if self._runtime():
            body["runtime_mappings"] = self._runtime()
        result = self._search(self.traces_index, **body)
        out: dict[str, TraceSummary] = {}
        for bucket in result.get("aggregations", {}).get("t", {}).get("buckets", []):
            roots = bucket["root"]["first"]["hits"]["hits"] or bucket["earliest"]["hits"]["hits"]
            root = roots[0]["_source"] if roots else {}
            errors = bucket["error"]["last"]["hits"]["hits"]
            error = errors[0]["_source"].get("payscope", {}) if errors else {}
            first = bucket["first_start"]["hits"]["hits"][0]["_source"]
            last = bucket["last_end"]["hits"]["hits"][0]["_source"]
            start = _start_of(first)
            end = max(_end_of(last), start)
            out[bucket["key"]] = TraceSummary(
                bucket["key"], start, end, _service_of(root), str(root.get("name", "")), bucket["doc_count"],
                bucket["failed"]["doc_count"], sorted(b["key"] for b in bucket["services"]["buckets"]),
                error.get("error_class"), error.get("service"))
        return out

    def _trace_ids(self, query: dict[str, Any], limit: int | None, offset: int) -> list[str]:
        """Trace ids whose spans match ``query``, newest first (by their earliest matching span). A page within
        the first ``_MAX_TERMS`` is one ordered ``terms`` aggregation; anything deeper (or everything) is paged
        whole with a ``composite`` aggregation and ordered here: never silently fewer than asked."""
        if limit is None or offset + limit > _MAX_TERMS:
            starts = self._all_trace_starts(query)
            ordered = sorted(starts, key=lambda t: (starts[t], t), reverse=True)
            return ordered[offset:] if limit is None else ordered[offset:offset + limit]
        size = offset + limit
        body: dict[str, Any] = {"query": query, "size": 0, "aggs": {"t": {
            "terms": {"field": "trace_id", "size": max(size, 1), "order": {"start": "desc"}},
            "aggs": {"start": {"min": {"field": "payscope.start_ns"}},
                     "page": {"bucket_sort": {"from": offset, "size": max(size - offset, 0)}}}}}}
        if self._runtime():
            body["runtime_mappings"] = self._runtime()
        result = self._search(self.traces_index, **body)
        return [b["key"] for b in result.get("aggregations", {}).get("t", {}).get("buckets", [])]

    def _all_trace_starts(self, query: dict[str, Any]) -> dict[str, float]:
        """Every trace id matching ``query`` with its earliest matching start."""
        return {b["key"]["t"]: b["start"]["value"] or 0.0 for page in self._trace_buckets(query, starts=True)
                for b in page}

    def _trace_buckets(self, query: dict[str, Any], *, starts: bool, after_trace: str | None = None,
                       size: int = _MAX_TERMS) -> Iterator[list[dict[str, Any]]]:
        """One bucket per trace id with a span matching ``query`` (its ``doc_count`` the spans that match, with
        ``starts`` their earliest start too), by trace id (those after ``after_trace``), in pages of a
        ``composite`` aggregation."""
        after: dict[str, Any] | None = None if after_trace is None else {"t": after_trace}
        while True:
            composite: dict[str, Any] = {"size": size, "sources": [{"t": {"terms": {"field": "trace_id"}}}]}
            if after is not None:
                composite["after"] = after
            agg: dict[str, Any] = {"composite": composite}
            if starts:
                agg["aggs"] = {"start": {"min": {"field": "payscope.start_ns"}}}
            body: dict[str, Any] = {"query": query, "size": 0, "aggs": {"t": agg}}
            if self._runtime():
                body["runtime_mappings"] = self._runtime()
            found = self._search(self.traces_index, **body).get("aggregations", {}).get("t", {})
            buckets = found.get("buckets", [])
            if buckets:
                yield buckets
            after = found.get("after_key")
            if not buckets or after is None:
                return

    def _summaries(self, base: dict[str, Any] | None, since_ns: int | None, until_ns: int | None,
                   limit: int | None, offset: int) -> list[TraceSummary]:
        must: list[dict[str, Any]] = [base] if base else []
        if since_ns is not None or until_ns is not None:
            must.append(_started(since_ns, until_ns))
        ids = self._trace_ids({"bool": {"filter": must}}, limit, offset)
        found: dict[str, TraceSummary] = {}
        for start in range(0, len(ids), 1000):  # summaries in bounded requests
            found.update(self._summaries_of(ids[start:start + 1000]))
        summaries = [found[t] for t in ids if t in found
                     and (since_ns is None or found[t].start_ns >= since_ns)
                     and (until_ns is None or found[t].start_ns < until_ns)]
        summaries.sort(key=lambda s: s.start_ns, reverse=True)
        return summaries

    def _firsts(self, trace_ids: list[str]) -> dict[str, tuple[int, int]]:
        """Each trace's first start over all its spans, and how many spans it has."""
        out: dict[str, tuple[int, int]] = {}
        for i in range(0, len(trace_ids), 1000):
            chunk = trace_ids[i:i + 1000]
            body: dict[str, Any] = {"query": {"terms": {"trace_id": chunk}}, "size": 0, "aggs": {"t": {
                "terms": {"field": "trace_id", "size": len(chunk)},
                "aggs": {"start": {"min": {"field": "payscope.start_ns"}}}}}}
            if self._runtime():
                body["runtime_mappings"] = self._runtime()
            for b in self._search(self.traces_index, **body).get("aggregations", {}).get("t", {}).get("buckets", []):
                out[b["key"]] = (int(b["start"]["value"] or 0), b["doc_count"])
        return out

    def _starts_of(self, trace_ids: list[str]) -> dict[str, int]:
        """Each trace's first start, over all its spans."""
        return {t: start for t, (start, _) in self._firsts(trace_ids).items()}

    def _counted_in(self, since_ns: int | None, until_ns: int | None) -> list[tuple[str, int]]:
        """The traces whose first span starts in [since, until), with their span counts, by trace id: those with
        a span that starts in it, less those that started before it (a trace is in a window by its first start)."""
        firsts = self._firsts(sorted(self._all_trace_starts(_started(since_ns, until_ns))))
        return sorted((t, count) for t, (start, count) in firsts.items()
                      if (since_ns is None or start >= since_ns) and (until_ns is None or start < until_ns))

    def _starting_in(self, since_ns: int | None, until_ns: int | None) -> list[str]:
        return [t for t, _ in self._counted_in(since_ns, until_ns)]

    def sample_traces(self, since_ns: int, until_ns: int, limit: int | None) -> Sample:
        """Chosen in Elasticsearch: a ``terms`` aggregation over the spans that start in the window, ordered by
        the sample key, a number computed from the trace id; every shard computes the same key for a trace, so
        the merged order is exact. A trace with a span in the window may have started before it: those are left
        out by their first start, and more are asked for until ``limit`` remain or there are no more."""
        if limit is None:
            ids = self._starting_in(since_ns, until_ns)
            ids.sort(key=lambda t: (int(t[-SAMPLE_DIGITS:], 16) if _HEX.fullmatch(t) else _NO_KEY, t))
            return Sample(ids, len(ids), None)
        runtime = {**self._runtime(), "payscope.sample_key": {"type": "long", "script": {"source": _SAMPLE_KEY}}}
        asked = max(limit, 1)
        while True:
            aggs: dict[str, Any] = {
                "t": {"terms": {"field": "trace_id", "size": asked, "shard_size": asked,
                                "order": [{"by": "asc"}, {"_key": "asc"}]},
                      "aggs": {"by": {"min": {"field": "payscope.sample_key"}}}},
                "count": {"cardinality": {"field": "trace_id", "precision_threshold": 40_000}}}
            found = self._search(self.traces_index, query=_started(since_ns, until_ns), size=0,
                                 runtime_mappings=runtime, aggs=aggs).get("aggregations", {})
            candidates = [b["key"] for b in found.get("t", {}).get("buckets", [])]
            first = self._starts_of(candidates)
            ids = [t for t in candidates if since_ns <= first.get(t, since_ns - 1) < until_ns][:limit]
            if len(ids) >= limit or len(candidates) < asked or asked >= _MAX_BUCKETS:
                break
            asked = min(2 * asked, _MAX_BUCKETS)
        if len(ids) < limit:
            return Sample(ids, len(ids), limit)
        return Sample(ids, max(limit, int(found.get("count", {}).get("value") or 0)), limit)

    def rows_of(self, trace_ids: list[str], batch_size: int = 10_000) -> Iterator[list[SpanRow]]:
        batch: list[SpanRow] = []
        ordered = sorted({t.lower() for t in trace_ids})
        for i in range(0, len(ordered), 1000):
            pairs = self._spans_of(ordered[i:i + 1000], self._row_source())
            batch += sorted((row for _, row in pairs), key=lambda r: (r.trace_id, r.start_ns))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def trace_summary(self, trace_id: str) -> TraceSummary | None:
        return self._summaries_of([trace_id.lower()]).get(trace_id.lower())

    def trace_summaries(self, trace_ids: list[str]) -> dict[str, TraceSummary]:
        wanted = sorted({t.lower() for t in trace_ids})
        out: dict[str, TraceSummary] = {}
        for i in range(0, len(wanted), _SUMMARIES_AT_ONCE):
            out.update(self._summaries_of(wanted[i:i + _SUMMARIES_AT_ONCE]))
        return out

    def failed_traces(self, since_ns: int | None = None, until_ns: int | None = None,
                      limit: int | None = 100, offset: int = 0) -> list[TraceSummary]:
        return self._summaries(self._failed_query(), since_ns, until_ns, limit, offset)

    def traces(self, since_ns: int | None = None, until_ns: int | None = None,
               limit: int | None = 100, offset: int = 0) -> list[TraceSummary]:
        return self._summaries(None, since_ns, until_ns, limit, offset)

    def iter_rows(self, batch_size: int = 10_000, since_ns: int | None = None,
                  until_ns: int | None = None) -> Iterator[list[SpanRow]]:
        if since_ns is not None or until_ns is not None:
            yield from self.rows_of(self._starting_in(since_ns, until_ns), batch_size)
            return
        batch: list[SpanRow] = []
        sort = [{"trace_id": "asc"}, {"payscope.start_ns": "asc"}, {"span_id": "asc"}]  # as rows_of orders them
        for hit in self._span_hits({"match_all": {}}, sort, self._row_source()):
            batch.append(self._span_and_row(hit["_source"])[1])
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def iter_traces(self, derived_key: str | None = None, since_ns: int | None = None,
                    until_ns: int | None = None, batch_size: int = 10_000) -> Iterator[list[SpanRow] | bytes]:
        """Each trace's span count from an aggregation, in pages of traces by trace id; then, per page, the
        derivations under ``derived_key`` made from that many spans, and the spans of the traces that have
        none. A trace written meanwhile is read as it was counted or from its spans, never from a derivation
        of fewer spans."""
        if (derived_key is None or not self.keeps_derivations
                or not self._call(self._es.indices.exists, "read", index=DERIVED)):
            return super().iter_traces(derived_key, since_ns, until_ns, batch_size)
        return self._derived_or_spans(derived_key, since_ns, until_ns, batch_size)

    def _derived_or_spans(self, derived_key: str, since_ns: int | None, until_ns: int | None,
                          batch_size: int) -> Iterator[list[SpanRow] | bytes]:
        if since_ns is not None or until_ns is not None:
            counted = self._counted_in(since_ns, until_ns)
            pages: Iterable[list[tuple[str, int]]] = (counted[i:i + _MAX_TERMS]
                                                       for i in range(0, len(counted), _MAX_TERMS))
        else:
            pages = ([(b["key"]["t"], b["doc_count"]) for b in page]
                     for page in self._trace_buckets({"match_all": {}}, starts=False))
        for page in pages:
            yield from self._derived_page(derived_key, page, batch_size)

    def _derived_page(self, derived_key: str, page: list[tuple[str, int]],
                      batch_size: int) -> Iterator[list[SpanRow] | bytes]:
        """A page of (trace id, span count now), in order: each trace's derivation made from that many spans, else
        its spans."""
        exact = self._derivations(derived_key, dict(page))
        unread = [t for t, _ in page if t not in exact]
        spans = {rows[0].trace_id: rows for rows in group_traces(self.rows_of(unread, batch_size))}
        for trace_id, _ in page:
            item = exact.get(trace_id) or spans.get(trace_id)
            if item:
                yield item

    def traces_of(self, derived_key: str | None, trace_ids: list[str],
                  batch_size: int = 10_000) -> Iterator[list[SpanRow] | bytes]:
        """As :meth:`iter_traces`, a page of traces at a time: their span counts from an aggregation, then the
        derivations made from that many spans, and the spans of the traces that have none."""
        if (derived_key is None or not self.keeps_derivations
                or not self._call(self._es.indices.exists, "read", index=DERIVED)):
            yield from super().traces_of(derived_key, trace_ids, batch_size)
            return
        ids = sorted({t.lower() for t in trace_ids})
        for i in range(0, len(ids), _MAX_TERMS):
            counted = self._firsts(ids[i:i + _MAX_TERMS])  # the stored ones, with their span counts now
            yield from self._derived_page(derived_key, sorted((t, n) for t, (_, n) in counted.items()), batch_size)

    def _derivations(self, derived_key: str, counts: dict[str, int], bodies: bool = True) -> dict[str, bytes]:
        """The bodies (without ``bodies``, empty values) of those traces' derivations under ``derived_key`` that
        were made from as many spans as ``counts`` says each has now."""
        out: dict[str, bytes] = {}
        query = {"bool": {"filter": [{"term": {"key": derived_key}}, {"terms": {"trace_id": list(counts)}}]}}
        source = ["trace_id", "span_count", "body"] if bodies else ["trace_id", "span_count"]
        for hit in self._span_hits(query, source=source, index=DERIVED):
            doc = hit["_source"]
            if counts.get(doc.get("trace_id")) == doc.get("span_count"):
                out[doc["trace_id"]] = base64.b64decode(doc["body"]) if bodies else b""
        return out

    def underived(self, derived_key: str, after: Cursor, limit: int) -> tuple[list[str], Cursor]:
        """By trace id: the next ``limit`` stored traces (a ``composite`` page, with their span counts), less
        those with an exact derivation. The cursor is the last trace id looked at."""
        if not self.keeps_derivations:
            return [], None
        buckets = next(self._trace_buckets({"match_all": {}}, starts=False, after_trace=str(after) if after else None,
                                           size=limit), [])
        counts = {b["key"]["t"]: b["doc_count"] for b in buckets}
        exact = self._derivations(derived_key, counts, bodies=False) if counts else {}
        return [t for t in counts if t not in exact], (buckets[-1]["key"]["t"] if len(buckets) == limit else None)

    def rows_to_derive(self, trace_ids: list[str]) -> list[tuple[str, int, list[SpanRow]]]:
        if not self.keeps_derivations:
            return []
        return [(rows[0].trace_id, len(rows), rows) for rows in group_traces(self.rows_of(trace_ids))]

    def write_derived(self, derived_key: str, items: list[tuple[str, int, bytes]]) -> None:
        """Derivations are created, never overwritten, with an id of trace, span count and key: the same one
        made by two collectors is stored once; one made after a late span is another document."""
        if not items or not self.keeps_derivations or self._readonly:
            return
        now = iso_ns(time.time_ns())
        actions: list[dict[str, Any]] = []
        for trace_id, span_count, body in items:
            actions += [{"create": {"_index": DERIVED, "_id": f"{trace_id}-{span_count}-{derived_key}"}},
                        {"@timestamp": now, "trace_id": trace_id, "key": derived_key, "span_count": span_count,
                         "body": base64.b64encode(body).decode("ascii")}]
        self._bulk([_line(a) for a in actions])

    def _server_query(self) -> dict[str, Any]:
        kinds = [v for k in ("server", "consumer") for v in (_KINDS[k], k, f"SPAN_KIND_{k.upper()}")]
        return {"terms": {"kind": kinds}}

    def server_spans_around(self, service: str, time_ns: int, slack_ns: int,
                            longest_ns: int = 120_000_000_000) -> list[SpanRow]:
        query = {"bool": {"filter": [
            self._server_query(), {"term": {"payscope.service": service}},
            {"range": {"payscope.start_ns": {"gte": time_ns - longest_ns, "lte": time_ns + slack_ns}}},
            {"range": {"payscope.end_ns": {"gte": time_ns - slack_ns}}}]}}
        return [self._span_and_row(hit["_source"])[1] for hit in self._span_hits(query, source=self._row_source())]

    def traces_by_keys(self, keys: list[str]) -> dict[str, list[str]]:
        out: dict[str, set[str]] = {}
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            spans = self._search(self.traces_index, query={"terms": {"payscope.keys": chunk}}, size=0, aggs={
                "k": {"terms": {"field": "payscope.keys", "size": _MAX_TERMS, "include": chunk},
                      "aggs": {"t": {"terms": {"field": "trace_id", "size": 1000}}}}})
            for bucket in spans.get("aggregations", {}).get("k", {}).get("buckets", []):
                out.setdefault(bucket["key"], set()).update(b["key"] for b in bucket["t"]["buckets"])
            learned = self._search(KEYS, query={"terms": {"key": chunk}}, size=_MAX_TERMS)
            for hit in learned["hits"]["hits"]:
                out.setdefault(hit["_source"]["key"], set()).add(hit["_source"]["trace_id"])
        return {k: sorted(v) for k, v in out.items()}

    def traces_by_key(self, key: str) -> list[str]:
        return self.traces_by_keys([key]).get(key, [])

    def known_traces(self, trace_ids: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(trace_ids), _MAX_TERMS):
            chunk = trace_ids[start:start + _MAX_TERMS]
            result = self._search(self.traces_index, query={"terms": {"trace_id": chunk}}, size=0,
                                  aggs={"t": {"terms": {"field": "trace_id", "size": len(chunk)}}})
            out += [b["key"] for b in result.get("aggregations", {}).get("t", {}).get("buckets", [])]
        return out

    def server_services(self) -> list[str]:
        body: dict[str, Any] = {"query": self._server_query(), "size": 0,
                                "aggs": {"s": {"terms": {"field": "payscope.service", "size": _MAX_TERMS}}}}
        if self._runtime():
            body["runtime_mappings"] = self._runtime()
        result = self._search(self.traces_index, **body)
        return [b["key"] for b in result.get("aggregations", {}).get("s", {}).get("buckets", [])]

    def counts(self) -> dict[str, int]:
        spans = self._search(self.traces_index, size=0, track_total_hits=True,
                             aggs={"t": {"cardinality": {"field": "trace_id", "precision_threshold": 40000}}})
        logs = self._search(self.logs_index, size=0, track_total_hits=True)
        return {"spans": spans["hits"]["total"]["value"],
                "traces": int(spans.get("aggregations", {}).get("t", {}).get("value", 0)),
                "logs": logs["hits"]["total"]["value"]}

    # --- reading logs ------------------------------------------------------------------
    def logs_of_trace(self, trace_id: str) -> list[LogRecord]:
        return [r for _, r in self.search_logs(LogQuery(trace_id=trace_id, limit=None))]

    def search_logs(self, query: LogQuery) -> list[tuple[int, LogRecord]]:
        filters: list[dict[str, Any]] = []
        if query.service is not None:
            filters.append(_any_field(("payscope.service", "resource.attributes.service.name", "service.name"),
                                      query.service))
        if query.trace_id is not None:
            filters.append(_any_field(("trace_id", "trace.id"), query.trace_id.lower()))
        if query.severity is not None:
            filters.append(_any_field(("severity_text", "log.level"), query.severity))
        if query.text:
            filters.append({"bool": {"should": [{"wildcard": {"payscope.message": f"*{_escape(query.text)}*"}},
                                                {"match_phrase": {"message": query.text}},
                                                {"match_phrase": {"body.text": query.text}}],
                                     "minimum_should_match": 1}})
        if query.since_ns is not None or query.until_ns is not None:
            bounds: dict[str, Any] = {"format": "strict_date_optional_time_nanos"}
            if query.since_ns is not None:
                bounds["gte"] = iso_ns(query.since_ns)
            if query.until_ns is not None:
                bounds["lt"] = iso_ns(query.until_ns)
            filters.append({"range": {"@timestamp": bounds}})
        must_not: list[dict[str, Any]] = []
        if query.unlinked_only:
            must_not += [{"exists": {"field": "trace_id"}}, {"exists": {"field": "trace.id"}}]
        if query.source_prefix:
            filters.append({"prefix": {"payscope.source": query.source_prefix}})
        if query.attribute:
            filters.append({"exists": {"field": f"attributes.{query.attribute}"}})
        es_query = {"bool": {"filter": filters, "must_not": must_not}}
        limit = query.limit or None
        out: list[tuple[int, LogRecord]] = []
        after: list[Any] | None = None
        while limit is None or len(out) < limit:
            size = _PAGE if limit is None else min(_PAGE, limit - len(out))
            body: dict[str, Any] = {"query": es_query, "size": size,
                                    "sort": [{"@timestamp": "asc"}, {"payscope.log_id": "asc"}] if not self.foreign_logs
                                    else [{"@timestamp": "asc"}]}
            if after is not None:
                body["search_after"] = after
            hits = self._search(self.logs_index, **body)["hits"]["hits"]
            out += [_log_of(hit) for hit in hits]
            if len(hits) < size:
                break
            after = hits[-1]["sort"]
        out.sort(key=lambda pair: pair[1].time_ns)
        return out


# --- documents -------------------------------------------------------------------------

def _started(since_ns: int | None, until_ns: int | None) -> dict[str, Any]:
    """Spans that start in [since, until)."""
    bounds: dict[str, Any] = {"format": "strict_date_optional_time_nanos"}
    if since_ns is not None:
        bounds["gte"] = iso_ns(since_ns)
    if until_ns is not None:
        bounds["lt"] = iso_ns(until_ns)
    return {"range": {"@timestamp": bounds}}


# the sample key of api.Sample, in the search; an id that is not hexadecimal sorts last
_NO_KEY = 2 ** 63 - 1
_HEX = re.compile(r"[0-9a-f]+")
_SAMPLE_KEY = (f"def f = doc['trace_id']; if (f.size() == 0) return; String t = f.value; int n = t.length(); "
               f"String tail = n > {SAMPLE_DIGITS} ? t.substring(n - {SAMPLE_DIGITS}) : t; "
               f"try {{ emit(Long.parseLong(tail, 16)); }} catch (NumberFormatException e) {{ emit({_NO_KEY}L); }}")


def _create(index: str, doc_id: str) -> bytes:
    """The bulk action line that creates a document (the id encoded as JSON: an imported file's ids may hold
    anything, and one must never end the line early)."""
    return f'{{"create":{{"_index":"{index}","_id":{_encode(doc_id)}}}}}\n'.encode("utf-8", "surrogatepass")


def _span_line(span: Span, row: SpanRow, resource: bytes) -> bytes:
    """A span's document as a line of a bulk request; ``resource``: its resource's attributes already encoded
    (once for the spans of a request, which share them)."""
    doc: dict[str, Any] = {
        "@timestamp": iso_ns(span.start_ns), "trace_id": span.trace_id, "span_id": span.span_id,
        "name": span.name, "kind": _KINDS.get(span.kind, "Unspecified"), "duration": span.end_ns - span.start_ns,
        "status": {"code": _STATUS.get(span.status_code, "Unset")},
        "attributes": span.attributes,
        "payscope": {
            "service": row.service, "start_ns": row.start_ns, "end_ns": row.end_ns, "operation": row.operation,
            "attempt": row.attempt, "idempotency_key": row.idempotency_key,
            **{k: v for k, v in (
                ("error_class", row.error_class), ("callee", row.peer), ("method", row.method),
                ("http_status", row.http_status), ("timeout_connect_ms", row.timeout_connect_ms),
                ("timeout_read_ms", row.timeout_read_ms), ("timeout_total_ms", row.timeout_total_ms),
                ("timeout_source", row.timeout_source), ("retry_max", row.retry_max), ("amount", row.amount),
                ("keys", list(row.keys) or None), ("caller_budget_ms", row.caller_budget_ms),
                ("fault", row.fault)) if v is not None},
        },
    }
    if span.parent_id:
        doc["parent_span_id"] = span.parent_id
    if span.status_message:
        doc["status"]["message"] = span.status_message
    if span.events:
        doc["events"] = span.events
    return _line(doc)[:-2] + b',"resource":{"attributes":' + resource + b"}}\n"  # before the document's last }


def _span_of(source: dict[str, Any]) -> Span:
    mine = _obj(source.get("payscope"))
    resource = _flat(_nested(source, "resource.attributes") or {})
    start = int(mine["start_ns"]) if "start_ns" in mine else parse_ns(source.get("@timestamp"))
    end = int(mine["end_ns"]) if "end_ns" in mine else start + int(source.get("duration") or 0)
    code, message = _status(source.get("status"))
    events: list[dict[str, Any]] = source["events"] if isinstance(source.get("events"), list) else []
    return Span(str(source.get("trace_id", "")).lower(), str(source.get("span_id", "")).lower(),
                str(source["parent_span_id"]).lower() if source.get("parent_span_id") else None,
                str(mine.get("service") or resource.get("service.name") or "unknown"), str(source.get("name", "")),
                _kind(source.get("kind")), start, end, code, message, _flat(source.get("attributes") or {}),
                events, resource)


def _row_of(span: Span, mine: dict[str, Any]) -> SpanRow:
    return SpanRow(span.trace_id, span.span_id, span.parent_id, span.service, span.name, span.kind, span.start_ns,
                   span.end_ns, span.status_code, span.status_message, mine.get("error_class"), mine["operation"],
                   mine.get("callee"), mine.get("method"), mine.get("http_status"), int(mine.get("attempt", 0)),
                   bool(mine.get("idempotency_key")), mine.get("timeout_connect_ms"), mine.get("timeout_read_ms"),
                   mine.get("timeout_total_ms"), mine.get("timeout_source"), mine.get("retry_max"),
                   mine.get("amount"), tuple(mine.get("keys") or ()), mine.get("caller_budget_ms"), mine.get("fault"))


def _start_of(source: dict[str, Any]) -> int:
    mine = source.get("payscope") or {}
    return int(mine["start_ns"]) if "start_ns" in mine else parse_ns(source.get("@timestamp"))


def _end_of(source: dict[str, Any]) -> int:
    mine = source.get("payscope") or {}
    return int(mine["end_ns"]) if "end_ns" in mine else _start_of(source) + int(source.get("duration") or 0)


def _service_of(source: dict[str, Any]) -> str:
    mine = source.get("payscope") or {}
    return str(mine.get("service") or _flat(_nested(source, "resource.attributes") or {}).get("service.name")
               or "unknown")


def _log_doc(record: LogRecord, lid: int) -> dict[str, Any]:
    resource = {"service.name": record.service}
    if record.host:
        resource["host.name"] = record.host
    doc: dict[str, Any] = {
        "@timestamp": iso_ns(record.time_ns), "body": {"text": record.message},
        "attributes": record.attributes, "resource": {"attributes": resource},
        "payscope": {"log_id": lid, "time_ns": record.time_ns, "source": record.source, "service": record.service,
                     "message": record.message[:32_000], "link_method": record.link_method,
                     "link_confidence": record.link_confidence},
    }
    if record.severity:
        doc["severity_text"] = record.severity
    if record.trace_id:
        doc["trace_id"] = record.trace_id
    if record.span_id:
        doc["span_id"] = record.span_id
    return doc


def _log_of(hit: dict[str, Any]) -> tuple[int, LogRecord]:
    source = hit["_source"]
    mine = _obj(source.get("payscope"))
    resource = _flat(_nested(source, "resource.attributes") or {})
    body = source.get("body")
    message = (body.get("text") if isinstance(body, dict) else body) or source.get("message") or ""
    if isinstance(message, dict):
        message = json.dumps(message, separators=(",", ":"))
    time_ns = int(mine["time_ns"]) if "time_ns" in mine else parse_ns(source.get("@timestamp"))
    trace_id = source.get("trace_id") or _nested(source, "trace.id")
    span_id = source.get("span_id") or _nested(source, "span.id")
    service = mine.get("service") or resource.get("service.name") or _nested(source, "service.name") or "unknown"
    host = resource.get("host.name") or _nested(source, "host.name") or ""
    lid = int(mine["log_id"]) if "log_id" in mine else int.from_bytes(
        hashlib.blake2b(str(hit.get("_id")).encode(), digest_size=8).digest(), "big") >> 1
    return lid, LogRecord(
        time_ns=time_ns, service=str(service), message=str(message),
        severity=str(source.get("severity_text") or _nested(source, "log.level") or ""), host=str(host),
        attributes=_flat(source.get("attributes") or {}), source=str(mine.get("source") or hit.get("_index", "")),
        trace_id=str(trace_id).lower() if trace_id else None, span_id=str(span_id).lower() if span_id else None,
        link_method=str(mine.get("link_method") or ("trace_id" if trace_id else "none")),
        link_confidence=float(mine.get("link_confidence") or (1.0 if trace_id else 0.0)))


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _any_field(fields: tuple[str, ...], value: str) -> dict[str, Any]:
    return {"bool": {"should": [{"term": {f: value}} for f in fields], "minimum_should_match": 1}}


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "*?\\" else c for c in text)


def _hosts(netloc: str) -> list[str]:
    """HOST:PORT of each node in ``a:9200,b:9200`` (9200 when no port is given)."""
    out = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        host, colon, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not colon:
            host, port = item, "9200"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreError(f"{item!r} in the Elasticsearch URL is not HOST:PORT")
        out.append(f"{host}:{port}")
    return out


def _safe(url: str) -> str:
    """A URL without the credentials someone may have put in it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{tail}"


def _reason(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("root_cause"):
            error = error["root_cause"][0]  # "all shards failed" says less than why the first one did
        if isinstance(error, dict):
            return f"{error.get('type', 'error')}: {str(error.get('reason', ''))[:200]}"
    return str(getattr(exc, "message", "error"))[:200]


def _transport_reason(exc: Any) -> str:
    text = str(getattr(exc, "message", "") or exc)
    for marker, said in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                         ("nodename nor servname", "unknown host"), ("timed out", "timed out"),
                         ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate is not trusted (set PAYSCOPE_ES_CA_FILE)"),
                         ("SSL", "TLS failed (is it https://?)")):
        if marker in text:
            return said
    return text.splitlines()[0][:200] if text else type(exc).__name__
