"""The payscope command line: one Typer app, a thin layer over the collector and analyzers."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console

from payscope import __version__
from payscope.errors import InputError, PayscopeError, StoreError

if TYPE_CHECKING:
    from payscope.collector.store import Store

app = typer.Typer(
    name="payscope",
    help="Find out why payments fail: traces, logs, timeouts and retries across your services.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
import_app = typer.Typer(help="Import telemetry files into the store.", no_args_is_help=True)
app.add_typer(import_app, name="import")
recommend_app = typer.Typer(help="Recommend settings from what was recorded.", no_args_is_help=True)
app.add_typer(recommend_app, name="recommend")
ingest_app = typer.Typer(help="Ingest configs (and logs) that explain the traces.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StoreOption = Annotated[
    Optional[str],
    typer.Option("--store", envvar="PAYSCOPE_STORE",
                 help="Store: a file path (embedded, default ./payscope.db), or es://HOST:9200 / https://HOST:9200 "
                      "(Elasticsearch; credentials from PAYSCOPE_ES_API_KEY or PAYSCOPE_ES_USERNAME and "
                      "PAYSCOPE_ES_PASSWORD, CA from PAYSCOPE_ES_CA_FILE)."),
]
TracesIndexOption = Annotated[
    Optional[str],
    typer.Option("--traces-index", envvar="PAYSCOPE_ES_TRACES_INDEX", metavar="INDEX",
                 help="Elasticsearch: read spans another pipeline wrote (traces-generic.otel-default)."),
]
LogsIndexOption = Annotated[
    Optional[str],
    typer.Option("--logs-index", envvar="PAYSCOPE_ES_LOGS_INDEX", metavar="INDEX",
                 help="Elasticsearch: read logs another pipeline wrote (logs-generic.otel-default, filebeat-*)."),
]
FormatOption = Annotated[str, typer.Option("--format", "-f", help="Output format: table or json.")]
WindowSince = Annotated[Optional[str], typer.Option(
    "--since", help="Only the traces that started in the last DURATION (30m, 1h, 2d) or from an ISO time: only "
                    "they are read from the store.")]
WindowUntil = Annotated[Optional[str], typer.Option(
    "--until", help="Only the traces that started before this ISO time, or DURATION ago.")]
AnalysisSample = Annotated[Optional[int], typer.Option(
    "--sample", help="At most this many traces read (default: every trace), chosen in the store by trace id as a "
                     "ratio sampler keeps them; the output says how many of how many were read.", show_default=False)]


def _indices(store: str | None, traces_index: str | None, logs_index: str | None) -> str | None:
    """The store URL with the indices to read, for Elasticsearch; a file path must not be given them."""
    if not (traces_index or logs_index):
        return store
    from urllib.parse import urlencode

    from payscope.collector.store import resolve_store_url

    url = resolve_store_url(store)
    if not url.startswith(("es://", "http://", "https://")):
        raise PayscopeError("--traces-index and --logs-index need an Elasticsearch --store (es://HOST:9200)")
    query = urlencode({k: v for k, v in (("traces", traces_index), ("logs", logs_index)) if v})
    return url + ("&" if "?" in url else "?") + query


def _open_for_analysis(store: str | None, traces_index: str | None, logs_index: str | None) -> Store:
    """The store, read-only, for a command that builds one analysis from it, answers and ends. Cyclic garbage
    collection is off from here to the end of the process (`memory.no_cycle_collection_until_exit` says why)."""
    from payscope.analyzers.memory import no_cycle_collection_until_exit
    from payscope.collector.store import open_store

    no_cycle_collection_until_exit()
    return open_store(_indices(store, traces_index, logs_index), readonly=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"payscope {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """payscope: why do payments fail?"""


def _window(since: str | None, until: str | None) -> tuple[int | None, int | None] | None:
    """The window of trace start times ``--since`` and ``--until`` name now (None: every trace)."""
    from payscope.timeparse import start_window

    return start_window(since, until, time.time_ns())


def _sample(sample: int | None) -> int | None:
    """The limit ``--sample`` sets on the traces an analysis reads (None: every trace)."""
    if sample is not None and sample < 0:
        raise PayscopeError(f"--sample {sample} must be 0 (every trace) or more")
    return sample or None


LARGE_STORE_TRACES = 250_000  # above this, reading every trace takes minutes and more memory than a laptop spares


def whole_read_note(opened: Store, window: tuple[int | None, int | None] | None, limit: int | None,
                    large: int = LARGE_STORE_TRACES, bound: str | None = None) -> str | None:
    """What to say before an analysis reads every trace of a store that holds more than ``large`` (None: say
    nothing: a sample or a window was asked for, or the store is not that large); ``bound``: the option of
    the command that bounds the read (default ``--sample``, or ``--since``)."""
    if limit is not None or window is not None:
        return None
    traces = opened.counts()["traces"]
    if traces <= large:
        return None
    return (f"payscope: reading all {traces:,} traces of {opened.url}; "
            f"{bound or f'--sample {large // 2:,} (or --since 1h)'} reads a bounded part")


def _say_whole_read(opened: Store, window: tuple[int | None, int | None] | None, limit: int | None,
                    bound: str | None = None) -> None:
    """Say :func:`whole_read_note` on stderr, when there is something to say."""
    if note := whole_read_note(opened, window, limit, bound=bound):
        err.print(note, markup=False)


def _check_format(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise PayscopeError(f"--format {value!r} is not one of {', '.join(allowed)}")
    return value


def _emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


# --- run -----------------------------------------------------------------------

@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[OPTIONS] -- CMD ARGS...")
def run(
    ctx: typer.Context,
    service: Annotated[Optional[str], typer.Option(help="Service name (default: OTEL_SERVICE_NAME or the program).")
                       ] = None,
    collector: Annotated[Optional[str], typer.Option(help="Collector URL (default http://127.0.0.1:4318).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="Settings file (default: ./payscope.toml when there is one, or PAYSCOPE_CONFIG).")] = None,
    emit_sw8: Annotated[bool, typer.Option(
        "--emit-sw8", help="Send SkyWalking's sw8 header on outbound calls too (PAYSCOPE_EMIT_SW8=1).")] = False,
) -> None:
    """Run a Python program instrumented, without changing it: payscope run --service order -- python app.py"""
    from payscope.instrumentation.sw8 import EMIT
    from payscope.instrumentation.wrapper import run as run_instrumented

    if emit_sw8:
        os.environ[EMIT] = "1"
    run_instrumented(list(ctx.args), service, collector, config)


@app.command()
def sidecar(
    listen: Annotated[str, typer.Option(help="Address to listen on, HOST:PORT (callers call this).")],
    service: Annotated[str, typer.Option(help="The service's name in traces.")],
    upstream: Annotated[Optional[str], typer.Option(help="The service behind it, HOST:PORT.")] = None,
    egress: Annotated[bool, typer.Option(
        "--egress", help="Instead, a forward proxy for the service's own outbound calls (point the service's "
        "HTTP_PROXY here): client spans for its calls.")] = False,
    collector: Annotated[Optional[str], typer.Option(help="Collector URL (default http://127.0.0.1:4318).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the service's answer before a 504.")] = 60.0,
    delay: Annotated[Optional[list[str]], typer.Option(
        metavar="DELAY@SHARE[@ROUTE]", help="Fault injection: delay a share of requests, e.g. 300ms@10%.")] = None,
    abort: Annotated[Optional[list[str]], typer.Option(
        metavar="STATUS@SHARE[@ROUTE]", help="Fault injection: answer a share of requests, e.g. 503@5%.")] = None,
    reset: Annotated[Optional[list[str]], typer.Option(
        metavar="@SHARE[@ROUTE]", help="Fault injection: reset a share of connections, e.g. @1%.")] = None,
    admin: Annotated[Optional[str], typer.Option(
        metavar="127.0.0.1:PORT", help="Admin endpoint to change the faults at run time (this machine only).")
    ] = None,
    emit_sw8: Annotated[bool, typer.Option(
        "--emit-sw8", help="Send SkyWalking's sw8 header on too (PAYSCOPE_EMIT_SW8=1).")] = False,
) -> None:
    """HTTP proxy in front of a service payscope cannot instrument: its requests join the trace."""
    from payscope.collector.service import parse_listen
    from payscope.instrumentation.faults import FaultError, Faults, parse
    from payscope.instrumentation.sidecar import run as run_sidecar

    if timeout <= 0:
        raise InputError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    if egress == (upstream is not None):
        raise InputError("give --upstream HOST:PORT (a proxy in front of the service) or --egress (a proxy for its "
                         "outbound calls), one of the two")
    try:
        rules = [parse(kind, spec) for kind, specs in (("delay", delay), ("abort", abort), ("reset", reset))
                 for spec in specs or []]
    except FaultError as exc:
        raise InputError(str(exc)) from None
    admin_at = parse_listen(admin, "--admin") if admin else None
    if emit_sw8:
        from payscope.instrumentation.sw8 import EMIT

        os.environ[EMIT] = "1"
    if admin_at is not None and admin_at[0] not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(f"--admin {admin}: the admin endpoint binds this machine only (127.0.0.1)")
    run_sidecar(parse_listen(listen, "--listen"), parse_listen(upstream, "--upstream") if upstream else None, service,
                collector or os.environ.get("PAYSCOPE_COLLECTOR") or "http://127.0.0.1:4318", timeout,
                Faults(rules), admin_at)


# --- collect -------------------------------------------------------------------

@app.command()
def collect(
    store: StoreOption = None,
    http: Annotated[str, typer.Option(help="OTLP/HTTP listen address; 'off' to disable.")] = "127.0.0.1:4318",
    grpc: Annotated[str, typer.Option(help="OTLP/gRPC listen address; 'off' to disable.")] = "127.0.0.1:4317",
    token_file: Annotated[Optional[Path], typer.Option(
        help="A file holding the bearer token clients must send (Authorization: Bearer ...); required to "
             "listen on any address but this machine's.")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="TLS certificate (PEM), with --tls-key.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="TLS private key (PEM), with --tls-cert.")] = None,
    spool: Annotated[Optional[Path], typer.Option(
        help="Elasticsearch only: where acknowledged batches wait while Elasticsearch cannot take them, "
             "at most 1 GiB (default ~/.cache/payscope/spool).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        help="Processes that decode large requests (default: one per core; 0: decode in the receiving "
             "threads).", min=0, max=64)] = None,
    settle_seconds: Annotated[float, typer.Option(
        help="A trace that gets no new span for this long has its calls worked out once and stored, so that "
             "analysing it later need not read its spans again.", min=0.0)] = 10.0,
) -> None:
    """Receive OTLP spans and logs (HTTP and gRPC) and store them until stopped (Ctrl-C)."""
    from payscope.analyzers.derived import Deriver
    from payscope.collector.decoding import default_workers
    from payscope.collector.service import Access, read_token, run_collector
    from payscope.collector.store import open_store

    access = Access(read_token(token_file) if token_file else None, tls_cert, tls_key)
    http_at, grpc_at = None if http == "off" else http, None if grpc == "off" else grpc
    from payscope.collector.service import parse_listen

    for option, value in (("--http", http_at), ("--grpc", grpc_at)):  # refused before the store is made
        if value:
            access.check(parse_listen(value, option)[0], option)
    with open_store(store, spool=spool or Path.home() / ".cache" / "payscope" / "spool") as opened:
        run_collector(opened, http_at, grpc_at, access, default_workers() if workers is None else workers,
                      Deriver(opened), settle_seconds)


# --- import ----------------------------------------------------------------------

@import_app.command("traces")
def import_traces(
    files: Annotated[list[Path], typer.Argument(help="OTLP JSON, Jaeger JSON or Zipkin v2 JSON files (gzip too).")],
    store: StoreOption = None,
    output_format: FormatOption = "table",
) -> None:
    """Import trace files; the format is detected, importing a file twice stores it once."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

    from payscope.collector.importers import ImportReport, check_gzip, file_size, read_trace_file
    from payscope.collector.store import open_store

    _check_format(output_format, ("table", "json"))
    for path in files:  # a missing or corrupt file is refused before anything is stored
        if not path.exists():
            raise PayscopeError(f"{path}: no such file")
        check_gzip(path)
    reports = []
    imported: set[str] = set()  # the traces that got a new span
    with open_store(store) as opened:
        for path in files:
            if not path.exists():
                raise PayscopeError(f"{path}: no such file")
            report = ImportReport(str(path))
            total = file_size(path)
            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                          console=err, transient=True, disable=total < 2_000_000) as progress:
                task = progress.add_task(f"importing {path.name}", total=total)
                def advance(n: int, task: TaskID = task) -> None:
                    progress.advance(task, n)

                for batch in read_trace_file(path, report, advance):
                    new_spans, _ = opened.write(batch.spans, batch.logs)
                    if new_spans:
                        imported.update(s.row.trace_id for s in batch.spans)
                    report.spans += len(batch.spans)
                    report.logs += len(batch.logs)
                    report.new_spans += new_spans
            reports.append(report)
        if imported:  # the imported traces are whole: their calls worked out once, for every analysis
            from payscope.analyzers.derived import derive

            ordered = sorted(imported)
            try:
                for at in range(0, len(ordered), 1_000):
                    derive(opened, ordered[at:at + 1_000])
            except StoreError as exc:  # what was imported is stored: the analysis reads its spans instead
                err.print(f"payscope import: the spans are stored, but working out their calls failed ({exc}); "
                          "the analysis reads them from their spans")
    if not any(r.spans or r.logs for r in reports) and any(r.rejected for r in reports):
        first = next(p for r in reports for p in r.problems)
        rejected = sum(r.rejected for r in reports)
        raise PayscopeError(f"nothing could be imported: {first}"
                            + (f" (and {rejected - 1} more rejected)" if rejected > 1 else ""))
    if output_format == "json":
        _emit_json({"files": [vars(r) for r in reports]})
        return
    for r in reports:
        out.print(f"{r.path}: {r.format}, {r.spans} spans ({r.new_spans} new)"
                  + (f", {r.logs} log records" if r.logs else "")
                  + (f", {r.rejected} rejected" if r.rejected else ""))
        for problem in r.problems:
            err.print(f"  rejected {problem}")


