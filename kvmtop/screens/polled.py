"""What the attached view and the drill-down share: a source polled 4 times a second (`+`/`-`
and `-d` change that), `p` to freeze the view while tracing goes on and `r` to reset its counts
(live only), `o` to order the exit reasons by count, rate or latency, and the replay keys
(pause, seek, speed), offered only when the source is a recording."""

from __future__ import annotations

from textual.binding import Binding
from textual.screen import Screen

from kvmtop.aggregate.exits import REASON_ORDERS, ReasonStats, StatsSnapshot, reasons_by
from kvmtop.aggregate.guest_code import RipCount
from kvmtop.formats.guest_symbols import code_text
from kvmtop.sources.exit_source import ExitSource, SourceStatus
from kvmtop.sources.live import LiveSource
from kvmtop.sources.replay import Replay
from kvmtop.widgets.guest_code import CodeRow
from kvmtop.widgets.reason_bars import ReasonBars
from kvmtop.widgets.status_line import StatusLine

REFRESH_S = 0.25  # snapshot polls: 4 Hz, whatever the exit rate
REFRESH_STEPS = (0.25, 0.5, 1.0, 2.0, 5.0)  # `+` and `-` move along these

REPLAY_ACTIONS = frozenset({"pause", "seek", "seek_to", "speed"})
# one footer item per pair of keys: the footer then fits 80 columns
SEEK = Binding.Group("Seek 10s", compact=True)
SPEED = Binding.Group("Speed", compact=True)
# priority: the replay keys win over the focused pane's own scrolling keys
REPLAY_BINDINGS = [
    Binding("space", "pause", "Pause", priority=True, tooltip="Pause or play the recording"),
    Binding("left", "seek(-10)", "-10s", priority=True, group=SEEK,
            tooltip="Seek 10 s back (the view is rebuilt from the start)"),
    Binding("right", "seek(10)", "+10s", priority=True, group=SEEK, tooltip="Seek 10 s forward"),
    Binding("home", "seek_to(0)", "Start", show=False, priority=True,
            tooltip="Seek to the start of the recording"),
    Binding("end", "seek_to(1)", "End", show=False, priority=True,
            tooltip="Seek to the end of the recording"),
    Binding("left_square_bracket", "speed(-1)", "Slower", key_display="[", priority=True,
            group=SPEED, tooltip="Play slower"),
    Binding("right_square_bracket", "speed(1)", "Faster", key_display="]", priority=True,
            group=SPEED, tooltip="Play faster"),
]  # fmt: skip


