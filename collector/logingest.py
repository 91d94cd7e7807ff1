"""`payscope ingest logs`: files, directories, globs or stdin, parsed, redacted, linked and stored."""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import itertools
import sys
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import IO, Any

from payscope.collector.store import Store
from payscope.collector.store.api import LogQuery
from payscope.errors import InputError
from payscope.model import LogRecord

from . import logparse
from .decoding import WorkerPool, opened_here
from .files import check_text
from .otlp import OTLP_SOURCE
from .redaction import redact_log, redact_text, text_may_need_redaction

CHUNK_LINES = 20_000  # lines a worker process parses, links by their ids and stores at a time
CLEAN_BLOCK_LINES = 128  # lines asked at once whether they hold anything to mask
PARSE_AHEAD = 4       # chunks worked on ahead of the one whose result is being taken
SAMPLE_LINES = 50
MAX_LINE_BYTES = 64 * 1024  # a longer line is reported and skipped, and the rest of the file read
_MIN_NS, _MAX_NS = -(2**63), 2**63 - 1  # what the store's time column holds: the years 1677 to 2262


@dataclass
class FileReport:
    source: str
    format: str = ""
    lines: int = 0
    records: int = 0
    unparsed: int = 0
    joined: int = 0  # lines already stored from OTLP: stored once, with both sources
    problems: list[str] = field(default_factory=list)

    def bad(self, where: str, reason: str) -> None:
        self.unparsed += 1
        if len(self.problems) < 10:
            self.problems.append(f"{where}: {reason}")


@dataclass
class IngestReport:
    files: list[FileReport] = field(default_factory=list)
    linked: dict[str, int] = field(default_factory=dict)
    stored: int = 0

    def to_json(self) -> dict[str, Any]:
        by_format: dict[str, int] = {}
        for f in self.files:
            by_format[f.format] = by_format.get(f.format, 0) + f.records
        return {"lines": sum(f.lines for f in self.files), "records": sum(f.records for f in self.files),
                "stored": self.stored, "joined": sum(f.joined for f in self.files), "by_format": by_format,
                "linked": self.linked,
                "ambiguous": self.linked.get("ambiguous", 0), "unparsed": sum(f.unparsed for f in self.files),
                "files": [vars(f) for f in self.files]}


def expand(inputs: list[str]) -> list[str]:
    """Paths from files, directories (recursively) and globs; ``-`` is stdin."""
    out: list[str] = []
    for item in inputs:
        if item == "-":
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file())
            if not found:
                raise InputError(f"{item}: an empty directory, no log file in it")
            out += found
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"{item}: no file matches")
            out += matches
        elif path.exists():
            out.append(item)
        else:
            raise InputError(f"{item}: no such file")
    return out


def _open(source: str) -> IO[bytes]:
    if source == "-":
        return sys.stdin.buffer
    raw = open(source, "rb")  # noqa: SIM115 - closed by the caller
    if raw.read(2) == b"\x1f\x8b":
        raw.close()
        return gzip.open(source, "rb")  # type: ignore[return-value]
    raw.seek(0)
    return raw


def _decoded_lines(stream: IO[bytes], report: FileReport) -> Iterator[tuple[int, str]]:
    """Numbered text lines; a line that is not UTF-8 is read as Latin-1, a truncated gzip ends the file.

    A line longer than MAX_LINE_BYTES is skipped and reported without being held whole in memory, so
    that no parser meets it: each runs in time linear in a line no longer than that.
    """
    lineno = 0
    try:
        while True:
            raw = stream.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                length = len(raw)
                while raw and not raw.endswith(b"\n"):
                    raw = stream.readline(1 << 20)
                    length += len(raw)
                report.bad(f"{report.source}:{lineno}", f"a line of {length} bytes, longer than the limit of "
                           f"{MAX_LINE_BYTES}: skipped")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            yield lineno, text
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        report.bad(f"{report.source}:{lineno + 1}", f"file is truncated or corrupt ({exc}); the lines before were kept")
    report.lines = lineno