@ingest_app.command("config")
def ingest_config(
    files: Annotated[list[Path], typer.Argument(help="nginx, Envoy (YAML/JSON) or gunicorn config files.")],
    service: Annotated[Optional[str], typer.Option(
        help="The service the config belongs to (default: nginx / envoy; required for gunicorn).")] = None,
    store: StoreOption = None,
    output_format: FormatOption = "table",
) -> None:
    """Read the timeouts a proxy or server config declares and map them onto edges."""
    from payscope.analyzers.declared import META_KEY
    from payscope.collector.configs import detect_and_parse
    from payscope.collector.store import open_store

    _check_format(output_format, ("table", "json"))
    found = []
    for path in files:
        if not path.exists():
            raise PayscopeError(f"{path}: no such file")
        found.extend(detect_and_parse(path, service))
    with open_store(store) as opened:
        kept = [d for d in json.loads(opened.get_meta(META_KEY) or "[]")
                if d.get("file") not in {str(p) for p in files}]
        opened.set_meta(META_KEY, json.dumps(kept + [d.to_json() for d in found]))
    if output_format == "json":
        _emit_json({"declared": [d.to_json() for d in found]})
        return
    for d in found:
        extra = "".join([f", connect {d.connect_ms:.0f} ms" if d.connect_ms is not None else "",
                         f", {d.retries} retries" if d.retries is not None else "",
                         f", total {d.total_ms:.0f} ms" if d.total_ms is not None and d.total_ms != d.timeout_ms
                         else ""])
        timeout = f"{d.timeout_ms:.0f} ms" if d.timeout_ms is not None else "none"
        out.print(f"{d.caller} -> {d.callee}: timeout {timeout}{extra}  ({d.file}, {d.where})", markup=False)


