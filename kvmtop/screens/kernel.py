"""The kernel view: KVM's own counters of one VM, every exit, also those KVM handles itself,
read from stats fds kvmtop holds; no ptrace, so it also works without tracing the VM at all."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Static

from kvmtop.held_stats import HeldStats
from kvmtop.kernel_table import CounterTable, counter_table
from kvmtop.units import human
from kvmtop.widgets.counter_grid import CounterGrid
from kvmtop.widgets.key_footer import KeyFooter

REFRESH_S = 1.0
ZERO = frozenset({"", "0", "0ns", "-", "no"})  # cells of a counter that has counted nothing


class KernelScreen(Screen[None]):
    BINDINGS = [
        Binding("k,escape", "app.pop_screen", "Back", key_display="k esc",
                tooltip="Back to the view this came from (the counters stay held)"),
        Binding("z", "zeros", "Zero rows", tooltip="Show or hide the counters that are 0"),
    ]  # fmt: skip

    def __init__(self, held: HeldStats, pid: int, traced: bool) -> None:
        super().__init__()
        self.held = held
        self.pid = pid
        self.traced = traced
        self.show_zeros = False  # as kvm_stat: the counters that are 0 are hidden

    def compose(self) -> ComposeResult:
        yield Static(f"pid {self.pid}: KVM's own counters", id="title")
        yield CounterGrid(id="counters")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(REFRESH_S, self.refresh_view)

    def refresh_view(self) -> None:
        stats, pair = self.held.get(self.pid), self.held.samples(self.pid)
        title = self.query_one("#title", Static)
        if stats is None or pair is None:
            title.update(f"pid {self.pid} has ended: its counters are closed (Esc goes back)")
            return
        before, now = pair
        rate = self.held.exit_rate(self.pid) if now.t_ns > before.t_ns else None
        how = "also traced" if self.traced else "not traced: no cost to the VM"
        exits = f"{human(rate)} exits/s, " if rate is not None else ""  # none on the first frame
        table = counter_table(stats, before, now, compact=True)
        hidden = ""
        if not self.show_zeros:
            shown = [row for row in table.rows if not all(c in ZERO for c in row[1])]
            shown_vm = [row for row in table.vm_rows if not all(c in ZERO for c in row[1])]
            count = len(table.rows) + len(table.vm_rows) - len(shown) - len(shown_vm)
            hidden = f"; {count} at 0 hidden (z)" if count else ""
            table = CounterTable(table.columns, shown, shown_vm)
        title.update(
            f"pid {self.pid}: KVM's counters, {len(stats.vcpus)} vCPU(s), {exits}{how}{hidden}"
        )
        self.query_one(CounterGrid).show(table)

    def action_zeros(self) -> None:
        self.show_zeros = not self.show_zeros
        self.refresh_view()