def _chunk_results(source: str, service: str | None, fmt: str, tz: tzinfo, clock_offset_ns: int,
                   report: FileReport, nginx_format: str | None, pool: WorkerPool | None,
                   storing: _Storing | None) -> Iterator[_ChunkResult]:
    """One file read in chunks, each parsed (and with ``storing``, stored) here or by ``pool``'s workers, the
    results in order; every problem and record is counted in ``report``. With ``pool``, a file longer than
    CHUNK_LINES is cut into chunks that each start on a line that starts a record, so that the records and the
    problems reported are those of reading it whole."""
    stream = _open(source)
    try:
        lines = _decoded_lines(stream, report)
        sample: list[tuple[int, str]] = []
        for item in lines:
            sample.append(item)
            if len(sample) >= SAMPLE_LINES:
                break
        if nginx_format:
            parser_spec = ("nginx", nginx_format)
            report.format = "nginx-custom"
        elif fmt == "auto":
            detected = logparse.detect([line for _, line in sample])
            if detected is None:
                for lineno, _ in sample:
                    report.bad(f"{source}:{lineno}", "no known log format")
                for lineno, _ in lines:
                    report.bad(f"{source}:{lineno}", "no known log format")
                return
            parser_spec, report.format = ("named", detected), detected
        else:
            if fmt not in logparse.FORMATS:
                raise InputError(f"--format {fmt!r} is not one of auto, {', '.join(logparse.FORMATS)}")
            parser_spec, report.format = ("named", fmt), fmt

        # masked here once, so that a record of a line that needs no masking is not asked again (redact_log)
        source_name = redact_text(Path(source).name if source != "-" else "stdin")
        name = redact_text(service or (source_name.split(".")[0] if source != "-" else "stdin"))
        job = _Chunk(parser_spec, name, source_name, source, tz, clock_offset_ns)
        parser = job.parser()
        chunks = _chunks(itertools.chain(sample, lines), lambda line: parser(line.rstrip("\r\n")) is not None)
        first = next(chunks, [])
        second = next(chunks, None)
        results: Iterator[_ChunkResult]
        if second is None or pool is None:
            results = (job.run(chunk, storing) for chunk in itertools.chain([first], [second] if second else [],
                                                                            chunks))
        else:
            results = _in_order(pool, job, storing, itertools.chain([first, second], chunks))
        for result in results:
            if storing is not None and result.records:
                result = _store(result, storing)  # parsed by a worker that could not open the store
            for where, reason in result.problems:
                report.bad(where, reason)
            report.records += result.count
            report.joined += result.joined
            yield result
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _chunks(lines: Iterator[tuple[int, str]], starts_record: Callable[[str], bool]) -> Iterator[list[tuple[int, str]]]:
    """Lines in chunks of about CHUNK_LINES, each but the first starting on a line that starts a record: what
    follows a record (its traceback, or a line no parser reads) stays in its chunk, as if read in one."""
    chunk: list[tuple[int, str]] = []
    for item in lines:
        if len(chunk) >= CHUNK_LINES and item[1].strip() and starts_record(item[1]):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _in_order(pool: WorkerPool, job: _Chunk, storing: _Storing | None,
              chunks: Iterator[list[tuple[int, str]]]) -> Iterator[_ChunkResult]:
    """Each chunk's result, in order, with a few chunks parsed (and stored) ahead by the pool's workers. A chunk
    whose worker died (killed, out of memory) is done here, and new workers take the chunks after it: storing
    is idempotent, so what the dead worker had stored is not stored twice."""
    ahead: collections.deque[tuple[list[tuple[int, str]], Future[_ChunkResult]]] = collections.deque()
    sent = storing and storing.sent()  # a worker opens the store again by its URL

    def result() -> _ChunkResult:
        chunk, future = ahead.popleft()
        done = pool.answer(future, lambda: job.run(chunk, storing))
        if sent is not None and storing is not None and storing.store is not None:
            storing.store.written_elsewhere()  # the worker stored its chunk: read here as if stored here
        return done

    for chunk in chunks:
        try:
            ahead.append((chunk, pool.submit(_run_chunk, job, chunk, sent)))
        except BrokenProcessPool:
            here: Future[_ChunkResult] = Future()
            here.set_result(job.run(chunk, storing))
            ahead.append((chunk, here))
        if len(ahead) > PARSE_AHEAD:
            yield result()
    while ahead:
        yield result()


@dataclass(frozen=True)
class _Storing:
    """Where a chunk's records go once parsed: the store (``url``: how a worker process opens it again), and how
    they are linked by their ids first (a linker's :meth:`~payscope.analyzers.correlate.Linker.by_ids`; None:
    stored unlinked)."""

    url: str | None  # None: the store cannot be opened elsewhere, and workers only parse
    linking: Any
    store: Store | None = None  # here; a worker opens its own

    def sent(self) -> _Storing | None:
        return _Storing(self.url, self.linking) if self.url is not None else None


@dataclass
class _ChunkResult:
    """What became of a chunk: its records (when they were not stored), the problems of its lines, how many
    records it held, how many of them were already stored from OTLP, how many were new, and what linking them
    by their ids left for the time window (``IdLinked``)."""

    records: list[LogRecord]
    problems: list[tuple[str, str]]
    count: int
    joined: int = 0
    stored: int = 0
    linked: Any = None