@ingest_app.command("logs")
def ingest_logs(
    files: Annotated[list[str], typer.Argument(help="Log files, directories, globs, or - for stdin (gzip too).")],
    service: Annotated[Optional[str], typer.Option(help="Service the lines come from (default: file name).")
                       ] = None,
    log_format: Annotated[str, typer.Option("--log-format", help="auto, json, logfmt, text, java, nginx-access, "
                                            "nginx-error, envoy or gunicorn.")] = "auto",
    nginx_format: Annotated[Optional[str], typer.Option(help="A custom nginx log_format string.")] = None,
    tz: Annotated[Optional[str], typer.Option(help="Zone of timestamps that name none (UTC, +02:00, Europe/Paris).")
                  ] = None,
    clock_offset: Annotated[Optional[str], typer.Option(
        help="How far this host's clock runs ahead (e.g. 150ms); subtracted from every time.")] = None,
    no_link: Annotated[bool, typer.Option("--no-link", help="Store without linking to traces.")] = False,
    workers: Annotated[Optional[int], typer.Option(
        help="Processes that parse, link and store long files (default: one per core; 0: all here).", min=0,
        max=64)] = None,
    store: StoreOption = None,
    output_format: FormatOption = "table",
) -> None:
    """Parse log files, link each line to its transaction, and report what was read, linked and not."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from payscope.analyzers.correlate import Linker
    from payscope.collector import logparse
    from payscope.collector.decoding import default_workers
    from payscope.collector.logingest import ingest
    from payscope.collector.store import open_store
    from payscope.timeparse import parse_duration_s

    _check_format(output_format, ("table", "json"))
    if log_format != "auto" and log_format not in logparse.FORMATS:
        raise PayscopeError(f"--log-format {log_format!r} is not one of auto, {', '.join(logparse.FORMATS)}")
    zone = logparse.parse_tz(tz)
    offset = int(parse_duration_s(clock_offset, "--clock-offset") * 1e9) if clock_offset else 0
    with open_store(store) as opened, Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err,
                                               transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("reading logs")

        def on_progress(source: str, records: int) -> None:
            progress.update(task, description=f"{source}: {records} records")

        report = ingest(opened, files, service=service, fmt=log_format, tz=zone, clock_offset_ns=offset,
                        nginx_format=nginx_format, linker=None if no_link else Linker(opened),
                        on_progress=on_progress, workers=default_workers() if workers is None else workers)
    doc = report.to_json()
    if output_format == "json":
        _emit_json(doc)
        return
    formats = ", ".join(f"{n} {fmt}" for fmt, n in sorted(doc["by_format"].items())) or "none"
    linked = ", ".join(f"{n} by {m}" for m, n in sorted(doc["linked"].items())) or "none"
    out.print(f"{doc['lines']} lines read, {doc['records']} records ({formats}); {doc['stored']} new stored"
              + (f", {doc['joined']} already stored from OTLP (now with both sources)" if doc["joined"] else ""),
              markup=False)
    out.print(f"linked: {linked}", markup=False)
    if doc["unparsed"]:
        out.print(f"{doc['unparsed']} lines not parsed; the first:", markup=False)
        for f in report.files:
            for problem in f.problems:
                out.print(f"  {problem}", markup=False)


@app.command()
def logs(
    store: StoreOption = None,
    traces_index: TracesIndexOption = None,
    logs_index: LogsIndexOption = None,
    service: Annotated[Optional[str], typer.Option(help="Only this service.")] = None,
    trace: Annotated[Optional[str], typer.Option(help="Only lines linked to this trace id.")] = None,
    order: Annotated[Optional[str], typer.Option(help="Only lines of the transactions of this order/payment id.")
                     ] = None,
    grep: Annotated[Optional[str], typer.Option(help="Only lines containing this text.")] = None,
    level: Annotated[Optional[str], typer.Option(help="Only this level (ERROR, WARN, INFO, ...).")] = None,
    since: Annotated[Optional[str], typer.Option(help="From this ISO time, or the last DURATION (30m, 1h, 2d).")
                     ] = None,
    until: Annotated[Optional[str], typer.Option(help="Until this ISO time, or DURATION ago.")] = None,
    unlinked: Annotated[bool, typer.Option(help="Only lines linked to no transaction.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many (0 for all).")] = 100,
    output_format: FormatOption = "table",
) -> None:
    """Log records with how each was linked to its transaction."""
    from payscope.analyzers.views import log_json
    from payscope.collector.store import LogQuery, open_store
    from payscope.timeparse import parse_since_ns

    _check_format(output_format, ("table", "json"))
    if limit < 0:
        raise PayscopeError(f"--limit {limit} must be 0 (all) or more")
    now = time.time_ns()
    with open_store(_indices(store, traces_index, logs_index), readonly=True) as opened:
        traces: list[str | None] = [trace.lower() if trace else None]
        if order:
            traces = list(opened.traces_by_key(order))
            if not traces:
                raise PayscopeError(f"no transaction with order or payment id {order!r} in {opened.url}")
        found = []
        for trace_id in traces:
            query = LogQuery(service=service, trace_id=trace_id, text=grep, severity=level.upper() if level else None,
                             since_ns=parse_since_ns(since, now, "--since") if since else None,
                             until_ns=parse_since_ns(until, now, "--until") if until else None,
                             unlinked_only=unlinked, limit=limit or None)
            found += [record for _, record in opened.search_logs(query)]
    found.sort(key=lambda r: r.time_ns)
    records = [log_json(r) for r in (found[:limit] if limit else found)]
    if output_format == "json":
        _emit_json({"records": records})
        return
    if not records:  # said apart from the lines, so that a pipe reads none
        err.print(f"payscope logs: no log line in {opened.url} matches", markup=False)
    for r in records:
        link = r["link"]
        how = link["method"]
        if how not in ("none", "ambiguous"):
            how += f" {link['confidence']:.2f}"
        out.print(f"{r['time']} {r['service']:<12} {r['level']:<5} {r['message']}  [{r['source']}; {how}]",
                  markup=False)


# --- failures / show -----------------------------------------------------------

@app.command()
def failures(
    store: StoreOption = None,
    traces_index: TracesIndexOption = None,
    logs_index: LogsIndexOption = None,
    since: Annotated[Optional[str], typer.Option(help="Only the last DURATION (30m, 1h, 2d), or from an ISO time.")
                     ] = None,
    outcome: Annotated[Optional[str], typer.Option(
        help="Only this outcome: timeout, failed, declined, late_success, duplicate_charge or recovered.")] = None,
    service: Annotated[Optional[str], typer.Option(help="Only transactions that cross this service.")] = None,
    problem: Annotated[Optional[str], typer.Option(
        help="Only the transactions of orders left inconsistent, ok ones too: charged_but_failed, charged_twice, "
             "paid_without_charge, a TCC or saga anomaly (suspension, empty_rollback, repeated_confirm, "
             "repeated_cancel, compensation_missing), or any.")] = None,
    search: Annotated[Optional[str], typer.Option(
        "--search", "-s", help="Only those matching every term: key=value, http.status_code>=500, duration>=2s, "
                               "log:TEXT, or words in the entry, hop, keys or logs (as the TUI's /).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (0 for all).")] = 50,
    output_format: FormatOption = "table",
) -> None:
    """Failed transactions, newest first, one a line."""
    from payscope.analyzers.loader import load
    from payscope.analyzers.search import matching
    from payscope.analyzers.search import parse as parse_search
    from payscope.analyzers.views import FAILURE_OUTCOMES, PROBLEMS, failure_rows
    from payscope.timeparse import parse_since_ns

    _check_format(output_format, ("table", "json"))
    if limit < 0:
        raise PayscopeError(f"--limit {limit} must be 0 (all) or more")
    if outcome is not None and outcome not in FAILURE_OUTCOMES:
        raise PayscopeError(f"--outcome {outcome!r} is not one of {', '.join(FAILURE_OUTCOMES)}")
    if problem is not None and problem not in PROBLEMS:
        raise PayscopeError(f"--problem {problem!r} is not one of {', '.join(PROBLEMS)}")
    since_ns = parse_since_ns(since, time.time_ns()) if since else None
    # the traces that started since then, and only they, are read and analysed: as `tui --since` and
    # `analyze --since` read them, so that all three give each transaction the same outcome and findings
    window = None if since_ns is None else (since_ns, None)
    query = parse_search(search) if search else None
    with _open_for_analysis(store, traces_index, logs_index) as opened:
        _say_whole_read(opened, window, None, bound="--since 1h")
        analysis = _held_until_exit(load(opened, window=window))
        if query is None:
            rows = failure_rows(opened, analysis, since_ns=since_ns, limit=limit or None, outcome=outcome,
                                service=service, problem=problem)
        else:
            rows = matching(opened, failure_rows(opened, analysis, since_ns=since_ns, limit=None,
                                                 outcome=outcome, service=service, problem=problem),
                            query)[:limit or None]
    if output_format == "json":
        _emit_json({"failures": rows})
        return
    if not rows:
        out.print("no failed transactions" + (f" since {since}" if since else "")
                  + (f" with outcome {outcome}" if outcome else "") + (f" through {service}" if service else "")
                  + (f" of orders with {problem}" if problem else "")
                  + (f" matching {search!r}" if search else ""))
        return
    out.print(f"{'time':<29} {'outcome':<16} {'order':<14} {'failing hop':<32} {'error':<10} {'duration':>9}  "
              f"{'trace id':<32}  entry", markup=False)
    for row in rows:
        out.print(f"{row['time']:<29} {row['outcome']:<16} {row['order'] or '-':<14} {row['failing_hop'] or '-':<32} "
                  f"{row['error_class'] or '-':<10} {row['duration']:>9}  {row['trace_id']:<32}  {row['entry']}"
                  + (f"  ({', '.join(row['problems'])})" if row["problems"] else ""), markup=False)


@app.command()
def show(
    transaction: Annotated[str, typer.Argument(metavar="ID", help="Trace id, order id or payment id.")],
    store: StoreOption = None,
    traces_index: TracesIndexOption = None,
    logs_index: LogsIndexOption = None,
    output_format: FormatOption = "table",
    since: WindowSince = None,
    until: WindowUntil = None,
    sample: AnalysisSample = None,
) -> None:
    """One transaction: a waterfall of its spans with status and errors, and the findings it is evidence of (of
    the whole store, or of the window and sample given: as `tui` with the same options shows it)."""
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import journey_trace_ids, resolve_trace_ids, transaction_view

    _check_format(output_format, ("table", "json"))
    window, limit = _window(since, until), _sample(sample)
    with _open_for_analysis(store, traces_index, logs_index) as opened:
        trace_ids = resolve_trace_ids(opened, transaction)  # an unknown id is refused before anything is read
        _say_whole_read(opened, window, limit)
        # with a window or a sample, the transaction's orders are still judged on every trace of theirs
        including = journey_trace_ids(opened, trace_ids) if window or limit else None
        analysis = _held_until_exit(load(opened, window=window, sample=limit, including=including))
        view = transaction_view(opened, analysis, transaction)
    if output_format == "json":
        _emit_json(view)
        return
    from payscope.report import render_waterfall

    out.print(render_waterfall(view), markup=False)


# --- analyze / recommend ---------------------------------------------------------

@app.command()
def analyze(
    store: StoreOption = None,
    traces_index: TracesIndexOption = None,
    logs_index: LogsIndexOption = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table, json or markdown.")] = "table",
    fail_on: Annotated[Optional[str], typer.Option(
        "--fail-on", help="Exit 1 when a finding at or above this severity exists (low, medium, high, critical).")
    ] = None,
    since: WindowSince = None,
    until: WindowUntil = None,
    sample: AnalysisSample = None,
) -> None:
    """Timeout and retry findings over everything in the store (or the traces of a window of time)."""
    from payscope import report
    from payscope.analyzers.findings import SEVERITIES, severity_at_least
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import analysis_document

    _check_format(output_format, ("table", "json", "markdown"))
    if fail_on is not None and fail_on not in SEVERITIES:
        raise PayscopeError(f"--fail-on {fail_on!r} is not one of {', '.join(SEVERITIES)}")
    window, limit = _window(since, until), _sample(sample)
    with _open_for_analysis(store, traces_index, logs_index) as opened:
        _say_whole_read(opened, window, limit)
        document = analysis_document(_held_until_exit(load(opened, window=window, sample=limit)))
    if output_format == "json":
        _emit_json(document)
    elif output_format == "markdown":
        sys.stdout.write(report.markdown(document))
    else:
        report.print_table(document, out)
    if fail_on and any(severity_at_least(f["severity"], fail_on) for f in document["findings"]):
        raise typer.Exit(1)


@app.command()
def reconcile(
    store: StoreOption = None,
    traces_index: TracesIndexOption = None,
    logs_index: LogsIndexOption = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table, csv or json.")] = "table",
    since: WindowSince = None,
    until: WindowUntil = None,
) -> None:
    """The orders finance should look at: charged but failed, charged twice, paid without a charge (of the whole
    store, or of the traces that started in a window of time: each order judged on its traces there, as `analyze`
    and `failures` with the same window judge it)."""
    from payscope import report
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import window_json

    _check_format(output_format, ("table", "csv", "json"))
    window = _window(since, until)
    with _open_for_analysis(store, traces_index, logs_index) as opened:
        _say_whole_read(opened, window, None, bound="--since 24h")
        analysis = _held_until_exit(load(opened, window=window))
        found = [o.to_json() for o in analysis.mismatched()]
    read = window_json(analysis)
    if output_format == "json":
        _emit_json({"orders": found, "counts": report.mismatch_counts(found), "window": read})
    elif output_format == "csv":
        sys.stdout.write(report.reconcile_csv(found))
    else:
        if said := report.window_text(read):
            out.print(said, markup=False)
        for line in report.reconcile_lines(found):
            out.print(line, markup=False)


@app.command()
def chaos(
    scenario: Annotated[Path, typer.Argument(help="The experiment: SCENARIO.toml (faults, traffic, expectations).")],
    store: StoreOption = None,
    collector: Annotated[Optional[str], typer.Option(
        help="Collector the fault-injecting sidecar exports to (default PAYSCOPE_COLLECTOR or "
        "http://127.0.0.1:4318).")] = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
) -> None:
    """Inject faults in front of a service, drive traffic, and report how timeouts and retries behaved;
    exit 1 when the scenario's expectations fail."""
    from payscope import chaos as chaos_run
    from payscope import report
    from payscope.collector.store import resolve_store_url

    _check_format(output_format, ("table", "json"))
    experiment = chaos_run.load_scenario(scenario)
    document = chaos_run.run(experiment, resolve_store_url(store), collector or os.environ.get("PAYSCOPE_COLLECTOR")
                             or "http://127.0.0.1:4318", say=lambda line: err.print(f"payscope chaos: {line}",
                                                                                   markup=False))
    if output_format == "json":
        _emit_json(document)
    else:
        for line in report.chaos_lines(document):
            out.print(line, markup=False)
    if not document["passed"]:
        raise typer.Exit(1)


