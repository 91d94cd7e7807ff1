"""`payscope tui`: walk failed transactions, their spans, logs and findings, and every edge's timeouts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Static
from textual.worker import Worker, WorkerState

from payscope.analyzers.views import fix_text
from payscope.collector.store import Store
from payscope.errors import PayscopeError
from payscope.report import call_times, hop_lines, journey_lines
from payscope.timeparse import format_ms, format_ns, parse_window

from . import data
from .messages import CompareLoaded, EdgesLoaded, FailuresLoaded, TransactionLoaded, error_line
from .widgets import Waterfall


class Loading(Screen[None]):
    """A screen whose data comes from workers: a worker that fails shows one line, never a traceback."""

    @on(Worker.StateChanged)
    def worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.notify(error_line(event.worker.error), severity="error", timeout=10)

HELP = """\
[b]Failed transactions[/b]
  up/down, j/k   move            enter   open the transaction
  /              search: an id, words, key=value, http.status_code>=500,
                 duration>=2s, log:TEXT
  o              cycle the outcome filter       s   filter by service
  p              cycle the order problem filter (charged twice ...)
  r              refresh now (new failures also appear by themselves)
  t              edges and timeouts             c   compare: which hop lost the time
  q              quit

[b]Transaction[/b]
  up/down, j/k   move through spans             space, left/right   fold a subtree
  tab            next panel (spans, details, findings, logs)
  d              span details in place of findings and logs (narrow terminals)
  c              copy the trace id              e   write a Markdown report
  o              the order's journey (all its traces, its charges)
  escape         back

[b]Compare[/b]
  the slowest stretch of the data against the one before it, hop by hop
  w              type the windows: BASELINE INCIDENT, each FROM..TO (RFC 3339 or Unix seconds)
  escape         back

[b]Edges and timeouts[/b]
  up/down, enter   pick an edge: its latency histogram, with the timeout line
  escape           back

Bars: # server, = client, ~ the gap of a call (client time outside its server span: the network,
a queue, connection set-up), x error, | where the client's timeout would expire.
Marks: !timeout/!http_5xx ... error class, late = finished after its caller gave up, retry.
Bold: the critical path.  ? this help, from anywhere.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        yield VerticalScroll(Static(HELP, id="help-text"), id="help")