def _store(parsed: _ChunkResult, storing: _Storing) -> _ChunkResult:
    """Leave out the records of ``parsed`` already stored from OTLP, link the rest by their ids and store them,
    all but those that wait for the time window (in the result's ``linked``)."""
    assert storing.store is not None
    store, records = storing.store, parsed.records
    fresh = join_twins(store, records)  # on the ids the lines carried, before linking changes them
    joined = len(records) - len(fresh)
    linked = None
    if storing.linking is not None:
        fresh, linked = storing.linking(store, fresh)
    stored = store.write(logs=fresh)[1] if fresh else 0
    return _ChunkResult([], parsed.problems, parsed.count, joined, stored, linked)


def _run_chunk(job: _Chunk, chunk: list[tuple[int, str]], storing: _Storing | None) -> _ChunkResult:
    """In a worker process: :meth:`_Chunk.run` on the store named by ``storing``, opened once."""
    if storing is not None and storing.store is None and storing.url is not None:
        storing = _Storing(storing.url, storing.linking, opened_here(storing.url))
    return job.run(chunk, storing)


@dataclass(frozen=True)
class _Chunk:
    """How to parse the lines of one file, here or in a worker process (it is pickled there with its chunk)."""

    parser_spec: tuple[str, str]  # ("named", format) or ("nginx", log_format)
    service: str
    source_name: str
    source: str
    tz: tzinfo
    clock_offset_ns: int

    def parser(self) -> Callable[[str], logparse.Fields | None]:
        kind, spec = self.parser_spec
        return logparse.nginx_log_format(spec) if kind == "nginx" else logparse.FORMATS[spec]

    def parse(self, chunk: list[tuple[int, str]]) -> tuple[list[LogRecord], list[tuple[str, str]]]:
        """The records of ``chunk``, and the (where, why) of each line or record that gave none."""
        parser = self.parser()
        problems: list[tuple[str, str]] = []
        out = []
        ends, clean = self.clean_blocks(chunk)
        for parsed in logparse.records(iter(chunk), parser,
                                       lambda n, reason, line: problems.append((f"{self.source}:{n}", reason))):
            line_clean = not parsed.extra_lines and clean[bisect.bisect_left(ends, parsed.lineno)]
            record = _record(parsed, self.service, self.source_name, self.tz, self.clock_offset_ns, line_clean)
            if isinstance(record, str):
                problems.append((f"{self.source}:{parsed.lineno}", record))
                continue
            record.identity()  # fixed now, on the ids the line carried, before linking adds any
            out.append(record)
        return out, problems

    def run(self, chunk: list[tuple[int, str]], storing: _Storing | None) -> _ChunkResult:
        """Parse ``chunk``; with ``storing`` that holds a store, store its records as :func:`_store` does."""
        records, problems = self.parse(chunk)
        parsed = _ChunkResult(records, problems, len(records))
        return _store(parsed, storing) if storing is not None and storing.store is not None else parsed

    def clean_blocks(self, chunk: list[tuple[int, str]]) -> tuple[list[int], list[bool]]:
        """For each CLEAN_BLOCK_LINES lines of ``chunk``, the number of its last line and whether none of its
        lines holds anything to mask, so that the strings a parser cuts from them need none either. Asked only
        of the named formats, which cut a line where a digit does not meet a digit. A block with a backslash is
        not clean (an escape a parser decodes can spell a digit or a word), nor is any block of a custom nginx
        format (two of its variables may meet between two digits)."""
        blocks = range(0, len(chunk), CLEAN_BLOCK_LINES)
        ends = [chunk[min(at + CLEAN_BLOCK_LINES, len(chunk)) - 1][0] for at in blocks]
        if self.parser_spec[0] != "named":
            return ends, [False for _ in blocks]
        clean = []
        for at in blocks:
            text = "".join([line for _, line in chunk[at:at + CLEAN_BLOCK_LINES]])
            clean.append("\\" not in text and not text_may_need_redaction(text))
        return ends, clean


def _record(parsed: logparse.Parsed, service: str, source: str, tz: tzinfo, offset_ns: int,
            line_clean: bool = False) -> LogRecord | str:
    """The record of a parsed line, or why there is none (``line_clean``: as in ``redact_log``)."""
    f = parsed.fields
    moment = logparse.parse_time(str(f.get("time") or ""), tz)
    if moment is None:
        return "unreadable timestamp"
    time_ns = int(moment.timestamp() * 1e9) - offset_ns
    if not _MIN_NS <= time_ns <= _MAX_NS:
        return f"timestamp {moment.isoformat()} is outside the years 1677 to 2262"
    message = str(f.get("message") or "")
    if parsed.extra_lines:
        message = "\n".join([message, *parsed.extra_lines])
    attrs = dict(f.get("attributes") or {})
    trace_id, span_id, request_id = f.get("trace_id"), f.get("span_id"), f.get("request_id")
    if not trace_id or not request_id:
        extra = " ".join(f"{k}={v}" for k, v in attrs.items() if isinstance(v, str))
        found_trace, found_span, found_req = logparse.find_ids(f"{message} {extra}", request=not request_id)
        trace_id = trace_id or found_trace
        span_id = span_id or found_span
        request_id = request_id or found_req
    if request_id:
        if not isinstance(request_id, str):
            line_clean = False  # a number written here as text (4.2e15 as "4200000000000000.0") was not in the line
        attrs["request_id"] = str(request_id)
    if not isinstance(attrs.get("host", ""), str):
        line_clean = False
    return redact_log(LogRecord(
        time_ns=time_ns, service=service, message=message,
        severity=str(f.get("level") or "")[:16], host=str(attrs.pop("host", "") or ""),
        attributes={k: v for k, v in attrs.items() if v is not None},
        source=f"{source}:{parsed.lineno}",
        trace_id=str(trace_id) if trace_id else None, span_id=str(span_id) if span_id else None), line_clean)


