"""The attached view: one line per vCPU, the whole VM's exit reasons as bars, its latencies and
busiest IO ports and MMIO addresses, and the status line."""

from __future__ import annotations

from collections.abc import Callable

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from kvmtop.aggregate.exits import StatsSnapshot
from kvmtop.screens.polled import WatchScreen
from kvmtop.screens.requests import BackRequested, DetachRequested, KernelRequested
from kvmtop.screens.vcpu import VcpuScreen
from kvmtop.sources.exit_source import ExitSource, SourceStatus
from kvmtop.sources.live import LiveSource
from kvmtop.units import human
from kvmtop.widgets.guest_code import GuestCodePane
from kvmtop.widgets.guest_code import lines_for as code_lines
from kvmtop.widgets.key_footer import KeyFooter
from kvmtop.widgets.latency_pane import LatencyPane
from kvmtop.widgets.latency_pane import lines_for as latency_lines
from kvmtop.widgets.reason_bars import ReasonBars
from kvmtop.widgets.status_line import StatusLine
from kvmtop.widgets.top_targets import TopTargets, lines_for
from kvmtop.widgets.vcpu_table import MAX_LINES_PER_VCPU, VcpuTable

WIDE = 120  # columns: the app's -wide breakpoint


def kernel_rates_text(kernel: float, vmm: float | None, short: bool = False) -> str:
    """KVM counts every exit and handles most itself; some reach the VMM. The two rates, over
    the same interval, said so that the difference reads as what it is (``short``: in few
    words, beside a command line on a narrow screen)."""
    if vmm is None:
        return f"KVM: {human(kernel)} exits/s"
    if short:
        return f"KVM {human(kernel)} exits/s, VMM {human(vmm)}/s"
    if vmm <= kernel:
        return f"KVM: {human(kernel)} exits/s, {human(vmm)}/s of them reach the VMM"
    # a run a signal ends before the guest is entered returns to the VMM without an exit
    return f"KVM: {human(kernel)} exits/s; {human(vmm)} runs/s end in the VMM, some without one"


