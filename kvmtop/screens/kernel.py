"""The kernel view: KVM's own counters of one VM, every exit, also those KVM handles itself,
read from stats fds kvmtop holds; no ptrace, so it also works without tracing the VM at all.
`/` filters the counters by name, as kvm_stat's `f`."""

from __future__ import annotations

from collections.abc import Callable

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Static

from kvmtop.counters.held_stats import HeldStats
from kvmtop.counters.kernel_table import CounterTable, counter_table, io_note, kick_note
from kvmtop.screens.typed_filter import TypedFilter
from kvmtop.units import human
from kvmtop.widgets.counter_grid import CounterGrid
from kvmtop.widgets.key_footer import KeyFooter

REFRESH_S = 1.0
ZERO = frozenset({"", "0", "0ns", "-", "no"})  # cells of a counter that has counted nothing


def kept(table: CounterTable, keep: Callable[[str, list[str]], bool]) -> tuple[CounterTable, int]:
    """The rows of ``table`` that ``keep(name, cells)`` keeps, and how many it left out."""
    rows = [row for row in table.rows if keep(*row)]
    vm_rows = [row for row in table.vm_rows if keep(*row)]
    return CounterTable(table.columns, rows, vm_rows), (
        len(table.rows) + len(table.vm_rows) - len(rows) - len(vm_rows)
    )


class KernelScreen(Screen[None]):
    BINDINGS = [
        Binding("k,escape", "app.pop_screen", "Back", key_display="k esc",
                tooltip="Back to the view this came from (the counters stay held)"),
        Binding("z", "zeros", "Zero rows", tooltip="Show or hide the counters that are 0"),
        Binding("slash", "filter", "Filter",
                tooltip="Show only the counters whose name matches, as you type (a regex)"),
    ]  # fmt: skip

    def __init__(
        self,
        held: HeldStats,
        pid: int,
        traced: bool,
        traced_io: Callable[[], float | None] = lambda: None,
    ) -> None:
        super().__init__()
        self.held = held
        self.pid = pid
        self.traced = traced
        self.traced_io = traced_io  # the IO exits/s the VMM saw over the counters' interval
        self.show_zeros = False  # as kvm_stat: the counters that are 0 are hidden
        self.filter = TypedFilter(self._filter_changed)

    def compose(self) -> ComposeResult:
        yield Static(f"pid {self.pid}: KVM's own counters", id="title")
        yield Static("", id="filter")
        yield Static("", id="note")
        yield CounterGrid(id="counters")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.query_one("#filter").display = False
        self.query_one("#note").display = False
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
        note = io_note(stats, before, now, self.traced_io()) or kick_note(stats)
        hidden = ""
        if not self.show_zeros:  # io_exits stays beside a note that speaks of it
            table, count = kept(table, lambda name, cells: (note.startswith("io_exits") and name == "io_exits")
                                or not all(c in ZERO for c in cells))  # fmt: skip
            hidden = f"; {count} at 0 hidden (z)" if count else ""
        if self.filter.text:
            table, count = kept(table, lambda name, cells: self.filter.matches(name))
            hidden += f"; {count} filtered out (/)" if count else ""
        title.update(
            f"pid {self.pid}: KVM's counters, {len(stats.vcpus)} vCPU(s), {exits}{how}{hidden}"
        )
        self.query_one(CounterGrid).show(table)
        self.query_one("#note", Static).update(f"note: {note}")
        self.query_one("#note").display = bool(note)

    def action_filter(self) -> None:
        self.filter.start()

    def _filter_changed(self) -> None:
        self.filter.show_in(self.query_one("#filter", Static))
        self.refresh_view()

    def on_key(self, event: events.Key) -> None:
        self.filter.take(event)  # before the bindings: `k` or `z` typed after `/` is a letter

    def action_zeros(self) -> None:
        self.show_zeros = not self.show_zeros
        self.refresh_view()