TWIN_WINDOW_NS = 1_000_000_000


def join_twins(store: Store, lines: list[LogRecord]) -> list[LogRecord]:
    """The file lines that are not already stored as records sent over OTLP. A line that is (see
    LogRecord.is_twin_of) is not stored again: the stored record gets the line's source beside its own."""
    if not lines:
        return lines
    sent: dict[str, list[tuple[int, LogRecord]]] = {}
    for service in {r.service for r in lines}:
        times = [r.time_ns for r in lines if r.service == service]
        sent[service] = store.search_logs(LogQuery(
            service=service, since_ns=min(times) - TWIN_WINDOW_NS, until_ns=max(times) + TWIN_WINDOW_NS,
            source_prefix=OTLP_SOURCE, limit=None))
    fresh, joined, taken = [], [], set()
    for line in lines:
        twin = next(((rid, rec) for rid, rec in sent.get(line.service, ())
                     if rid not in taken and line.is_twin_of(rec)), None)
        if twin is None:
            fresh.append(line)
        else:
            taken.add(twin[0])
            if line.source not in twin[1].source.split(" + "):  # joined already when the file was read before
                joined.append((twin[0], f"{twin[1].source} + {line.source}"))
    if joined:
        store.update_log_sources(joined)
    return fresh


def ingest(store: Store, inputs: list[str], *, service: str | None = None, fmt: str = "auto", tz: tzinfo | None = None,
           clock_offset_ns: int = 0, nginx_format: str | None = None, linker: Any = None,
           on_progress: Callable[[str, int], None] | None = None, workers: int = 0) -> IngestReport:
    """Parse, link (with ``linker``, an analyzers.correlate.Linker) and store every record; with ``workers``,
    files longer than CHUNK_LINES are parsed, linked by their ids and stored by that many worker processes,
    each on its own handle of the store, while this one holds the lines that wait for the time window."""
    report = IngestReport()
    sources = expand(inputs)
    for source in sources:  # every file checked before any is stored
        if source != "-":
            check_text(Path(source))
    pool = WorkerPool(workers)  # started only when a file turns out long enough to need it
    storing = _Storing(store.address() if workers > 0 else None, linker.by_ids() if linker else None, store)
    try:
        _ingest_all(store, sources, report, service, fmt, tz, clock_offset_ns, nginx_format, linker, on_progress,
                    pool, storing)
    finally:
        pool.close()
        if linker:  # the held lines are stored even when a later file is refused
            report.stored += store.write(logs=linker.finish())[1]
            report.linked = dict(linker.stats.by_method)
    return report


def _ingest_all(store: Store, sources: list[str], report: IngestReport, service: str | None, fmt: str,
                tz: tzinfo | None, clock_offset_ns: int, nginx_format: str | None, linker: Any,
                on_progress: Callable[[str, int], None] | None, pool: WorkerPool, storing: _Storing) -> None:
    for source in sources:
        file_report = FileReport(source)
        report.files.append(file_report)
        for result in _chunk_results(source, service, fmt, tz or logparse.parse_tz(None), clock_offset_ns,
                                     file_report, nginx_format, pool if pool.workers > 0 else None, storing):
            report.stored += result.stored
            if linker is not None and result.linked is not None:
                early = linker.take(result.linked)  # held for the time window; past a bound, decided now
                if early:
                    report.stored += store.write(logs=early)[1]
            if on_progress:
                on_progress(source, file_report.records)
        if on_progress:
            on_progress(source, file_report.records)
        if not file_report.records and file_report.unparsed:
            raise InputError(f"{source}: no line is in a known log format, nothing of it was stored (first: "
                             f"{file_report.problems[0]})")
        if not file_report.records:
            raise InputError(f"{source}: empty, no log line in it")


__all__ = ["FileReport", "IngestReport", "expand", "ingest"]