class AttachedScreen(WatchScreen):
    """Enter on a vCPU opens its drill-down; `d` detaches; Esc goes back to the process list."""

    BINDINGS = [
        Binding("d", "detach", "Detach", tooltip="Detach from the VMM (it runs on untraced)"),
        Binding(
            "k",
            "kernel",
            "Kernel",
            tooltip="KVM's own counters: every exit, also those KVM handles itself",
        ),
        Binding("g", "guest_rip", "RIPs",
                tooltip="Show which guest code makes the exits (as --rip): sets the vCPUs' "
                "kvm_valid_regs while traced"),
        Binding("w", "watch", "Watch",
                tooltip="Detach and watch the VMM by sampling instead (no cost to it; a there "
                "traces again)"),
        Binding("escape", "back", "Back", tooltip="Back to the process list (tracing goes on)"),
    ]  # fmt: skip

    _shown_state = ""
    _snap: StatsSnapshot | None = None  # the last shown, for the layout

    def __init__(self, source: ExitSource,
                 kernel_rates: Callable[[], tuple[float, float | None] | None] = lambda: None,
                 watch: Callable[[int], None] | None = None) -> None:  # fmt: skip
        super().__init__(source)
        self.watch = watch  # watching the pid by sampling instead (the app's)
        # KVM's own exits/s of the VM, when its counters are held, and the VMM's over the same
        # interval
        self.kernel_rates = kernel_rates

    def compose(self) -> ComposeResult:
        yield Static("", id="title")
        with Vertical(id="body"):
            yield VcpuTable(id="vcpus")
            yield ReasonBars(title="exit reasons, whole VM")
            with Horizontal(id="vm-row"):
                yield LatencyPane()
                yield TopTargets()
            yield GuestCodePane(id="guest-code")
        yield StatusLine()
        yield KeyFooter()

    def on_mount(self) -> None:  # (Textual then runs WatchScreen.on_mount too)
        self.query_one(VcpuTable).focus()

    def show(self, snap: StatsSnapshot, status: SourceStatus) -> None:
        if status.state != self._shown_state:  # e.g. detached: `d` leaves the footer
            self._shown_state = status.state
            self.refresh_bindings()
        title = status.title
        rates = self.kernel_rates() if status.live else None
        if rates is not None:  # first: a long command line would cut it off
            short = self.size.width < WIDE  # the command keeps some room
            title = f"[{kernel_rates_text(*rates, short=short)}: k]  {title}"
        self.query_one("#title", Static).update(title)
        self._snap = snap
        self.fit()
        self.query_one(VcpuTable).show(snap.vcpus)
        what = f"exit reasons, {'all VMs' if snap.many_vms else 'whole VM'}"
        reasons = self.show_reasons(what, snap.reasons, snap.total, snap.coalesced.total)
        self.query_one(LatencyPane).show(reasons)
        self.query_one(TopTargets).show(
            snap.io, snap.mmio, snap.top_exact, snap.coalesced.top[:4], snap.mmio_names
        )
        code = self.query_one(GuestCodePane)
        code.display = self._code_shown(snap)
        if code.display:
            rows, by_time = self.code_rows(snap.rips, snap.rips_by_time)
            code.show(rows, by_time)

    def _code_shown(self, snap: StatsSnapshot) -> bool:
        """The guest code pane, once RIPs are asked for (or a recording holds some)."""
        live = isinstance(self.source, LiveSource) and self.source.session.rip
        return bool(snap.rip_seen or live)

    def on_resize(self, _event: events.Resize) -> None:
        self.fit()

    def fit(self) -> None:
        """Give the vCPU pane the lines its vCPUs use (up to 8 each, at least 4 before they
        scroll) after the VM's panes have the lines their text takes; whatever is left goes to
        the VM's panes (the IO ports and MMIO addresses then show more rows)."""
        snap = self._snap
        if snap is None:
            return
        body = self.query_one("#body").size.height
        vcpus = max(1, len(snap.vcpus))
        bars = 2 + max(1, len(snap.reasons)) + (1 if snap.coalesced.total else 0)
        latency = latency_lines(snap.reasons) if snap.reasons else 1
        targets = lines_for(len(snap.io), len(snap.mmio), snap.top_exact, snap.coalesced.top[:4])
        code = 0
        if self._code_shown(snap):  # up to 6 addresses, as far as the vCPUs leave room
            code = 2 + code_lines(min(len(snap.rips), max(1, (body - bars - 14) // 2), 6))
            self.query_one(GuestCodePane).styles.height = code
        room = body - bars - code - (2 + max(latency, targets))
        per_vcpu = max(1, min(MAX_LINES_PER_VCPU, (room - 3) // vcpus))
        height = max(min(room, 3 + vcpus * per_vcpu), 3 + min(vcpus, 4))
        self.query_one(VcpuTable).styles.height = height

    def on_vcpu_table_selected(self, event: VcpuTable.Selected) -> None:
        # Enter typed fast: the later ones were routed here before the first one opened a screen
        # (is_current lags behind a push)
        if self.app.screen is self:
            self.app.push_screen(VcpuScreen(self.source, event.vcpu))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "detach":
            return isinstance(self.source, LiveSource) and self.source.attached
        if action == "kernel":
            return isinstance(self.source, LiveSource) and self.source.attached
        if action == "guest_rip":
            return (isinstance(self.source, LiveSource) and self.source.attached
                    and not self.source.session.rip)  # fmt: skip
        if action == "watch":
            return (
                self.watch is not None
                and isinstance(self.source, LiveSource)
                and (self.source.attached)
            )
        if action == "back":
            return isinstance(self.source, LiveSource)  # a replay has no process list
        return super().check_action(action, parameters)

    def action_detach(self) -> None:
        self.post_message(DetachRequested())

    def action_kernel(self) -> None:
        if isinstance(self.source, LiveSource) and self.source.session.pid is not None:
            self.post_message(KernelRequested(self.source.session.pid))

    def action_watch(self) -> None:
        # while the attach is under way too: `w` typed right after `a` watches again
        if self.watch is not None and isinstance(self.source, LiveSource) and (
                self.source.session.target_pids and self.app.screen is self):  # fmt: skip
            self.watch(self.source.session.target_pids[0])

    def action_guest_rip(self) -> None:
        if isinstance(self.source, LiveSource) and self.source.attached:
            self.source.session.want_rip()
            self.refresh_bindings()
            self.refresh_view()

    def action_back(self) -> None:
        self.post_message(BackRequested())