@app.command()
def compare(
    incident: Annotated[str, typer.Option(help="The incident window, FROM..TO (RFC 3339 or Unix seconds).")],
    baseline: Annotated[Optional[str], typer.Option(
        help="The healthy window, FROM..TO (default: as long as the incident, just before it).")] = None,
    store: StoreOption = None,
    traces_index: TracesIndexOption = None,
    logs_index: LogsIndexOption = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table, json or markdown.")] = "table",
    sample: Annotated[Optional[int], typer.Option(
        help="At most this many traces read from each window (default 5,000), chosen in the store by trace "
             "id as a ratio sampler keeps them; 0 reads every trace.", show_default=False)] = None,
) -> None:
    """Which hop lost the time between a healthy window and an incident, and whether network or code."""
    from payscope.analyzers.compare import SAMPLE
    from payscope.analyzers.compare import compare as compare_windows
    from payscope.analyzers.loader import load_sampled

    _check_format(output_format, ("table", "json", "markdown"))
    from payscope.timeparse import parse_window

    inc = parse_window(incident, "--incident")
    base = parse_window(baseline, "--baseline") if baseline else (2 * inc[0] - inc[1], inc[0])
    if base[0] < inc[1] and inc[0] < base[1]:
        raise PayscopeError("--baseline and --incident overlap: compare two separate windows")
    limit = SAMPLE if sample is None else _sample(sample)
    with _open_for_analysis(store, traces_index, logs_index) as opened:
        analysis, (base_sample, inc_sample) = _held_until_exit(load_sampled(opened, [base, inc], limit))
        document = compare_windows(analysis, base, inc, (base_sample, inc_sample))
    for label, window in (("baseline", document["baseline"]), ("incident", document["incident"])):
        if not window["entry_requests"]:
            raise PayscopeError(f"the --{label} window holds no entry requests in {opened.url}")
    if output_format == "json":
        _emit_json(document)
        return
    from payscope.report import compare_lines

    lines = compare_lines(document)
    if output_format == "markdown":
        sys.stdout.write("# payscope compare\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    else:
        out.print("\n".join(lines), markup=False)


@recommend_app.command("timeouts")
def recommend_timeouts(
    store: StoreOption = None,
    traces_index: TracesIndexOption = None,
    logs_index: LogsIndexOption = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table, json or yaml.")] = "table",
    simulate: Annotated[bool, typer.Option("--simulate", help="Replay recorded latencies under the "
                                           "current and recommended settings.")] = False,
    snippets: Annotated[bool, typer.Option("--snippets", help="Print config snippets per edge.")] = False,
    since: WindowSince = None,
    until: WindowUntil = None,
    sample: AnalysisSample = None,
) -> None:
    """Per-edge timeouts and retries from the healthy latency tail, deadlines shrinking down the chain."""
    from payscope import report
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import recommendation_document

    _check_format(output_format, ("table", "json", "yaml"))
    window, limit = _window(since, until), _sample(sample)
    with _open_for_analysis(store, traces_index, logs_index) as opened:
        _say_whole_read(opened, window, limit)
        document = recommendation_document(_held_until_exit(load(opened, window=window, sample=limit)),
                                           simulate=simulate)
    if output_format == "json":
        _emit_json(document)
    elif output_format == "yaml":
        sys.stdout.write(report.yaml(document))
    else:
        report.print_recommendations(document, out, snippets=snippets)


# --- tui --------------------------------------------------------------------------

@app.command()
def tui(store: StoreOption = None, traces_index: TracesIndexOption = None,
        logs_index: LogsIndexOption = None, since: WindowSince = None, until: WindowUntil = None,
        sample: AnalysisSample = None) -> None:
    """Walk failed transactions in the terminal: waterfall, logs, findings, edges and timeouts (of every trace,
    or of those that started in a window: a DURATION moves with the clock as new data arrives)."""
    from payscope.tui.app import build

    _window(since, until)  # refused here, before the screen is taken
    build(_indices(store, traces_index, logs_index), since=since, until=until, sample=_sample(sample)).run()


# --- demo --------------------------------------------------------------------------

@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of traffic (a sale peak in the middle).")] = 60.0,
    keep_running: Annotated[bool, typer.Option("--keep-running", help="Leave the system up after the traffic.")
                            ] = False,
    fixed: Annotated[bool, typer.Option("--fixed", help="Run again with payscope's recommendations; "
                                        "measure before and after.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the traffic and the bank's latency.")] = 1,
    store: StoreOption = None,
) -> None:
    """Start a real payment system with bad timeouts under payscope, drive it, and investigate it."""
    from payscope import demo as demo_mod
    from payscope import report
    from payscope.analyzers.compare import compare as compare_windows
    from payscope.analyzers.loader import load
    from payscope.analyzers.views import analysis_document, recommendation_document
    from payscope.collector.store import open_store, resolve_store_url

    demo_mod.check_installed()
    if duration <= 0:
        raise PayscopeError(f"--duration {duration} must be more than 0 seconds")
    store_path = Path(resolve_store_url(store))
    log_dir = store_path.with_name(store_path.stem + "-demo-logs")

    def say(text: str) -> None:
        err.print(f"payscope demo: {text}", markup=False)

    def fresh(path: Path) -> None:
        if path.exists():
            with open_store(str(path)) as opened:
                if opened.get_meta("demo") != "1" and opened.counts()["spans"]:
                    raise PayscopeError(f"{path} holds data that is not the demo's: pass --store to put the demo "
                                        "elsewhere")
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        with open_store(str(path)) as opened:
            opened.set_meta("demo", "1")

    def progress(traffic: demo_mod.Traffic, peak: bool, elapsed: float) -> None:
        if err.is_terminal:
            err.print(f"  {elapsed:5.1f}s  {traffic.sent} orders done, {traffic.failed} failed"
                      + ("  (sale peak)" if peak else ""), end="\r", markup=False)

    def one_run(path: Path, settings: dict[str, str], label: str) -> dict[str, Any]:
        fresh(path)
        say(f"{label}: starting gateway, order (gunicorn x2), inventory (uvicorn), payment, bank and a collector")
        result = demo_mod.run_once(path, path.with_name(path.stem + "-demo-logs"), settings, duration, seed,
                                   keep_running, say, progress)
        t = result["traffic"]
        say(f"{label}: {t.sent} orders placed: {t.ok} paid, {t.failed} failed for the customer "
            f"(on {t.retried} of them the customer pressed \"pay\" again after an error); {result['log_lines']} log "
            f"lines ingested ({', '.join(f'{n} by {m}' for m, n in sorted(result['linked'].items()))})")
        return result

    if not fixed:
        one_run(store_path, demo_mod.FAULTY, "the system as configured")
        with open_store(str(store_path), readonly=True) as opened:
            analysis = load(opened)
            analysis_meta = {"demo_peak": opened.get_meta("demo_peak")}
        document = analysis_document(analysis)
        recs = recommendation_document(analysis, simulate=True)
        out.print()
        report.print_table(document, out)
        out.print()
        out.print("recommended timeouts:")
        report.print_recommendations(recs, out)
        peak = json.loads(analysis_meta.get("demo_peak") or "null")
        if peak:
            window = (int(peak["traffic_start"] * 1e9), int(peak["start"] * 1e9))
            during = (int(peak["start"] * 1e9), int(peak["end"] * 1e9))
            out.print()
            out.print("the sale peak against the time before it (payscope compare):")
            for line in report.compare_lines(compare_windows(analysis, window, during)):
                out.print(f"  {line}", markup=False)
        out.print()
        out.print(f"logs of every service: {log_dir}/", markup=False)
        example = next((f["evidence"]["trace_ids"][0] for f in document["findings"] if f["evidence"]["trace_ids"]),
                       None)
        out.print("next: payscope tui   |   payscope failures" + (f"   |   payscope show {example}" if example else "")
                  + "   |   payscope demo --fixed", markup=False)
        return
    if not store_path.exists() or open_store(str(store_path), readonly=True).counts()["spans"] == 0:
        one_run(store_path, demo_mod.FAULTY, "before (as configured)")
    first_run, clients = demo_mod.recommended_clients(store_path)
    settings = demo_mod.fixed_settings(store_path, clients)
    changed = {k: v for k, v in settings.items() if demo_mod.FAULTY.get(k) != v}
    say("after: applying " + ", ".join(f"{k}={v}" for k, v in sorted(changed.items())))
    fixed_path = store_path.with_name(store_path.stem + "-fixed.db")
    one_run(fixed_path, settings, "after (payscope's recommendations)")
    before, after = demo_mod.outcomes(store_path), demo_mod.outcomes(fixed_path)
    out.print()
    out.print(f"{'measured':<40} {'before':>8} {'after':>8}", markup=False)
    for label in demo_mod.OUTCOME_ROWS:
        out.print(f"{label:<40} {before.get(label, 0):>8} {after.get(label, 0):>8}", markup=False)
    out.print(f"(before: {store_path}; after: {fixed_path})", markup=False)
    predicted, measured = demo_mod.replayed_fix(first_run, clients, fixed_path)
    out.print(f"\n{'the replay of the first run under these settings':<52} {'said':>8} {'measured':>8}", markup=False)
    for key, label in (("transactions", "transactions (traces)"), ("failed", "transactions that did not succeed"),
                       ("late_success", "... of them late successes"), ("duplicate_charge", "orders charged twice")):
        out.print(f"{label:<52} {predicted[key]:>8} {measured[key]:>8}", markup=False)


