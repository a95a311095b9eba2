"""The kvmtop TUI: pick a KVM process, attach with one key, watch every vCPU's exits live.

Screens: the process list, the attached view (one line per vCPU, the VM's histogram, a status
line) and a vCPU's drill-down. The UI never traces and never computes statistics: it polls a
snapshot of the aggregate a few times a second, so its cost does not grow with the exit rate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Markdown, Static

from kvmtop.discovery import KvmProcess, list_kvm_processes
from kvmtop.errors import KvmUnavailable
from kvmtop.minivmm import demo_command
from kvmtop.session import SessionState, TraceSession
from kvmtop.sources import ExitSource, LiveSource, ReplaySource
from kvmtop.units import elapsed, size
from kvmtop.widgets.exit_log import ExitLog
from kvmtop.widgets.latency_pane import LatencyPane
from kvmtop.widgets.reason_bars import ReasonBars
from kvmtop.widgets.reason_timelines import ReasonTimelines
from kvmtop.widgets.status_line import StatusLine
from kvmtop.widgets.top_targets import TopTargets
from kvmtop.widgets.vcpu_table import VcpuTable

REFRESH_S = 0.25  # snapshot polls: 4 Hz
PROCESS_REFRESH_S = 2.0
SORT_KEYS = ("pid", "cpu", "vcpus", "name", "rss", "uptime")


class ProcessListScreen(Screen[None]):
    """KVM processes, refreshed every 2 s; `/` filters, `s` sorts, `a`/Enter attaches."""

    BINDINGS = [
        Binding("a", "attach", "Attach"),
        Binding("enter", "attach", "Attach", show=False),
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("m", "demo", "Demo"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, lister: Callable[[], list[KvmProcess]] = list_kvm_processes) -> None:
        super().__init__()
        self.lister = lister
        self.procs: list[KvmProcess] = []
        self.sort_key = "pid"
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield Static("kvmtop: KVM processes", id="title")
        yield Input(placeholder="filter by pid, user or command", id="filter")
        yield Static("", id="empty")
        yield DataTable(id="procs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("PID", "USER", "COMMAND", "VCPUS", "CPU%", "RSS", "UPTIME", "TRACED")
        self.query_one("#filter").display = False
        table.focus()
        self.refresh_processes()
        self.set_interval(PROCESS_REFRESH_S, self.refresh_processes)

    @work(thread=True, exclusive=True)
    def refresh_processes(self) -> None:
        procs = self.lister()  # psutil and /proc: never on the UI thread
        self.app.call_from_thread(self._show, procs)

    def _show(self, procs: list[KvmProcess]) -> None:
        self.procs = procs
        table = self.query_one(DataTable)
        selected = self._selected_pid()
        table.clear()
        attached = getattr(self.app, "attached_pid", None)
        for p in self._visible():
            traced = "kvmtop" if p.pid == attached else (str(p.tracer_pid) if p.tracer_pid else "")
            table.add_row(
                str(p.pid), p.user, p.name[:40], str(p.vcpus), f"{p.cpu_percent:.0f}",
                size(p.rss), elapsed(p.uptime_s), traced, key=str(p.pid),
            )  # fmt: skip
        if selected is not None and str(selected) in table.rows:
            table.move_cursor(row=table.get_row_index(str(selected)))
        empty = self.query_one("#empty", Static)
        if not procs:
            empty.update(
                "No KVM process found on this machine. Press [b]m[/b] to start the built-in demo guest."
            )
        elif not table.row_count:
            empty.update(f"No KVM process matches {self.filter_text!r}.")
        empty.display = not table.row_count

    def _visible(self) -> list[KvmProcess]:
        needle = self.filter_text.lower()
        procs = [
            p for p in self.procs
            if not needle or needle in f"{p.pid} {p.user} {p.name} {' '.join(p.cmdline)}".lower()
        ]  # fmt: skip
        key = {
            "pid": lambda p: (p.pid,),
            "cpu": lambda p: (-p.cpu_percent, p.pid),
            "vcpus": lambda p: (-p.vcpus, p.pid),
            "name": lambda p: (p.name, p.pid),
            "rss": lambda p: (-p.rss, p.pid),
            "uptime": lambda p: (-p.uptime_s, p.pid),
        }[self.sort_key]
        return sorted(procs, key=key)

    def _selected_pid(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return int(row_key.value) if row_key.value else None

    def action_attach(self) -> None:
        pid = self._selected_pid()
        if pid is not None:
            self.app.attach(pid)  # type: ignore[attr-defined]

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.query_one(DataTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self._show(self.procs)

    def on_input_submitted(self, _event: Input.Submitted) -> None:
        self.query_one(DataTable).focus()

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_attach()

    def action_sort(self) -> None:
        self.sort_key = SORT_KEYS[(SORT_KEYS.index(self.sort_key) + 1) % len(SORT_KEYS)]
        self.notify(f"sorted by {self.sort_key}", timeout=1.5)
        self._show(self.procs)

    def action_demo(self) -> None:
        self.app.start_demo()  # type: ignore[attr-defined]


class AttachedScreen(Screen[None]):
    """One line per vCPU, the VM's reason histogram, and the status line."""

    BINDINGS = [
        Binding("d", "detach", "Detach"),
        Binding("p", "freeze", "Freeze"),
        Binding("escape", "back", "Back"),
        Binding("space", "pause", "Pause replay", show=False),
        Binding("left", "seek(-10)", "-10 s", show=False),
        Binding("right", "seek(10)", "+10 s", show=False),
        Binding("[", "speed(-1)", "Slower", show=False),
        Binding("]", "speed(1)", "Faster", show=False),
    ]

    def __init__(self, source: ExitSource) -> None:
        super().__init__()
        self.source = source
        self.frozen = False

    def compose(self) -> ComposeResult:
        yield Static("", id="title")
        with Vertical(id="body"):
            yield VcpuTable(id="vcpus")
            yield ReasonBars(title="exit reasons, whole VM")
            with Horizontal(id="vm-row"):
                yield LatencyPane()
                yield TopTargets()
        yield StatusLine()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(VcpuTable).focus()
        self.refresh_view()
        self.set_interval(REFRESH_S, self.refresh_view)

    def refresh_view(self) -> None:
        self.source.advance()
        snap = self.source.stats.snapshot(self.source.now_ns(), top=8)
        status = self.source.status()
        self.query_one(StatusLine).show(status, snap, self.frozen)
        if self.frozen:
            return
        self.query_one("#title", Static).update(status.title)
        self.query_one(VcpuTable).show(snap.vcpus)
        self.query_one(ReasonBars).show(snap.reasons, snap.total)
        self.query_one(LatencyPane).show(snap.reasons)
        self.query_one(TopTargets).show(snap.io, snap.mmio, snap.top_exact)

    def on_vcpu_table_selected(self, event: VcpuTable.Selected) -> None:
        self.app.push_screen(VcpuScreen(self.source, event.vcpu))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        replay = isinstance(self.source, ReplaySource)
        if action in ("pause", "seek", "speed"):
            return replay
        if action == "detach":
            return not replay
        return True

    def action_detach(self) -> None:
        self.app.detach()  # type: ignore[attr-defined]

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        self.refresh_view()

    def action_back(self) -> None:
        self.app.back_to_list()  # type: ignore[attr-defined]

    def action_pause(self) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.toggle_pause()
            self.refresh_view()

    def action_seek(self, seconds: float) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.seek(seconds)
            self.refresh_view()

    def action_speed(self, step: int) -> None:
        if isinstance(self.source, ReplaySource):
            self.source.faster(step)
            self.refresh_view()


