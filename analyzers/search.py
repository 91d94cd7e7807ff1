"""Searching failed transactions as Jaeger's search does: by attribute, by log text, by duration.

A query is words and conditions, space-separated (quotes keep spaces in a value):

- ``key=value``, ``key!=value``: a span of the transaction has (or no span has) that attribute value;
- ``key>=N``, ``key<=N``, ``key>N``, ``key<N``: a span's numeric attribute compares so
  (``http.status_code>=500``); ``service``, ``name`` and ``http.status_code`` also match the span's
  service, its name and either status attribute;
- ``duration>=200ms``, ``duration<2s`` (or ``min:200ms``, ``max:2s``): the transaction's duration;
- ``log:text``: a log line of the transaction contains ``text``;
- any other word: in the row (entry, failing hop, business keys, trace id) or in one of its log lines.

Every term must hold. :func:`matching` is the one place that decides whether a row matches.
"""

from __future__ import annotations

import operator
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from payscope.collector.store import LogQuery, Store
from payscope.errors import InputError
from payscope.model import Span
from payscope.timeparse import parse_duration_s

_TRACES_AT_ONCE = 500  # transactions whose spans a search with conditions reads together
_CONDITION = re.compile(r"^([\w.@/-]+?)(>=|<=|!=|=|>|<|:)(.*)$")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_ALIASES = {"http.status_code": ("http.status_code", "http.response.status_code"),
            "http.response.status_code": ("http.status_code", "http.response.status_code")}


@dataclass
class Query:
    words: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    conditions: list[tuple[str, str, str]] = field(default_factory=list)
    min_ms: float | None = None
    max_ms: float | None = None

    @property
    def needs_spans(self) -> bool:
        return bool(self.conditions)


def parse(text: str) -> Query:
    """A query from what was typed; InputError naming the term that cannot be read."""
    try:
        terms = shlex.split(text)
    except ValueError:  # an unclosed quote: take the words as they are
        terms = text.split()
    query = Query()
    for term in terms:
        match = _CONDITION.match(term)
        if not match or not match.group(3):
            query.words.append(term)
            continue
        key, op, value = match.groups()
        if key in ("duration", "min", "max"):
            if op == ":":
                op = ">=" if key == "min" else "<="
            if op not in _OPS:
                raise InputError(f"search {term!r}: a duration compares with >=, <=, > or <")
            ms = round(parse_duration_s(value, f"search {term!r}:") * 1000, 6)  # 504.574ms is 504.574
            if op in (">=", ">"):
                query.min_ms = ms
            else:
                query.max_ms = ms
        elif key == "log" and op in (":", "="):
            query.logs.append(value)
        elif op == ":":
            query.words.append(term)
        else:
            if op in _OPS:
                try:
                    float(value)
                except ValueError:
                    raise InputError(f"search {term!r}: {op} compares numbers, and {value!r} is not one") from None
            query.conditions.append((key, op, value))
    return query


def _values(span: Span, key: str) -> list[Any]:
    if key in ("service", "service.name"):
        return [span.service]
    if key in ("name", "operation"):
        return [span.name]
    keys = _ALIASES.get(key, (key,))
    return [span.attributes[k] for k in keys if k in span.attributes]


def _holds(span: Span, key: str, op: str, value: str) -> bool:
    for found in _values(span, key):
        if op == "=" and str(found).lower() == value.lower():
            return True
        if op in _OPS:
            try:
                if _OPS[op](float(found), float(value)):
                    return True
            except (TypeError, ValueError):
                continue
    return False


def _row_text(row: dict[str, Any]) -> str:
    return " ".join([row["entry"], row["failing_hop"] or "", *row["keys"], row["trace_id"]]).lower()


def matching(store: Store, rows: list[dict[str, Any]], query: Query) -> list[dict[str, Any]]:
    """The failure rows (of ``views.failure_rows``) that every term of ``query`` holds for, in their order."""
    logged: dict[str, set[str]] = {}
    for text in {*query.words, *query.logs}:  # one search of the logs a term, not one a transaction
        logged[text] = {r.trace_id for _, r in store.search_logs(LogQuery(text=text, limit=None))
                        if r.trace_id}
    out = []
    for row in rows:
        tid = row["trace_id"]
        if query.min_ms is not None and row["duration_ms"] < query.min_ms:
            continue
        if query.max_ms is not None and row["duration_ms"] > query.max_ms:
            continue
        if any(tid not in logged[text] for text in query.logs):
            continue
        text = _row_text(row)
        if any(word.lower() not in text and tid not in logged[word] for word in query.words):
            continue
        out.append(row)
    if query.needs_spans:  # the rows left, their traces read a page at a time
        kept = []
        for at in range(0, len(out), _TRACES_AT_ONCE):
            page = out[at:at + _TRACES_AT_ONCE]
            spans = store.traces_whole([row["trace_id"] for row in page])
            kept += [row for row in page if _conditions_hold(spans.get(row["trace_id"], []), query.conditions)]
        out = kept
    return out


def _conditions_hold(spans: list[Span], conditions: list[tuple[str, str, str]]) -> bool:
    for key, op, value in conditions:
        if op == "!=":
            if any(_holds(s, key, "=", value) for s in spans):
                return False
        elif not any(_holds(s, key, op, value) for s in spans):
            return False
    return True