class FailuresScreen(Loading):
    BINDINGS = [
        Binding("slash", "search", "search"), Binding("o", "cycle_outcome", "outcome"),
        Binding("p", "cycle_problem", "problem"),
        Binding("s", "service", "service"), Binding("r", "refresh", "refresh"),
        Binding("t", "edges", "edges"), Binding("c", "compare", "compare"),
        Binding("j", "cursor(1)", show=False), Binding("k", "cursor(-1)", show=False),
    ]
    # fixed widths, so that the table does not jump about as pages of rows arrive; what an on-call engineer
    # reads first comes first and fits 80 columns (time, outcome in full, order, failing hop, duration)
    COLUMNS = (("time", 12), ("outcome", 16), ("order", 12), ("failing hop", 20), ("duration", 8),
               ("trace id", 32), ("entry", 30), ("findings", 60))

    def __init__(self) -> None:
        super().__init__()
        self.flt = data.Filter()
        self.rows: list[dict[str, Any]] = []
        self.total = 0
        self.by_outcome: dict[str, int] = {}
        self.by_problem: dict[str, int] = {}
        self.limit = data.PAGE
        self.input_mode = "search"

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="status")
        yield Input(placeholder="id, words, key=value, status>=500, duration>=2s, log:text; enter, escape",
                    id="search")
        table: DataTable[str] = DataTable(id="failures", cursor_type="row", zebra_stripes=False)
        for label, width in self.COLUMNS:
            table.add_column(label, width=width)
        yield table
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#search", Input).display = False
        self.query_one(DataTable).focus()
        self.load()
        self.set_interval(self.app.refresh_seconds, self.refresh_when_idle)  # type: ignore[attr-defined]

    def refresh_when_idle(self) -> None:
        # a slow analysis is left to finish: starting another would cancel it, and none would ever show
        if not any(w.group == "failures" and w.is_running for w in self.workers):
            self.load()

    @work(thread=True, exclusive=True, group="failures", exit_on_error=False)
    def load(self) -> None:
        page = data.failures(self.app.source, self.flt, self.limit)  # type: ignore[attr-defined]
        self.post_message(FailuresLoaded(page))

    @on(FailuresLoaded)
    def loaded(self, message: FailuresLoaded) -> None:
        self.total, self.by_outcome = message.page.total, message.page.by_outcome
        self.by_problem = message.page.by_problem
        self.show_rows(message.page.rows)

    @on(DataTable.RowHighlighted, "#failures")
    def page_on(self, event: DataTable.RowHighlighted) -> None:
        # the cursor at the last row loaded, with more in the store: the next page joins the list
        if event.cursor_row >= len(self.rows) - 1 and len(self.rows) < self.total and len(self.rows) >= self.limit:
            self.limit += data.PAGE
            self.load()

    def show_rows(self, rows: list[dict[str, Any]]) -> None:
        table = self.query_one(DataTable)
        keep = self.rows[table.cursor_row]["trace_id"] if self.rows and 0 <= table.cursor_row < len(self.rows) \
            else None
        if [r["trace_id"] for r in rows] != [r["trace_id"] for r in self.rows]:
            self.rows = rows
            table.clear()
            for row in rows:
                table.add_row(row["time"][11:23], row["outcome"], ", ".join(row["keys"][:2]) or "-",
                              row["failing_hop"] or "-", row["duration"], row["trace_id"], row["entry"][:30],
                              ",".join(row["problems"] + row["findings"]) or "-", key=row["trace_id"])
            if keep is not None:  # the cursor stays on its transaction when new failures arrive above it
                for i, row in enumerate(rows):
                    if row["trace_id"] == keep:
                        table.move_cursor(row=i)
                        break
        shown = f"{len(rows)} of {self.total}" if self.total > len(rows) else f"{self.total}"
        self.query_one("#status", Static).update(
            f"{shown} failed transactions ({self.flt.describe()})  ?: help")

    def action_cursor(self, delta: int) -> None:
        table = self.query_one(DataTable)
        table.move_cursor(row=max(0, table.cursor_row + delta))

    def action_search(self) -> None:
        self._ask("search")

    def action_service(self) -> None:
        self._ask("service")

    def _ask(self, mode: str) -> None:
        self.input_mode = mode
        box = self.query_one("#search", Input)
        box.placeholder = ("id, words, key=value, http.status_code>=500, duration>=2s, log:text" if mode == "search"
                           else "service name") + \
            "; enter to apply, empty to clear, escape to cancel"
        box.value = (self.flt.text if mode == "search" else self.flt.service) or ""
        box.display = True
        box.focus()

    @on(Input.Submitted, "#search")
    def apply_input(self, event: Input.Submitted) -> None:
        value = event.value.strip() or None
        if self.input_mode == "search":
            self.flt.text = value
        else:
            self.flt.service = value
        self.limit = data.PAGE
        event.input.display = False
        self.query_one(DataTable).focus()
        self.load()

    def key_escape(self) -> None:
        box = self.query_one("#search", Input)
        if box.display:
            box.display = False
            self.query_one(DataTable).focus()

    def action_cycle_outcome(self) -> None:
        self.flt.outcome = data.next_outcome(self.flt.outcome, self.by_outcome)
        self.limit = data.PAGE
        self.load()

    def action_cycle_problem(self) -> None:
        self.flt.problem = data.next_problem(self.flt.problem, self.by_problem)
        self.limit = data.PAGE
        self.load()

    def action_refresh(self) -> None:
        self.load()

    def action_edges(self) -> None:
        self.app.push_screen(EdgesScreen())

    def action_compare(self) -> None:
        self.app.push_screen(CompareScreen())

    @on(DataTable.RowSelected, "#failures")
    def open_transaction(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.app.push_screen(TransactionScreen(event.row_key.value))


NARROW = 100  # columns below which the transaction screen drops its span details panel


class TransactionScreen(Loading):
    BINDINGS = [Binding("escape", "app.pop_screen", "back"), Binding("c", "copy", "copy trace id"),
                Binding("e", "export", "report"), Binding("d", "details", "span details"),
                Binding("o", "journey", "order journey", show=False)]

    def __init__(self, trace_id: str) -> None:
        super().__init__()
        self.trace_id = trace_id
        self.view: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"loading {self.trace_id} ...", id="summary")
        yield Static("", id="journey", markup=False)
        yield Vertical(id="waterfall-box")
        with Horizontal(id="lower"):
            yield VerticalScroll(Static("", id="details", markup=False), id="details-box")
            with Vertical(id="right"):
                yield VerticalScroll(Static("", id="findings", markup=False), id="findings-box")
                yield DataTable(id="logs", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        width = self.app.size.width
        self.narrow = width < NARROW
        self.set_class(self.narrow, "narrow")
        logs: DataTable[str] = self.query_one("#logs", DataTable)
        # the message takes what the panel leaves; a narrow terminal keeps time, level and message only
        columns = [("time", 12), ("level", 5)] if self.narrow else \
            [("time", 12), ("service", 10), ("linked by", 13), ("level", 5)]
        panel = width - 4 if self.narrow else width * 3 // 4 - 4
        message = max(30, panel - sum(w + 2 for _, w in columns) - 2)
        for label, w in [*columns, ("message", message)]:
            logs.add_column(label, width=w)
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self) -> None:
        self.post_message(TransactionLoaded(data.transaction(self.app.source, self.trace_id)))  # type: ignore[attr-defined]

    @on(TransactionLoaded)
    def loaded(self, message: TransactionLoaded) -> None:
        self.show(message.view)

    def show(self, view: dict[str, Any]) -> None:
        self.view = view
        txs = "; ".join(f"{t['outcome']}" + (f" at {t['failing_hop']['caller']} -> {t['failing_hop']['callee']}"
                                              if t["failing_hop"] else "")
                        + (f" [{t['error_class']}]" if t["error_class"] else "")
                        + (f" keys {','.join(t['business_keys'])}" if t["business_keys"] else "")
                        for t in view["transactions"])
        self.query_one("#summary", Static).update(
            f"trace {', '.join(view['trace_ids'])}: {txs}  ({len(view['spans'])} spans, {view['duration_ms']:.0f} ms)")
        journey = self.query_one("#journey", Static)
        if view["order"] or view["journey"]:  # an order's traces in time order, or the order this one is part of
            journey.update("\n".join(journey_lines(view)[:8] if view["order"] else [
                f"part of order {view['journey']['order']} ({view['journey']['traces']} traces): o shows its journey"]))
        journey.display = bool(view["order"] or view["journey"])
        waterfall = Waterfall(view["spans"], view["duration_ms"], id="waterfall")
        self.query_one("#waterfall-box").mount(waterfall)
        waterfall.focus()
        logs = self.query_one("#logs", DataTable)
        for r in view["logs"]:
            link = r["link"]["method"] + (f" {r['link']['confidence']:.2f}" if r["link"]["method"] not in
                                          ("none", "ambiguous") else "")
            first = r["message"].splitlines()[0] if r["message"] else ""
            if self.narrow:
                logs.add_row(r["time"][11:23], r["level"], f"{r['service']}: {first}", key=str(id(r)))
            else:
                logs.add_row(r["time"][11:23], r["service"], link, r["level"], first, key=str(id(r)))
        if not view["logs"]:
            logs.add_row(*([""] * (len(logs.columns) - 1)), "no log lines linked to this transaction")
        findings = [f"[{f['severity']}] {f['kind']}\n  fix: {fix_text(f)}\n  {f['summary']}"
                    for f in view["findings"]]  # worst first, each with its fix before its story
        self.query_one("#findings", Static).update("\n".join(findings) or "no findings for this transaction",
                                                   )

    @on(Waterfall.Selected)
    def show_span(self, event: Waterfall.Selected) -> None:
        row = event.row
        lines = [f"{row['service']}: {row['name']} ({row['kind']})",
                 f"status {row['status']}" + (f" [{row['error_class']}]" if row["error_class"] else "")
                 + (f" {row['message']}" if row["message"] else ""),
                 f"start +{row['offset_ms']:.1f} ms, duration {row['duration_ms']:.1f} ms"
                 + (f", timeout {row['timeout_ms']:.0f} ms" if row.get("timeout_ms") else "")]
        if row.get("call"):  # the call's own times, as `show` gives them (a span that retried: its last attempt's)
            lines.append(f"call to {row['call']['callee']}: {call_times(row['call'])}")
        lines.append("")
        for key, value in sorted((row.get("attributes") or {}).items()):
            lines.append(f"{key} = {value}")
        for event_row in row.get("events") or []:
            attrs = event_row.get("attributes") or {}
            lines.append(f"event {event_row.get('name')}: {attrs.get('exception.type', '')} "
                         f"{attrs.get('exception.message', '')}".rstrip())
        self.query_one("#details", Static).update("\n".join(lines))
        self._highlight_logs(row["span_id"])

    def _highlight_logs(self, span_id: str) -> None:
        if not self.view:
            return
        logs = self.query_one("#logs", DataTable)
        for i, r in enumerate(self.view["logs"]):
            if r.get("span_id") == span_id:
                logs.move_cursor(row=i)
                break

    def action_details(self) -> None:
        """On a narrow terminal, the selected span's details in place of the findings and logs, and back."""
        self.toggle_class("details")

    def action_journey(self) -> None:
        """The whole order this trace is part of: its traces, charges and what the customer was told."""
        if self.view and self.view["journey"]:
            self.app.push_screen(TransactionScreen(self.view["journey"]["order"]))
        else:
            self.notify("no other trace of this order" if self.view else "still loading")

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.trace_id)
        self.notify(f"copied {self.trace_id}")

    def action_export(self) -> None:
        if not self.view:
            return
        path = Path(self.app.report_dir) / f"payscope-{self.trace_id[:16]}.md"  # type: ignore[attr-defined]
        from payscope.report import markdown_report

        path.write_text(markdown_report(self.view))
        self.notify(f"wrote {path}")


