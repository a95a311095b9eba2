"""A vCPU's drill-down: its reasons beside a timeline per reason, its latencies per reason
beside its top IO ports and MMIO addresses, and a live log of its latest exits, decoded, which
`/` filters."""

from __future__ import annotations

from dataclasses import replace

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.markup import escape
from textual.widgets import Static

from kvmtop.aggregate.exits import StatsSnapshot, VcpuSnapshot
from kvmtop.formats.guest_symbols import code_text
from kvmtop.screens.polled import REPLAY_BINDINGS, WatchScreen
from kvmtop.screens.typed_filter import TypedFilter
from kvmtop.sources.exit_source import ExitSource, SourceStatus
from kvmtop.units import human
from kvmtop.widgets.exit_log import ExitLog
from kvmtop.widgets.guest_code import GuestCodePane
from kvmtop.widgets.key_footer import KeyFooter
from kvmtop.widgets.latency_pane import LatencyPane
from kvmtop.widgets.latency_pane import lines_for as latency_lines
from kvmtop.widgets.reason_bars import ReasonBars
from kvmtop.widgets.reason_timelines import ReasonTimelines
from kvmtop.widgets.status_line import StatusLine
from kvmtop.widgets.top_targets import TopTargets, lines_for

LOG_TITLE = "latest exits, seconds since tracing began (/ filters, t time of day)"
CLOCK_LOG_TITLE = "latest exits, time of day (/ filters, t seconds since tracing began)"
# Not priority keys here: a priority key runs as it arrives, before the keys ahead of it in the
# same burst are handled, so a space typed in the filter right after `/` would pause the replay.
# The exit log binds none of them itself.
TYPED_REPLAY_KEYS = [
    replace(b, priority=False)
    for b in REPLAY_BINDINGS
    if b.key in ("space", "left_square_bracket", "right_square_bracket")
]


class VcpuScreen(WatchScreen):
    """Tab moves between the panes and the exit log (which scrolls); Esc goes back."""

    AUTO_FOCUS = "ExitLog"  # the log scrolls with the keys at once
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the attached view"),
        Binding("slash", "filter", "Filter", show=False,  # the log's title says it: room
                tooltip="Filter the exit log as you type: reason, port or address"),
        Binding("t", "clock", "Time of day", show=False,
                tooltip="The exit log's times: the time of day, or seconds since tracing began"),
        *TYPED_REPLAY_KEYS,
    ]  # fmt: skip

    def __init__(self, source: ExitSource, vcpu: int) -> None:
        super().__init__(source)
        self.vcpu = vcpu
        self.filter = TypedFilter(self._filter_changed)
        self._clock_on = False  # the exit log in time of day (t)

    def _log_title(self) -> str:
        return CLOCK_LOG_TITLE if self._clock_on else LOG_TITLE

    def action_filter(self) -> None:
        self.filter.start()

    def action_clock(self) -> None:
        self._clock_on = not self._clock_on
        self._log_clock()
        self._filter_changed()  # the title says which

    def _log_clock(self) -> None:
        status = self.source.status()
        self.query_one(ExitLog).use_clock(status.clock if self._clock_on else None)

    def _filter_changed(self) -> None:
        text = self.filter.text
        if self.filter.typing:
            title = f"latest exits /{text}█ (Enter keeps, Esc clears)"
        else:
            title = f"latest exits matching {text} (/ edits, Esc clears)" if text else ""
        if self.filter.invalid:
            title += f"; {self.filter.not_a_regex}"
        self.query_one(ExitLog).filter(self.filter.pattern if text else None,
                                       escape(title or self._log_title()))  # fmt: skip
        self.refresh_bindings()

    def on_key(self, event: events.Key) -> None:
        self.filter.take(event)  # (see kvmtop.screens.typed_filter: keys in one burst)

    def compose(self) -> ComposeResult:
        yield Static(f"vCPU {self.vcpu}", id="title")
        with VerticalScroll(id="panes"):
            with Horizontal(id="top-row"):
                yield ReasonBars(title=f"vCPU {self.vcpu}: exit reasons")
                yield ReasonTimelines()
            with Horizontal(id="mid-row"):
                yield LatencyPane()
                yield TopTargets()
            yield GuestCodePane(id="vcpu-code")
        log = ExitLog()
        log.border_title = LOG_TITLE
        symbols = getattr(self.app, "guest_symbols", None)
        log.code_of = lambda rip: code_text(rip, symbols)
        yield log
        yield StatusLine()
        yield KeyFooter()

    TOP = 0  # the whole VM's tables are not shown here
    LOG_LINES = 6  # the exit log's least, inside its border: its header and 5 exits

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
        latency = 2 + latency_lines(v.reasons)
        targets = 2 + lines_for(len(v.io), len(v.mmio), coalesced=v.coalesced[:4])
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
        coalesced = sum(c.count for c in v.coalesced)
        reasons = self.show_reasons(f"{v.name}: exit reasons", v.reasons, v.total, coalesced)
        self.query_one(TopTargets).show(v.io, v.mmio, True, v.coalesced[:4], snap.mmio_names)
        self.query_one(ReasonTimelines).show(v.timeline_by_reason, tuple(r.label for r in reasons))
        self.query_one(LatencyPane).show(reasons)
        code = self.query_one(GuestCodePane)
        code.display = bool(v.rips)
        if v.rips:
            code.show(*self.code_rows(v.rips, v.rips_by_time))
        self.query_one(ExitLog).show(v.recent, snap.first_ns)
