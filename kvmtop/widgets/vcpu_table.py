"""One block per vCPU: id, exits/s now, total, a 60 s timeline coloured by each second's dominant
reason, a stacked bar of its reasons and the largest of them by name.

Drawn line by line (cheap at any vCPU count and refresh rate). Each vCPU gets as many lines as
the pane has room for, up to MAX_LINES_PER_VCPU, so 2 vCPUs show tall timelines and 64 show one
line each and scroll.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from kvmtop.aggregate.exits import VcpuSnapshot
from kvmtop.units import human
from kvmtop.widgets import palette

ID_W, RATE_W, TOTAL_W, TIMELINE_W = 6, 9, 10, 60
NUMBERS_W = ID_W + RATE_W + TOTAL_W + 4
MAX_LINES_PER_VCPU = 8
LEGEND_W = 27
MIN_TIMELINE_W = 20


def timeline_width(width: int, id_w: int = ID_W, numbers_w: int = NUMBERS_W) -> int:
    """Seconds of the timeline a line of ``width`` shows: all 60 where the reasons' bar and
    legend fit beside them, else the latest ones. ``id_w``: the vCPU column's width (wider
    for PID:VM:VCPU labels); ``numbers_w``: the numbers' columns before the timeline."""
    numbers = numbers_w + id_w - ID_W
    return max(MIN_TIMELINE_W, min(TIMELINE_W, width - numbers - 2 - LEGEND_W))


@dataclass(frozen=True, slots=True)
class Columns:
    """What a vCPU pane's header says: the column after exits/s, the timeline's (in full and
    short) and the bar's; and how wide the numbers before the timeline are."""

    middle: str = f"{'total':>{TOTAL_W}}"
    timeline: tuple[str, str] = ("exits per second", "exits/s")
    bar: str = "reasons"
    numbers_w: int = NUMBERS_W


def header(width: int, id_w: int = ID_W, columns: Columns = Columns()) -> str:
    seconds = timeline_width(width, id_w, columns.numbers_w)
    full, short = columns.timeline
    what = full if len(f"{full}, last {seconds} s") <= seconds else short
    return (
        f"{'vCPU':>{id_w}} {'exits/s':>{RATE_W}} {columns.middle}  "
        f"{f'{what}, last {seconds} s':<{seconds}}  {columns.bar}"
    )


def vms_title(rows: tuple[VcpuSnapshot, ...]) -> str:
    """The pane's title: "vCPUs", and each VM's process when there are several VMs."""
    vms: dict[tuple[int, int], str] = {}
    for v in rows:
        if v.key is not None:
            vms.setdefault((v.key.pid, v.key.vm), v.process)
    if len(vms) < 2:
        return "vCPUs"
    names = ", ".join(f"{pid}:{vm} {name}".rstrip() for (pid, vm), name in vms.items())
    return f"vCPUs (PID:VM:vCPU) of {len(vms)} VMs: {names}"