class VcpuScreen(Screen[None]):
    """One vCPU: its histogram, timelines per reason, latencies, top targets, latest exits."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("p", "freeze", "Freeze"),
    ]

    def __init__(self, source: ExitSource, vcpu: int) -> None:
        super().__init__()
        self.source = source
        self.vcpu = vcpu
        self.frozen = False

    def compose(self) -> ComposeResult:
        yield Static(f"vCPU {self.vcpu}", id="title")
        with VerticalScroll(id="panes"):
            with Horizontal(id="top-row"):
                yield ReasonBars(title=f"vCPU {self.vcpu}: exit reasons")
                yield TopTargets()
            yield ReasonTimelines()
            yield LatencyPane()
        yield ExitLog()
        yield StatusLine()
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(REFRESH_S, self.refresh_view)

    def refresh_view(self) -> None:
        self.source.advance()
        now = self.source.now_ns()
        snap = self.source.stats.snapshot(now, top=0)
        self.query_one(StatusLine).show(self.source.status(), snap, self.frozen)
        if self.frozen:
            return
        v = self.source.stats.vcpu_snapshot(self.vcpu, now, top=10)
        if v is None:
            return
        tid = f" (thread {v.tid})" if v.tid else ""
        self.query_one("#title", Static).update(
            f"vCPU {self.vcpu}{tid}: {v.total} exits, {v.rate:.0f}/s now   {self.source.status().title}"
        )
        self.query_one(ReasonBars).show(v.reasons, v.total)
        self.query_one(TopTargets).show(v.io, v.mmio)
        self.query_one(ReasonTimelines).show(v.timeline_by_reason)
        self.query_one(LatencyPane).show(v.reasons)
        self.query_one(ExitLog).show(v.recent, snap.first_ns)

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        self.refresh_view()


HELP = """\
# kvmtop keys

