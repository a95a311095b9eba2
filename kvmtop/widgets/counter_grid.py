"""KVM's counters as a grid: counters down, vCPUs across (see :mod:`kvmtop.counters.kernel_table`)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.scrollbar import ScrollBarRender
from textual.widgets import DataTable

from kvmtop.counters.kernel_table import CounterTable


class WholeRowScrollBar(ScrollBarRender):
    """A thumb from one row's edge to another's. Textual draws a thumb's ends in eighths of a
    row (a half-filled glyph): beside the grid's striped rows that reads as a thumb that
    starts or ends in the middle of a row."""

    VERTICAL_BARS: ClassVar[list[str]] = [" "]


class CounterGrid(DataTable[Text | str]):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._columns: list[str] = []

    def on_mount(self) -> None:
        self.vertical_scrollbar.renderer = WholeRowScrollBar

    def show(self, table: CounterTable) -> None:
        if table.columns != self._columns:
            self.clear(columns=True)
            self._columns = list(table.columns)
            self.add_column("counter", key="counter")
            for name in table.columns:
                self.add_column(name, key=name)
        row = self.cursor_row
        self.clear()
        width = len(table.columns)
        for name, cells in table.rows:
            self.add_row(name, *(Text(c, justify="right") for c in cells), key=name)
        self.add_row(Text("VM", style="bold"), *([""] * width), key="-vm-")
        for name, cells in table.vm_rows:
            padded = [*cells, *([""] * (width - len(cells)))]
            self.add_row(name, *(Text(c, justify="right") for c in padded), key=f"vm:{name}")
        if self.row_count:
            self.move_cursor(row=min(row, self.row_count - 1))
