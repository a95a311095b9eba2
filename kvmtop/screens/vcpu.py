"""A vCPU's drill-down: its reasons beside a timeline per reason, its latencies per reason
beside its top IO ports and MMIO addresses, and a live log of its latest exits, decoded."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Static

from kvmtop.screens.watch import WatchScreen
from kvmtop.sources import ExitSource, SourceStatus
from kvmtop.stats import StatsSnapshot, VcpuSnapshot
from kvmtop.units import human
from kvmtop.widgets.exit_log import ExitLog
from kvmtop.widgets.key_footer import KeyFooter
from kvmtop.widgets.latency_pane import LatencyPane
from kvmtop.widgets.reason_bars import ReasonBars
from kvmtop.widgets.reason_timelines import ReasonTimelines
from kvmtop.widgets.status_line import StatusLine
from kvmtop.widgets.top_targets import TopTargets, lines_for


class VcpuScreen(WatchScreen):
    """Tab moves between the panes and the exit log (which scrolls); Esc goes back."""

    AUTO_FOCUS = "ExitLog"  # the log scrolls with the keys at once
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", tooltip="Back to the attached view")]

    def __init__(self, source: ExitSource, vcpu: int) -> None:
        super().__init__(source)
        self.vcpu = vcpu

    def compose(self) -> ComposeResult:
        yield Static(f"vCPU {self.vcpu}", id="title")
        with VerticalScroll(id="panes"):
            with Horizontal(id="top-row"):
                yield ReasonBars(title=f"vCPU {self.vcpu}: exit reasons")
                yield ReasonTimelines()
            with Horizontal(id="mid-row"):
                yield LatencyPane()
                yield TopTargets()
        yield ExitLog()
        yield StatusLine()
        yield KeyFooter()

    TOP = 0  # the whole VM's tables are not shown here
    LOG_LINES = 5  # the exit log's least, inside its border

    _shown_vcpu: VcpuSnapshot | None = None

    def on_resize(self, _event: events.Resize) -> None:
        self.fit()

    def fit(self) -> None:
        """The latency pane and the IO ports and MMIO addresses beside it get the lines their
        text takes, as far as that leaves the exit log its least (the latency pane then puts
        a reason on one line, not two); the log the rest."""
        v = self._shown_vcpu
        if v is None:
            return
        reasons = max(1, len(v.reasons))
        top = 2 + max(reasons, len(v.timeline_by_reason))
        room = self.size.height - 3 - top - (2 + self.LOG_LINES)  # title, status line, footer
        latency = 2 + 1 + 2 * reasons
        targets = 2 + lines_for(len(v.io), len(v.mmio))
        height = max(3 + reasons, min(room, max(latency, targets)))  # one line a reason, least
        self.query_one("#mid-row").styles.height = height

    def show(self, snap: StatsSnapshot, status: SourceStatus) -> None:
        v = self.source.vcpu_snapshot(self.vcpu, top=10)
        if v is None:  # a replay moved back to before this vCPU's first exit
            self.query_one("#title", Static).update(f"vCPU {self.vcpu}: no exits yet")
            self.query_one(ReasonBars).show((), 0)
            self.query_one(TopTargets).show((), ())
            self.query_one(ReasonTimelines).show({})
            self.query_one(LatencyPane).show(())
            self.query_one(ExitLog).show((), snap.first_ns)
            return
        tid = f" (thread {v.tid})" if v.tid else ""
        self.query_one("#title", Static).update(
            f"{v.name}{tid}: {human(v.total)} exits, {human(v.rate)}/s now   {status.title}"
        )
        self._shown_vcpu = v
        self.fit()
        bars = self.query_one(ReasonBars)
        if bars.border_title != f"{v.name}: exit reasons":  # setting it lays the screen out again
            bars.border_title = f"{v.name}: exit reasons"
        bars.show(v.reasons, v.total)
        self.query_one(TopTargets).show(v.io, v.mmio)
        self.query_one(ReasonTimelines).show(v.timeline_by_reason)
        self.query_one(LatencyPane).show(v.reasons)
        self.query_one(ExitLog).show(v.recent, snap.first_ns)
