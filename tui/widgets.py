"""The TUI's own widgets: a waterfall that renders only the rows on screen, and a latency histogram."""

from __future__ import annotations

from typing import Any

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

TIMEOUT_MARK = "|"
GAP_MARK = "~"  # a call's time outside its callee's own span: the network, a queue, connection set-up
GAP_STYLE = Style(color="yellow")


def _flags(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per span: ``late`` (the analysis found a late success: the callee succeeded after its caller gave up),
    ``retry``, ``critical`` (on the critical path)."""
    by_id = {r["span_id"]: r for r in rows}
    flags: dict[str, list[str]] = {}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for r in rows:
        children.setdefault(r.get("parent_id") if r.get("parent_id") in by_id else None, []).append(r)
        parent = by_id.get(r.get("parent_id") or "")
        if parent is not None and r["kind"] == "server" and (parent.get("call") or {}).get("late_success"):
            flags.setdefault(r["span_id"], []).append("late")
        if (r.get("attributes") or {}).get("http.request.resend_count"):
            flags.setdefault(r["span_id"], []).append("retry")
    level = children.get(None, [])
    while level:
        last = max(level, key=lambda r: r["offset_ms"] + r["duration_ms"])
        flags.setdefault(last["span_id"], []).append("critical")
        level = children.get(last["span_id"], [])
    return flags


class Waterfall(ScrollView, can_focus=True):
    """Spans as a tree with time bars to scale; client timeouts drawn where they would expire.

    Only visible rows are rendered, so a trace of 50,000 spans scrolls as fast as one of 5.
    """

    BINDINGS = [
        Binding("up,k", "move(-1)", "up", show=False), Binding("down,j", "move(1)", "down", show=False),
        Binding("pageup", "move(-20)", show=False), Binding("pagedown", "move(20)", show=False),
        Binding("home,g", "jump(0)", show=False), Binding("end,G", "jump(-1)", show=False),
        Binding("space,right,l,left,h", "fold", "fold"),
    ]

    class Selected(Message):
        def __init__(self, row: dict[str, Any]) -> None:
            super().__init__()
            self.row = row

    def __init__(self, rows: list[dict[str, Any]], duration_ms: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows = rows
        self.total_ms = max(duration_ms, 0.001)
        self.collapsed: set[str] = set()
        self.children_of: dict[str, int] = {}
        for row in rows:
            parent = row.get("parent_id")
            if parent:
                self.children_of[parent] = self.children_of.get(parent, 0) + 1
        self.flags = _flags(rows)
        by_id = {row["span_id"]: row for row in rows}
        # a call's server span, drawn inside its client bar so that the gap between them shows
        self.answer_of: dict[str, dict[str, Any]] = {
            row["parent_id"]: row for row in rows if row["kind"] == "server"
            and row.get("parent_id") in by_id and by_id[row["parent_id"]]["kind"] == "client"}
        self.shown: list[int] = []
        self.cursor = 0
        self.label_width = 46
        self._rebuild()

    def _rebuild(self) -> None:
        self.shown = []
        hidden_depth: int | None = None
        for i, row in enumerate(self.rows):
            if hidden_depth is not None:
                if row["depth"] > hidden_depth:
                    continue
                hidden_depth = None
            self.shown.append(i)
            if row["span_id"] in self.collapsed:
                hidden_depth = row["depth"]
        self.cursor = min(self.cursor, max(0, len(self.shown) - 1))
        self.virtual_size = Size(self.size.width or 100, len(self.shown))

    @property
    def selected(self) -> dict[str, Any] | None:
        return self.rows[self.shown[self.cursor]] if self.shown else None

    def on_mount(self) -> None:
        if self.selected:
            self.post_message(self.Selected(self.selected))

    def action_move(self, delta: int) -> None:
        self._select(self.cursor + delta)

    def action_jump(self, where: int) -> None:
        self._select(where if where >= 0 else len(self.shown) - 1)

    def _select(self, index: int) -> None:
        if not self.shown:
            return
        self.cursor = max(0, min(len(self.shown) - 1, index))
        self.scroll_to_region(self._row_region(), animate=False)
        self.refresh()
        if self.selected:
            self.post_message(self.Selected(self.selected))

    def _row_region(self) -> Any:
        from textual.geometry import Region

        return Region(0, self.cursor, 1, 1)

    def action_fold(self) -> None:
        row = self.selected
        if row is None or not self.children_of.get(row["span_id"]):
            return
        self.collapsed ^= {row["span_id"]}
        self._rebuild()
        self.refresh()

    def render_line(self, y: int) -> Strip:
        index = self.scroll_offset.y + y
        width = self.size.width
        if index >= len(self.shown):
            return Strip.blank(width)
        row = self.rows[self.shown[index]]
        fold = "+" if row["span_id"] in self.collapsed else ("-" if self.children_of.get(row["span_id"]) else " ")
        marks = "".join(f" {flag}" for flag in self.flags.get(row["span_id"], ()))
        if row["status"] == "error":
            marks = f" !{row['error_class'] or 'error'}" + marks
        label = f"{'  ' * min(row['depth'], 12)}{fold} {row['service']}: {row['name']}"
        label = (label[: self.label_width - 1] + "~") if len(label) > self.label_width else label
        bar_width = max(10, width - self.label_width - 24)
        cells = [" "] * bar_width
        gap_cells: set[int] = set()

        def cell(ms: float) -> int:
            return int(ms / self.total_ms * bar_width)

        start = cell(row["offset_ms"])
        length = max(1, cell(row["duration_ms"]))
        glyph = "x" if row["status"] == "error" else ("=" if row["kind"] == "client" else "#")
        for i in range(start, min(bar_width, start + length)):
            cells[i] = glyph
        answer = self.answer_of.get(row["span_id"])
        gap = (row.get("call") or {}).get("gap_ms")
        if answer is not None and row["kind"] == "client":
            inside = range(cell(answer["offset_ms"]), cell(answer["offset_ms"] + answer["duration_ms"]) + 1)
            for i in range(start, min(bar_width, start + length)):
                if i not in inside:
                    cells[i] = GAP_MARK
                    gap_cells.add(i)
        timeout = row.get("timeout_ms")
        if timeout:
            at = cell(row["offset_ms"] + timeout)
            if 0 <= at < bar_width:
                cells[at] = TIMEOUT_MARK
                gap_cells.discard(at)
        if gap and (row.get("call") or {}).get("gap_at_least"):
            marks += f" gap>={gap:.1f}ms"  # given up: what it waited at least, after the error it ended in
        elif gap:
            marks = f" gap {gap:.1f}ms" + marks
        critical = "critical" in self.flags.get(row["span_id"], ())
        style = Style(bold=critical)
        if row["status"] == "error":
            style = Style(color="red", bold=critical)
        if index == self.cursor:
            style = Style(reverse=True, bold=critical)
        head = f"{label:<{self.label_width}}"
        segments = [Segment(head, style)]
        for i, char in enumerate(cells):  # runs of one style, the gap in its own colour
            seg_style = style + GAP_STYLE if i in gap_cells and index != self.cursor else style
            if segments and segments[-1].style == seg_style:
                segments[-1] = Segment(segments[-1].text + char, seg_style)
            else:
                segments.append(Segment(char, seg_style))
        segments.append(Segment(f" {row['duration_ms']:>9.1f}ms{marks}", style))
        return Strip(segments).crop(0, width).extend_cell_length(width, style)

    def on_resize(self) -> None:
        self._rebuild()