class EdgesScreen(Loading):
    BINDINGS = [Binding("escape", "app.pop_screen", "back")]

    def __init__(self) -> None:
        super().__init__()
        self.latencies: dict[tuple[str, str, str], list[float]] = {}
        self.edges: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("analysing every edge ...", id="edges-status")
        table: DataTable[str] = DataTable(id="edges", cursor_type="row")
        for label, width in (("caller -> callee", 24), ("timeout", 8), ("recommend", 9), ("findings", 30),
                             ("p50", 7), ("p99", 7), ("p99.9", 7), ("timeout rate", 12), ("source", 11),
                             ("operation", 30)):
            table.add_column(label, width=width)
        yield table
        yield VerticalScroll(Static("", id="histogram"), id="histogram-box")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self) -> None:
        self.post_message(EdgesLoaded(*data.edges(self.app.source)))  # type: ignore[attr-defined]

    @on(EdgesLoaded)
    def loaded(self, message: EdgesLoaded) -> None:
        self.show(message.document, message.latencies)

    def show(self, document: dict[str, Any], latencies: dict[tuple[str, str, str], list[float]]) -> None:
        self.latencies = latencies
        self.edges = document["edges"]
        kinds: dict[tuple[str, str, str], list[str]] = {}
        for f in document["findings"]:
            e = f["edge"]
            kinds.setdefault((e["caller"], e["callee"], e["operation"]), []).append(f["kind"])
        table = self.query_one(DataTable)

        fmt = format_ms
        for e in self.edges:
            t, lat = e["timeout"], e["latency_ms"]
            key = (e["caller"], e["callee"], e["operation"])
            table.add_row(f"{e['caller']} -> {e['callee']}",
                          (">=" if t["source"] == "lower_bound" else "") + fmt(t["value_ms"]),
                          fmt(e["recommended_timeout_ms"]), ",".join(kinds.get(key, [])) or "-",
                          fmt(lat["p50"]), fmt(lat["p99"]), fmt(lat["p99.9"]), f"{e['timeout_rate']:.1%}",
                          t["source"], e["operation"][:30])
        self.query_one("#edges-status", Static).update(
            f"{len(self.edges)} edges; enter shows an edge's latency histogram with its timeout")

    @on(DataTable.RowHighlighted, "#edges")
    @on(DataTable.RowSelected, "#edges")
    def show_histogram(self, event: Any) -> None:
        if not self.edges or event.cursor_row >= len(self.edges):
            return
        e = self.edges[event.cursor_row]
        values = self.latencies.get((e["caller"], e["callee"], e["operation"]), [])
        timeout = e["timeout"]["value_ms"] if e["timeout"]["source"] != "lower_bound" else None
        lines = [f"{e['caller']} -> {e['callee']} {e['operation']}: {len(values)} successful calls as the caller "
                 f"saw them; recommended timeout {format_ms(e['recommended_timeout_ms'])}"]
        lines += data.histogram(values, timeout, recommended_ms=e["recommended_timeout_ms"])
        self.query_one("#histogram", Static).update("\n".join(lines))


