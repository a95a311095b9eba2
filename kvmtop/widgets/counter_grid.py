"""KVM's counters as a grid: counters down, vCPUs across (see :mod:`kvmtop.kernel_table`)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from kvmtop.kernel_table import CounterTable


class CounterGrid(DataTable[Text | str]):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._columns: list[str] = []

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
