"""The kernel view: KVM's own counters of one VM, every exit, also those KVM handles itself,
read from stats fds kvmtop holds; no ptrace, so it also works without tracing the VM at all."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from kvmtop.held_stats import HeldStats
from kvmtop.kernel_table import counter_table
from kvmtop.units import human
from kvmtop.widgets.counter_grid import CounterGrid

REFRESH_S = 1.0


class KernelScreen(Screen[None]):
    BINDINGS = [
        Binding("k,escape", "app.pop_screen", "Back",
                tooltip="Back to the view this came from (the counters stay held)"),
    ]  # fmt: skip

    def __init__(self, held: HeldStats, pid: int, traced: bool) -> None:
        super().__init__()
        self.held = held
        self.pid = pid
        self.traced = traced

    def compose(self) -> ComposeResult:
        yield Static(f"pid {self.pid}: KVM's own counters", id="title")
        yield CounterGrid(id="counters")
        yield Footer()

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
        rate = self.held.exit_rate(self.pid) or 0.0
        how = "also traced" if self.traced else "not traced: no cost to the VM"
        title.update(
            f"pid {self.pid}: KVM's own counters, {len(stats.vcpus)} vCPU(s), "
            f"{human(rate)} exits/s in all ({how})"
        )
        self.query_one(CounterGrid).show(counter_table(stats, before, now))