class VcpuTable(ScrollView, can_focus=True):
    """Up/Down choose a vCPU, Enter opens it (posts :class:`VcpuTable.Selected`)."""

    COMPONENT_CLASSES = set(palette.COMPONENT_CLASSES) | {
        "vcpu-table--cursor",
        "vcpu-table--header",
    }
    DEFAULT_CSS = """
    VcpuTable { height: 1fr; min-height: 4; border: round $primary-darken-2; overflow-x: hidden; }
    VcpuTable:focus { border: round $accent; }
    VcpuTable > .vcpu-table--cursor { background: $boost; text-style: bold; }
    VcpuTable > .vcpu-table--header { text-style: bold; color: $text-muted; }
    """ + palette.css_for("VcpuTable")
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "cursor(-10)", "Page up", show=False),
        Binding("pagedown", "cursor(10)", "Page down", show=False),
        Binding("enter", "open", "Open vCPU", tooltip="Open the selected vCPU's drill-down"),
    ]
    COLUMNS: ClassVar[Columns] = Columns()
    cursor = reactive(0)

    class Selected(Message):
        def __init__(self, vcpu: int) -> None:
            super().__init__()
            self.vcpu = vcpu

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rows: tuple[VcpuSnapshot, ...] = ()
        self.lines_per_vcpu = 1
        self.id_w = ID_W
        self.border_title = "vCPUs"

    def show(self, rows: tuple[VcpuSnapshot, ...]) -> None:
        title = vms_title(rows)
        if self.border_title != title:  # setting it lays the screen out again
            self.border_title = title
        self.take_rows(rows)

    def take_rows(self, rows: tuple[Any, ...]) -> None:
        """The rows to draw (each with a ``label``): the cursor kept on one, the lines fitted."""
        self.rows = rows
        self.id_w = max(ID_W, *(len(v.label) for v in rows)) if rows else ID_W
        self.cursor = min(self.cursor, max(0, len(rows) - 1))
        self._fit()
        self.refresh()

    def on_resize(self, _event: events.Resize) -> None:
        self._fit()

    def _fit(self) -> None:
        # the whole height, not the region left beside a scrollbar: that bar goes once the
        # vCPUs fit, and no resize would come to fit them again
        room = max(1, self.size.height - 1)  # under the header
        n = max(1, len(self.rows))
        self.lines_per_vcpu = max(1, min(MAX_LINES_PER_VCPU, room // n))
        self.virtual_size = Size(self.size.width, len(self.rows) * self.lines_per_vcpu + 1)

    @property
    def selected_vcpu(self) -> int | None:
        return self.rows[self.cursor].vcpu if self.rows else None

    def action_cursor(self, step: int) -> None:
        if not self.rows:
            return
        self.cursor = max(0, min(len(self.rows) - 1, self.cursor + step))
        k = self.lines_per_vcpu
        top, visible = self.scroll_offset.y, self.scrollable_content_region.height - 1
        first, last = self.cursor * k, self.cursor * k + k - 1
        if first < top:
            self.scroll_to(y=first, animate=False)
        elif last >= top + visible:
            self.scroll_to(y=last - visible + 1, animate=False)
        self.refresh()

    def action_open(self) -> None:
        if self.selected_vcpu is not None:
            self.post_message(self.Selected(self.selected_vcpu))

    def on_click(self, event: events.Click) -> None:
        line = event.y - 1 + self.scroll_offset.y
        if event.y >= 1 and 0 <= line // self.lines_per_vcpu < len(self.rows):
            self.cursor = line // self.lines_per_vcpu
            if event.chain > 1:  # double click opens
                self.action_open()
            self.refresh()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:  # the header stays put while the vCPUs scroll under it
            style = self.get_component_rich_style("vcpu-table--header")
            text = header(width, self.id_w, self.COLUMNS)[:width]
            return Strip([Segment(text, style)]).extend_cell_length(width, style)
        line = y - 1 + self.scroll_offset.y
        index, sub = divmod(line, self.lines_per_vcpu)
        if not 0 <= index < len(self.rows):
            return Strip.blank(width)
        base = (
            self.get_component_rich_style("vcpu-table--cursor") if index == self.cursor else Style()
        )
        segments = self.vcpu_line(self.rows[index], sub, base, width)
        return Strip(segments).crop(0, width).extend_cell_length(width, base)

    def vcpu_line(self, v: VcpuSnapshot, sub: int, base: Style, width: int) -> list[Segment]:
        """Line ``sub`` of vCPU ``v``'s block."""
        k = self.lines_per_vcpu
        muted = base + Style(dim=True)
        id_w = self.id_w
        numbers_w = NUMBERS_W + id_w - ID_W
        if sub == 0:
            numbers = f"{v.label:>{id_w}} {human(v.rate):>{RATE_W}} {human(v.total):>{TOTAL_W}}  "
            segments = [Segment(numbers, base)]
        elif sub == 1:
            peak = max(v.timeline, default=0)
            segments = [
                Segment(f"{'peak':>{id_w + RATE_W - 4}} {human(peak):>4}".ljust(numbers_w), muted)
            ]
        else:
            segments = [Segment(" " * numbers_w, base)]
        seconds = timeline_width(width, id_w)
        segments += self._timeline_row(v, sub, k, base, seconds)
        segments.append(Segment("  ", base))
        bar_w = max(0, width - numbers_w - seconds - 2)
        if sub == 0:
            segments += stacked_bar(
                self, [(r.label, r.count) for r in v.reasons], v.total, bar_w, base
            )
        elif sub <= len(v.reasons) and bar_w >= LEGEND_W:
            r = v.reasons[sub - 1]  # the legend: one reason a line, largest first
            share = 100 * r.count / v.total if v.total else 0.0
            style = base + palette.reason_style(self, r.label)
            segments.append(Segment(f"{palette.short(r.label)[:12]:<12}", style))
            segments.append(Segment(f"{share:5.1f}% {human(r.rate):>6}/s", muted))
        return segments

    def _timeline_row(
        self, v: VcpuSnapshot, sub: int, k: int, base: Style, seconds: int
    ) -> list[Segment]:
        """Line ``sub`` (0 = top) of a ``k``-line bar chart of the vCPU's last ``seconds``: one
        segment per run of seconds with the same dominant reason."""
        glyphs = palette.chart_row(v.timeline[-seconds:], sub, k)
        out = []
        run: list[str] = []
        run_label: str | None = None
        for glyph, label in zip(glyphs, v.timeline_dominant[-seconds:], strict=True):
            if label != run_label and run:
                out.append(Segment("".join(run), base + palette.reason_style(self, run_label)))
                run = []
            run_label = label
            run.append(glyph)
        if run:
            out.append(Segment("".join(run), base + palette.reason_style(self, run_label)))
        return out


def stacked_bar(
    widget: ScrollView, parts: list[tuple[str, int]], total: int, width: int, base: Style
) -> list[Segment]:
    """(label, count) parts of ``total`` as one bar, each part in its reason's colour (the
    largest first)."""
    if total == 0 or width <= 0:
        return []
    out: list[Segment] = []
    used = 0
    for label, count in parts:
        cells = round(count * width / total)
        if cells == 0:
            continue
        cells = min(cells, width - used)
        text = palette.short(label)[:cells].ljust(cells) if cells >= 4 else "█" * cells
        style = base + palette.reason_style(widget, label)
        out.append(Segment(text, style + Style(reverse=cells >= 4)))
        used += cells
        if used >= width:
            break
    return out
