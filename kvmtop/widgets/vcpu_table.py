"""One line per vCPU: id, exits/s now, total, a 60 s timeline coloured by each second's dominant
reason, and a stacked bar of its reasons. Renders line by line (cheap at any vCPU count)."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from kvmtop.stats import VcpuSnapshot
from kvmtop.units import human
from kvmtop.widgets import palette

ID_W, RATE_W, TOTAL_W, TIMELINE_W = 6, 9, 10, 60
HEADER = f"{'vCPU':>{ID_W}} {'exits/s':>{RATE_W}} {'total':>{TOTAL_W}}  {'timeline, last 60 s':<{TIMELINE_W}}  reasons"


class VcpuTable(ScrollView, can_focus=True):
    """Up/Down choose a vCPU, Enter opens it (posts :class:`VcpuTable.Selected`)."""

    COMPONENT_CLASSES = set(palette.COMPONENT_CLASSES) | {
        "vcpu-table--cursor",
        "vcpu-table--header",
    }
    DEFAULT_CSS = """
    VcpuTable { height: auto; max-height: 1fr; min-height: 4; border: round $primary-darken-2; }
    VcpuTable:focus { border: round $accent; }
    VcpuTable > .vcpu-table--cursor { background: $boost; text-style: bold; }
    VcpuTable > .vcpu-table--header { text-style: bold; color: $text-muted; }
    """ + palette.css_for("VcpuTable")
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "cursor(-10)", "Page up", show=False),
        Binding("pagedown", "cursor(10)", "Page down", show=False),
        Binding("enter", "open", "Open vCPU"),
    ]
    cursor = reactive(0)

    class Selected(Message):
        def __init__(self, vcpu: int) -> None:
            super().__init__()
            self.vcpu = vcpu

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rows: tuple[VcpuSnapshot, ...] = ()
        self.border_title = "vCPUs"

    def show(self, rows: tuple[VcpuSnapshot, ...]) -> None:
        self.rows = rows
        self.virtual_size = Size(self.size.width, len(rows) + 1)
        self.cursor = min(self.cursor, max(0, len(rows) - 1))
        self.refresh()

    @property
    def selected_vcpu(self) -> int | None:
        return self.rows[self.cursor].vcpu if self.rows else None

    def action_cursor(self, step: int) -> None:
        if self.rows:
            self.cursor = max(0, min(len(self.rows) - 1, self.cursor + step))
            top, visible = self.scroll_offset.y, self.scrollable_content_region.height - 1
            if self.cursor < top:
                self.scroll_to(y=self.cursor, animate=False)
            elif self.cursor >= top + visible:
                self.scroll_to(y=self.cursor - visible + 1, animate=False)
            self.refresh()

    def action_open(self) -> None:
        if self.selected_vcpu is not None:
            self.post_message(self.Selected(self.selected_vcpu))

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:  # the header stays put while the rows scroll under it
            return Strip(
                [Segment(HEADER[:width], self.get_component_rich_style("vcpu-table--header"))]
            )
        row = y - 1 + self.scroll_offset.y
        if not 0 <= row < len(self.rows):
            return Strip.blank(width)
        v = self.rows[row]
        base = (
            self.get_component_rich_style("vcpu-table--cursor") if row == self.cursor else Style()
        )
        segments = [
            Segment(
                f"{v.vcpu:>{ID_W}} {human(v.rate):>{RATE_W}} {human(v.total):>{TOTAL_W}}  ",
                base,
            )
        ]
        glyphs = palette.sparkline(v.timeline)
        for glyph, label in zip(glyphs, v.timeline_dominant, strict=True):
            segments.append(Segment(glyph, base + palette.reason_style(self, label)))
        segments.append(Segment("  ", base))
        bar_w = max(0, width - ID_W - RATE_W - TOTAL_W - TIMELINE_W - 7)
        segments += stacked_bar(self, v, bar_w, base)
        return Strip(segments).crop(0, width).extend_cell_length(width, base)


def stacked_bar(widget: VcpuTable, v: VcpuSnapshot, width: int, base: Style) -> list[Segment]:
    """The vCPU's reasons as one bar, each reason's share in its colour (largest first)."""
    if v.total == 0 or width <= 0:
        return []
    out: list[Segment] = []
    used = 0
    for r in v.reasons:
        cells = round(r.count * width / v.total)
        if cells == 0:
            continue
        cells = min(cells, width - used)
        text = palette.short(r.label)[:cells].ljust(cells) if cells >= 4 else "█" * cells
        style = base + palette.reason_style(widget, r.label)
        out.append(Segment(text, style + Style(reverse=cells >= 4)))
        used += cells
        if used >= width:
            break
    return out