# What typer shows beside an option, by its type: a word, never a `<type>` placeholder.
_METAVARS = {"int": "N", "float": "NUMBER", "Path": "PATH", "str": "TEXT", "bool": "", "list[Path]": "PATH",
             "list[str]": "TEXT"}
_ClickException: type[Any] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _plain_metavars(command: Any) -> None:
    """Give every option and argument without one a plain metavar (PATH, N, TEXT; none for a flag)."""
    for param in getattr(command, "params", []):
        if param.param_type_name == "argument":
            param.display_type_rich = _no_type  # the argument's help says what it takes
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = param.name.upper()
        else:
            param.metavar = _METAVARS.get(param.bare_type(), "TEXT")
    make_help_option = command.get_help_option

    def help_option(ctx: Any, make: Any = make_help_option) -> Any:
        option = make(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def _no_type(ctx: Any = None) -> None:
    return None


# What a one-shot command built, held by main() until the process ends (None: not run by main(), as in a test that
# calls a command in process, which must not keep every analysis alive).
_held: list[Any] | None = None
_T = TypeVar("_T")


def _held_until_exit(analysis: _T) -> _T:
    """``analysis``, left for the end of the process to reclaim: an analysis of a large store is millions of small
    objects, and taking them apart one by one after the answer is printed cost 0.8 s of a 10 s `analyze` on 1M
    spans, for memory the process gives back whole when it ends."""
    if _held is not None:
        _held.append(analysis)
    return analysis


def _end_holding(code: int) -> None:
    """End the process now, its output flushed, without freeing what :func:`_held_until_exit` holds."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a closed stream
            pass
    os._exit(code)


def main() -> None:
    """Console-script entry point: a usage error or a PayscopeError is one line on stderr and exit code 2."""
    global _held
    command = typer.main.get_command(app)
    _plain_metavars(command)
    _held = []
    try:
        code = command.main(prog_name="payscope", standalone_mode=False)
    except PayscopeError as exc:
        err.print(f"payscope: error: {exc}", markup=False)
        sys.exit(2)
    except _ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command or group: its help
            command.main(args=[*sys.argv[1:], "--help"], prog_name="payscope")
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "payscope"
        err.print(f"payscope: error: {exc.format_message()} (see '{where} -h')", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug: one line, masked, and the traceback only when asked for
        if os.environ.get("PAYSCOPE_DEBUG"):
            raise
        from payscope.instrumentation.redaction import redact_text

        err.print(f"payscope: internal error: {type(exc).__name__}: {redact_text(str(exc))[:300]} "
                  "(PAYSCOPE_DEBUG=1 shows the traceback)", markup=False)
        sys.exit(1)
    if _held:
        _end_holding(code if isinstance(code, int) else 0)
    if isinstance(code, int) and code:
        sys.exit(code)