class WatchScreen(Screen[None]):
    """A screen that shows a source: subclasses fill :meth:`show`."""

    TOP = 8  # IO ports / MMIO addresses per snapshot

    BINDINGS = [
        Binding("p", "freeze", "Freeze", tooltip="Freeze or unfreeze the view (tracing goes on)"),
        Binding("r", "reset", "Reset", show=False,
                tooltip="Reset the counts, rates and histograms shown (a recording is untouched)"),
        Binding("o", "reason_order", "Order", show=False,
                tooltip="Order the exit reasons: by count, by rate, by VMM p50, by VMM total"),
        Binding("plus", "refresh_every(1)", "Slower refresh", show=False, key_display="+",
                tooltip="Refresh the view less often (0.25 s, 0.5, 1, 2, 5 s)"),
        Binding("minus", "refresh_every(-1)", "Faster refresh", show=False, key_display="-",
                tooltip="Refresh the view more often"),
        *REPLAY_BINDINGS,
    ]  # fmt: skip

    def __init__(self, source: ExitSource) -> None:
        super().__init__()
        self.source = source
        self.frozen = False
        self._shown_version: object = None
        self._last_snapshot: StatsSnapshot | None = None

    def on_mount(self) -> None:
        self.refresh_view()
        self._every = self.refresh_s
        self._timer = self.set_interval(self._every, self._tick)

    @property
    def refresh_s(self) -> float:
        """The app's refresh interval (`+`/`-`), which every view follows."""
        return float(getattr(self.app, "refresh_s", REFRESH_S))

    @property
    def reason_order(self) -> str:
        """How the reasons are ordered (`o`), the same on every view."""
        return str(getattr(self.app, "reason_order", "count"))

    def ordered(self, reasons: tuple[ReasonStats, ...]) -> tuple[ReasonStats, ...]:
        return reasons_by(reasons, self.reason_order)

    def reasons_title(self, title: str) -> str:
        """A reasons pane's title, saying the order when it is not the usual one (by count)."""
        order = self.reason_order
        return title if order == "count" else f"{title}, by {order}"

    def show_reasons(
        self, title: str, reasons: tuple[ReasonStats, ...], total: int, coalesced: int = 0
    ) -> tuple[ReasonStats, ...]:
        """The reasons pane, titled (saying the order) and ordered; returns the order."""
        bars = self.query_one(ReasonBars)
        title = self.reasons_title(title)
        if bars.border_title != title:  # setting it lays the screen out again
            bars.border_title = title
        ordered = self.ordered(reasons)
        bars.show(ordered, total, coalesced)
        return ordered

    def code_rows(self, by_exits: tuple[RipCount, ...],
                  by_time: tuple[RipCount, ...]) -> tuple[tuple[CodeRow, ...], bool]:  # fmt: skip
        """The guest code pane's rows, named with the app's guest symbols, in the `o` order:
        by the VMM's time where the reasons are ordered by it, else by exits."""
        by_vmm = self.reason_order.startswith("VMM")
        symbols = getattr(self.app, "guest_symbols", None)
        rows = tuple((r.label, r.count, r.vmm_ns, code_text(r, symbols))
                     for r in (by_time if by_vmm else by_exits))  # fmt: skip
        return rows, by_vmm

    def action_reason_order(self) -> None:
        orders = list(REASON_ORDERS)
        order = orders[(orders.index(self.reason_order) + 1) % len(orders)]
        self.app.reason_order = order  # type: ignore[attr-defined]
        self.refresh_view()  # the reasons pane's title says the order

    def _tick(self) -> None:
        if not self.is_current:  # a screen under another one does not draw
            return
        if self._every != self.refresh_s:  # changed on another view
            self._restart_timer()
        version = self.source.version()
        if version != self._shown_version:  # an idle VMM or a paused replay: nothing to redraw
            self._shown_version = version
            self.refresh_view()

    def refresh_view(self) -> None:
        status = self.source.status()
        if status.busy and self._last_snapshot is not None:
            # a long seek: snapshots would only slow the player down; show its progress
            self.query_one(StatusLine).show(status, self._last_snapshot, self.frozen)
            return
        snap = self.source.snapshot(top=self.TOP)
        self._last_snapshot = snap
        self.query_one(StatusLine).show(status, snap, self.frozen)
        if not self.frozen:
            self.show(snap, status)

    def show(self, snap: StatsSnapshot, status: SourceStatus) -> None:
        """Fill the panes (not called while frozen)."""
        raise NotImplementedError

    @property
    def replay(self) -> Replay | None:
        return self.source if isinstance(self.source, Replay) else None

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in REPLAY_ACTIONS:
            return self.replay is not None  # hidden from the footer when live
        if action == "freeze":
            return self.replay is None  # a replay has Pause, which holds the whole view
        if action == "reset":
            return isinstance(self.source, LiveSource)  # a replay has Home
        return True

    def _restart_timer(self) -> None:
        self._timer.stop()
        self._every = self.refresh_s
        self._timer = self.set_interval(self._every, self._tick)

    def action_refresh_every(self, step: int) -> None:
        i = min(range(len(REFRESH_STEPS)), key=lambda k: abs(REFRESH_STEPS[k] - self.refresh_s))
        every = REFRESH_STEPS[max(0, min(len(REFRESH_STEPS) - 1, i + step))]
        self.app.refresh_s = every  # type: ignore[attr-defined]
        self._restart_timer()
        self.notify(f"the view refreshes every {every:g} s", timeout=2)

    def action_reset(self) -> None:
        if isinstance(self.source, LiveSource):
            self.source.reset()
            self.refresh_view()
            self.notify("counts, rates and histograms reset (tracing and recording go on)",
                        timeout=2)  # fmt: skip

    def action_freeze(self) -> None:
        self.frozen = not self.frozen
        self.refresh_view()

    def action_pause(self) -> None:
        if self.replay is not None:
            self.replay.toggle_pause()
            self.refresh_view()

    def action_seek(self, seconds: float) -> None:
        if self.replay is not None:
            self.replay.seek(seconds)
            self.refresh_view()

    def action_seek_to(self, fraction: float) -> None:
        if self.replay is not None:
            self.replay.seek_to(fraction)
            self.refresh_view()

    def action_speed(self, step: int) -> None:
        if self.replay is not None:
            self.replay.faster(step)
            self.refresh_view()