class CompareScreen(Loading):
    """`payscope compare` on screen: the hops that lost the time, best explanation first."""

    BINDINGS = [Binding("escape", "app.pop_screen", "back"), Binding("w", "windows", "windows")]

    def __init__(self) -> None:
        super().__init__()
        self.document: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("comparing ...", id="compare-status")
        yield Input(placeholder="BASELINE INCIDENT, each FROM..TO; enter to compare, escape to cancel",
                    id="windows")
        table: DataTable[str] = DataTable(id="hops", cursor_type="row")
        for label, width in (("#", 3), ("component", 10), ("service", 24), ("edge", 40), ("baseline p50", 12),
                             ("incident p50", 12), ("explains", 10), ("consequence", 11)):
            table.add_column(label, width=width)
        yield table
        yield VerticalScroll(Static("", id="hop-sentence"), id="hop-box")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#windows", Input).display = False
        self.query_one(DataTable).focus()
        self.load(None)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self, windows: tuple[tuple[int, int], tuple[int, int]] | None) -> None:
        self.post_message(CompareLoaded(data.compare(self.app.source, windows)))  # type: ignore[attr-defined]

    @on(CompareLoaded)
    def show(self, message: CompareLoaded) -> None:
        self.document = doc = message.document
        table = self.query_one(DataTable)
        table.clear()
        for i, hop in enumerate(doc["hops"], 1):
            edge = hop["edge"]
            table.add_row(str(i), hop["component"], hop["service"],
                          f"{edge['caller']} -> {edge['callee']}" if edge else "-",
                          format_ms(hop["baseline_ms"]["p50"]), format_ms(hop["incident_ms"]["p50"]),
                          format_ms(hop["explains_ms"]), "yes" if hop.get("consequence") else "")
        base, inc = doc["baseline"], doc["incident"]
        self.query_one("#compare-status", Static).update(
            f"baseline {format_ns(base['from_ns'])[11:19]}-{format_ns(base['to_ns'])[11:19]} "
            f"({base['entry_requests']} requests) against incident {format_ns(inc['from_ns'])[11:19]}-"
            f"{format_ns(inc['to_ns'])[11:19]} ({inc['entry_requests']}): {len(doc['hops'])} hops above noise; "
            "w: other windows")
        self.query_one("#hop-sentence", Static).update(
            "\n".join(hop_lines(doc["hops"][0])) if doc["hops"] else "no hop grew above noise: " + doc["noise"])

    @on(DataTable.RowHighlighted, "#hops")
    def show_sentence(self, event: DataTable.RowHighlighted) -> None:
        if self.document and event.cursor_row < len(self.document["hops"]):
            hop = self.document["hops"][event.cursor_row]
            self.query_one("#hop-sentence", Static).update("\n".join(hop_lines(hop)))

    def action_windows(self) -> None:
        box = self.query_one("#windows", Input)
        box.display = True
        box.focus()

    @on(Input.Submitted, "#windows")
    def apply_windows(self, event: Input.Submitted) -> None:
        event.input.display = False
        self.query_one(DataTable).focus()
        parts = event.value.split()
        try:
            if len(parts) != 2:
                raise PayscopeError("type two windows: BASELINE INCIDENT, each FROM..TO")
            windows = (parse_window(parts[0], "baseline"), parse_window(parts[1], "incident"))
        except PayscopeError as exc:
            self.notify(str(exc), severity="error")
            return
        self.load(windows)


class PayscopeApp(App[None]):
    """The TUI; ``store`` is any payscope store (opened read-only)."""

    CSS_PATH = "app.tcss"
    TITLE = "payscope"
    BINDINGS = [Binding("q", "quit", "quit"), Binding("question_mark", "help", "help")]

    def __init__(self, store: Store, *, refresh_seconds: float = 2.0, report_dir: str | None = None,
                 since: str | None = None, until: str | None = None, sample: int | None = None) -> None:
        super().__init__()
        self.store = store
        self.source = data.Source(store, since, until, sample)
        self.refresh_seconds = refresh_seconds
        self.report_dir = report_dir or os.getcwd()
        self.sub_title = Path(str(getattr(store, "url", ""))).name
        if since or until or sample:
            self.sub_title += f" · {self.source.describe()}"

    def on_mount(self) -> None:
        self.push_screen(FailuresScreen())

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


def build(store_url: str | None, **kwargs: Any) -> PayscopeApp:
    """The app as the CLI and the tests start it."""
    from payscope.collector.store import open_store

    return PayscopeApp(open_store(store_url, readonly=True), **kwargs)
