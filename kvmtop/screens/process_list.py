"""The process list: the KVM processes on this machine, refreshed every 2 s, filtered as you
type, sorted by any column either way (keys or a click on the header); attaching to one is a
request to the app."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Static

from kvmtop.formats.report import cut
from kvmtop.host.discovery import KvmProcess, list_kvm_processes, not_yours
from kvmtop.host.process_sort import NAMES, marker, sorted_processes
from kvmtop.screens.requests import (
    AttachRequested,
    DemoRequested,
    DetachRequested,
    KernelRequested,
    WatchRequested,
)
from kvmtop.screens.typed_filter import TypedFilter
from kvmtop.units import elapsed, human, size
from kvmtop.widgets.key_footer import KeyFooter

PROCESS_REFRESH_S = 2.0
MIN_COMMAND_W, MAX_COMMAND_W = 8, 40


class ProcessListScreen(Screen[None]):
    """KVM processes; `/` filters, `s` `<` `>` `I` and header clicks sort, `a`/Enter attaches,
    `w` watches by sampling, `m` starts the demo."""

    BINDINGS = [
        Binding("a", "attach", "Attach", tooltip="Attach to the selected VMM"),
        Binding("enter", "attach", "Attach", show=False, tooltip="Attach to the selected VMM"),
        Binding("slash", "filter", "Filter",
                tooltip="Filter as you type: a regex found in the pid, user, name or command "
                "line, each on its own (^ and $ anchor to its ends)"),
        Binding("s", "sort(1)", "Sort", tooltip="Next sort column (or click a header)"),
        Binding("greater_than_sign", "sort(1)", "Next sort column", show=False, key_display=">",
                tooltip="Sort by the column to the right"),
        Binding("less_than_sign", "sort(-1)", "Previous sort column", show=False,
                key_display="<", tooltip="Sort by the column to the left"),
        Binding("I", "reverse", "Reverse", show=False, key_display="I",
                tooltip="Reverse the order of the sort"),
        # priority: before the table's own Home/End, which scroll sideways
        Binding("home", "first", "First", show=False, priority=True,
                tooltip="Move to the first process"),
        Binding("end", "last", "Last", show=False, priority=True,
                tooltip="Move to the last process"),
        Binding("k", "kernel", "Kernel",
                tooltip="KVM's own counters of the selected VM, without tracing it"),
        Binding("w", "watch", "Watch",
                tooltip="Watch the selected VM by sampling: where its vCPUs' time goes, untraced"),
        Binding("m", "demo", "Demo", tooltip="Start the built-in demo guest and attach to it"),
        Binding("d", "detach", "Detach", tooltip="Detach from the VMM being traced"),
        Binding("escape", "clear_filter", "Clear filter", show=False,
                tooltip="Clear the filter"),
    ]  # fmt: skip

    def __init__(
        self,
        lister: Callable[[], list[KvmProcess]] = list_kvm_processes,
        attached: Callable[[], tuple[int, ...]] = lambda: (),
        exit_rate: Callable[[int], float | None] = lambda pid: None,
        others: Callable[[], dict[str, list[int]]] = dict,
    ) -> None:
        super().__init__()
        self.lister = lister
        self.others = others  # {user: pids} of VMMs this user may not read, asked when none is
        self.attached = attached  # the pids kvmtop traces now (the first: the one asked for)
        self.exit_rate = exit_rate  # KVM's exits/s of a VM whose stats fds are held, else None
        self.procs: list[KvmProcess] = []
        self.sort_key = "PID"  # a column's name
        self.sort_reverse = False  # the other way than the column's natural order
        self.filter = TypedFilter(self._filter_changed)
        self.listed = False  # the first listing has arrived
        self._select: int | None = None  # the pid to put the cursor on at the next listing
        self.not_yours = ""  # what to say of other users' VMMs when none is listed
        self._command_w: int | None = None  # the command column's width, fitted to the screen

    def compose(self) -> ComposeResult:
        yield Static("kvmtop: KVM processes on this machine", id="title")
        yield Static("", id="filter")
        yield Static("looking for KVM processes...", id="empty")
        yield DataTable(id="procs", cursor_type="row", zebra_stripes=True)
        yield KeyFooter()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        self._add_columns()
        self.query_one("#filter").display = False
        table.focus()
        self.refresh_processes()
        self.set_interval(PROCESS_REFRESH_S, self.refresh_processes)

    @work(thread=True, exclusive=True)
    def refresh_processes(self) -> None:
        procs = self.lister()  # psutil and /proc: never on the UI thread
        self.not_yours = not_yours(others) if not procs and (others := self.others()) else ""
        self.app.call_from_thread(self._show, procs)

    def on_screen_resume(self) -> None:
        # back from the attached view: the TRACED BY column changed, and the cursor goes to the
        # VM traced (started with `m` or -p, its row was never under the cursor)
        self._select = next(iter(self.attached()), None)
        self.refresh_processes()

    def _add_columns(self, command_w: int | None = None) -> None:
        """The headers, the sorted one marked ▲ or ▼; the command's column ``command_w`` wide."""
        table = self.query_one(DataTable)
        table.clear(columns=True)
        self._command_w = command_w
        sign = marker(self.sort_key, self.sort_reverse)
        for name in NAMES:
            label = f"{name}{sign}" if name == self.sort_key else name
            table.add_column(label, key=name, width=command_w if name == "COMMAND" else None)

    def on_resize(self, _event: events.Resize) -> None:
        if self.listed:
            self._show(self.procs)

    def _fit_command(self, rows: list[list[Text | str]]) -> int:
        """The command column's width: what the other columns leave of the screen's, so that
        every column shows at 80 columns (names are cut, with …)."""
        table = self.query_one(DataTable)
        others = 0
        for i, column in enumerate(table.columns.values()):
            if column.key.value != "COMMAND":
                cells = [len(row[i]) for row in rows]
                others += max([len(str(column.label)), *cells]) + 2 * table.cell_padding
        room = self.size.width - others - 2 * table.cell_padding - 1  # a scrollbar's column
        width = max(MIN_COMMAND_W, min(MAX_COMMAND_W, room))
        if width != self._command_w:
            self._add_columns(width)
        return width

    def _show(self, procs: list[KvmProcess]) -> None:
        self.procs = procs
        self.listed = True
        table = self.query_one(DataTable)
        selected = self._select or self.selected_pid
        self._select = None
        table.clear()
        attached = self.attached()
        visible = self._visible()
        rows: list[list[Text | str]] = []
        for p in visible:
            ours = p.pid in attached
            traced = "kvmtop" if ours else (str(p.tracer_pid) if p.tracer_pid else "")
            rate = self.exit_rate(p.pid)
            pid = Text(
                f"▶ {p.pid}" if ours else str(p.pid), justify="right", style="bold" if ours else ""
            )
            rows.append([
                pid, p.user, p.name,
                Text(str(p.vcpus), justify="right"), Text(f"{p.cpu_percent:.0f}", justify="right"),
                Text(size(p.rss), justify="right"), Text(elapsed(p.uptime_s), justify="right"),
                traced, Text(human(rate) if rate is not None else "", justify="right"),
            ])  # fmt: skip
        command_w = self._fit_command(rows)
        for p, row in zip(visible, rows, strict=True):
            row[2] = cut(p.name, command_w)
            table.add_row(*row, key=str(p.pid))
        if selected is not None and str(selected) in table.rows:
            table.move_cursor(row=table.get_row_index(str(selected)))
        empty = self.query_one("#empty", Static)
        if not procs:
            found = (f"No KVM process of yours: {self.not_yours}." if self.not_yours else
                     "No KVM process found on this machine (or none this user may inspect).")  # fmt: skip
            empty.update(f"{found}\nPress [b]m[/b] to start the built-in demo guest and watch its "
                         "exits.")  # fmt: skip
        elif not table.row_count and self.filter.invalid:
            empty.update(f"{self.filter.text!r} is not a regex ({self.filter.invalid}); as plain "
                         "text it matches no KVM process (Esc clears the filter).")  # fmt: skip
        elif not table.row_count:
            empty.update(f"No KVM process matches {self.filter.text!r} in its pid, user, name or "
                         "command line (Esc clears the filter).")  # fmt: skip
        empty.display = not table.row_count
        shown = (
            f"{len(procs)}"
            if table.row_count == len(procs)
            else f"{table.row_count} of {len(procs)}"
        )
        self.query_one("#title", Static).update(
            f"kvmtop: KVM processes here: {shown}, sorted by {self.sort_key} "
            f"{marker(self.sort_key, self.sort_reverse)} (refreshed every {PROCESS_REFRESH_S:g} s)"
        )
        self.refresh_bindings()  # `d` shows only while attached

    def _visible(self) -> list[KvmProcess]:
        procs = [
            p for p in self.procs
            if self.filter.matches(str(p.pid), p.user, p.name, " ".join(p.cmdline))
        ]  # fmt: skip
        return sorted_processes(procs, self.sort_key, self.sort_reverse, self.exit_rate)

    @property
    def selected_pid(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return int(row_key.value) if row_key.value else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "detach":
            return bool(self.attached())  # shown only while attached
        return True

    def action_attach(self) -> None:
        pid = self.selected_pid
        if pid is not None:
            self.post_message(AttachRequested(pid))

    def action_detach(self) -> None:
        self.post_message(DetachRequested())

    def action_kernel(self) -> None:
        pid = self.selected_pid
        if pid is not None:
            self.post_message(KernelRequested(pid))

    def action_watch(self) -> None:
        pid = self.selected_pid
        if pid is not None:
            self.post_message(WatchRequested(pid))

    def action_filter(self) -> None:
        self.filter.start()

    def action_clear_filter(self) -> None:
        self.filter.clear()

    def _filter_changed(self) -> None:
        self.filter.show_in(self.query_one("#filter", Static))
        self._show(self.procs)

    def on_key(self, event: events.Key) -> None:
        self.filter.take(event)  # (see kvmtop.screens.typed_filter: keys in one burst)

    def action_first(self) -> None:
        self.query_one(DataTable).move_cursor(row=0)

    def action_last(self) -> None:
        table = self.query_one(DataTable)
        table.move_cursor(row=table.row_count - 1)

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_attach()

    def action_sort(self, step: int) -> None:
        self._sort_by(NAMES[(NAMES.index(self.sort_key) + step) % len(NAMES)], False)

    def action_reverse(self) -> None:
        self._sort_by(self.sort_key, not self.sort_reverse)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        # the sorted column clicked again: the other way, as in htop
        name = str(event.column_key.value)
        self._sort_by(name, not self.sort_reverse if name == self.sort_key else False)

    def _sort_by(self, column: str, reverse: bool) -> None:
        self.sort_key, self.sort_reverse = column, reverse  # the title and header say it
        self._add_columns(self._command_w)
        self._show(self.procs)

    def action_demo(self) -> None:
        self.post_message(DemoRequested())
