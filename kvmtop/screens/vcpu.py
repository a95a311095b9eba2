"""A vCPU's drill-down: its reasons, a timeline per reason, latencies per reason, its top IO
ports and MMIO addresses, and a live log of its latest exits, decoded."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static

from kvmtop.screens.watch import WatchScreen
from kvmtop.sources import ExitSource, SourceStatus
from kvmtop.stats import StatsSnapshot
from kvmtop.units import human
from kvmtop.widgets.exit_log import ExitLog
from kvmtop.widgets.key_footer import KeyFooter
from kvmtop.widgets.latency_pane import LatencyPane
from kvmtop.widgets.reason_bars import ReasonBars
from kvmtop.widgets.reason_timelines import ReasonTimelines
from kvmtop.widgets.status_line import StatusLine
from kvmtop.widgets.top_targets import TopTargets


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
                with Vertical(id="reasons-column"):
                    yield ReasonBars(title=f"vCPU {self.vcpu}: exit reasons")
                    yield ReasonTimelines()
                yield TopTargets()
            yield LatencyPane()
        yield ExitLog()
        yield StatusLine()
        yield KeyFooter()

    TOP = 0  # the whole VM's tables are not shown here

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
            f"vCPU {self.vcpu}{tid}: {human(v.total)} exits, {human(v.rate)}/s now   {status.title}"
        )
        self.query_one(ReasonBars).show(v.reasons, v.total)
        self.query_one(TopTargets).show(v.io, v.mmio)
        self.query_one(ReasonTimelines).show(v.timeline_by_reason)
        self.query_one(LatencyPane).show(v.reasons)
        self.query_one(ExitLog).show(v.recent, snap.first_ns)