| where | key | does |
|---|---|---|
| everywhere | `q` | quit (detaching first: the VMM runs on) |
| | `?` | this help |
| | `ctrl+p` | command palette (every action) |
| process list | `↑` `↓` | move |
| | `a` / `Enter` | attach to the selected VMM |
| | `/` | filter as you type (`Esc` clears) |
| | `s` | sort: pid, CPU, vCPUs, name, RSS, uptime |
| | `m` | start the built-in demo guest and attach |
| attached view | `↑` `↓` `PgUp` `PgDn` | choose a vCPU |
| | `Enter` | open the vCPU's drill-down |
| | `d` | detach (the VMM runs on untraced) |
| | `p` | freeze the view (tracing goes on) |
| | `Esc` | back to the process list |
| replay | `space` | pause / play |
| | `←` `→` | seek 10 s back / forward |
| | `[` `]` | slower / faster |
| vCPU drill-down | `p` | freeze |
| | `Esc` | back |

**Columns.** *exits/s*: exits in the last whole second. *timeline*: exits per second over the
last 60 s, each second coloured by its most frequent reason. *guest*: time inside `KVM_RUN`;
*VMM* (handling): time from an exit until that vCPU's next `KVM_RUN`. *lost* must stay 0.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90; max-height: 90%; border: round $accent; background: $surface; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(HELP)


class KvmtopApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "kvmtop"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self,
        pid: int | None = None,
        argv: list[str] | None = None,
        replay: str | None = None,
        demo: bool = False,
        record_path: str | None = None,
        process_lister: Callable[[], list[KvmProcess]] = list_kvm_processes,
    ) -> None:
        super().__init__()
        self.process_lister = process_lister
        self.start_pid = pid
        self.start_argv = argv
        self.replay_path = replay
        self.start_demo_now = demo
        self.record_path = record_path
        self.session: TraceSession | None = None
        self.demo_running = False
        self.replay_source = ReplaySource(replay) if replay else None  # errors before the TUI

    @property
    def attached_pid(self) -> int | None:
        s = self.session
        return s.pid if s is not None and s.state is SessionState.ATTACHED else None

    def on_mount(self) -> None:
        if self.replay_source is not None:
            self.push_screen(AttachedScreen(self.replay_source))
            return
        self.push_screen(ProcessListScreen(self.process_lister))
        if self.start_pid is not None:
            self.attach(self.start_pid)
        elif self.start_argv:
            self._watch(lambda s: s.launch(self.start_argv or []))
        elif self.start_demo_now:
            self.start_demo()
        self.set_interval(REFRESH_S, self._take_notices)

    def _session(self) -> TraceSession:
        if self.session is None:
            self.session = TraceSession(record_path=self.record_path, child_stdio=os.devnull)
        return self.session

    def _watch(self, begin: object) -> None:
        session = self._session()
        if session.state in (SessionState.ATTACHED, SessionState.ATTACHING):
            self.notify(
                f"already attached to pid {session.pid}: detach first (d)", severity="warning"
            )
            return
        begin(session)  # type: ignore[operator]
        self.push_screen(AttachedScreen(LiveSource(session)))

    def attach(self, pid: int) -> None:
        self._watch(lambda s: s.attach(pid))

    def start_demo(self) -> None:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.notify(
                "the demo needs /dev/kvm, which is missing or not accessible", severity="error"
            )
            return
        self.demo_running = True
        self._watch(lambda s: s.launch(demo_command()))

    def detach(self) -> None:
        if self.session is not None and self.session.state is SessionState.ATTACHED:
            self.session.detach()

    def back_to_list(self) -> None:
        if isinstance(self.screen, AttachedScreen) and len(self.screen_stack) > 2:
            self.pop_screen()
        elif isinstance(self.screen, AttachedScreen) and self.replay_source is None:
            self.switch_screen(ProcessListScreen(self.process_lister))

    def _take_notices(self) -> None:
        if self.session is None:
            return
        for severity, message in self.session.take_notices():
            self.notify(message, severity=severity, timeout=6)  # type: ignore[arg-type]
        if self.session.state is SessionState.FAILED:
            self.session.state = SessionState.IDLE
            if isinstance(self.screen, AttachedScreen):
                self.pop_screen()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "Every key of kvmtop", self.action_help)
        if isinstance(screen, ProcessListScreen):
            yield SystemCommand(
                "Attach", "Attach to the selected KVM process", screen.action_attach
            )
            yield SystemCommand("Filter", "Filter the process list", screen.action_filter)
            yield SystemCommand(
                "Sort", "Sort the process list by the next column", screen.action_sort
            )
            yield SystemCommand("Demo", "Start the built-in demo guest and attach", self.start_demo)
        if isinstance(screen, AttachedScreen):
            if self.replay_source is None:
                yield SystemCommand("Detach", "Detach from the VMM (it runs on)", self.detach)
            else:
                yield SystemCommand("Pause", "Pause or play the replay", screen.action_pause)
            yield SystemCommand("Freeze", "Freeze or unfreeze the view", screen.action_freeze)
            yield SystemCommand("Back", "Back to the process list", screen.action_back)
        if isinstance(screen, VcpuScreen):
            yield SystemCommand("Freeze", "Freeze or unfreeze the view", screen.action_freeze)

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit(0)

    def shutdown(self) -> None:
        """Detach (the VMM runs on); the demo guest, which kvmtop started, is stopped."""
        if self.session is not None:
            self.session.close(kill_launched=self.demo_running)
            self.session = None


def run_tui(
    *,
    pid: int | None = None,
    argv: list[str] | None = None,
    replay: str | None = None,
    demo: bool = False,
    record_path: str | None = None,
) -> int:
    """The TUI; returns the exit status. Errors a user can fix are raised before it opens."""
    if pid is not None:
        from kvmtop.procfs import check_attachable

        check_attachable(pid)
    if demo and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise KvmUnavailable("kvmtop demo needs /dev/kvm (KVM), which is missing or not accessible")
    app = KvmtopApp(pid=pid, argv=argv, replay=replay, demo=demo, record_path=record_path)
    try:
        result = app.run()
    finally:
        app.shutdown()
    return int(result or 0)
