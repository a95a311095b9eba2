"""What the attached view and the drill-down share: a source polled 4 times a second, `p` to
freeze the view while tracing goes on, and the replay keys (pause, seek, speed), which are
offered only when the source is a recording."""

from __future__ import annotations

from textual.binding import Binding
from textual.screen import Screen

from kvmtop.replay import Replay
from kvmtop.sources import ExitSource, SourceStatus
from kvmtop.stats import StatsSnapshot
from kvmtop.widgets.status_line import StatusLine

REFRESH_S = 0.25  # snapshot polls: 4 Hz, whatever the exit rate

REPLAY_ACTIONS = frozenset({"pause", "seek", "seek_to", "speed"})
# priority: the replay keys win over the focused pane's own scrolling keys
REPLAY_BINDINGS = [
    Binding("space", "pause", "Pause", priority=True, tooltip="Pause or play the recording"),
    Binding("left", "seek(-10)", "-10s", priority=True,
            tooltip="Seek 10 s back (the view is rebuilt from the start)"),
    Binding("right", "seek(10)", "+10s", priority=True, tooltip="Seek 10 s forward"),
    Binding("home", "seek_to(0)", "Start", show=False, priority=True,
            tooltip="Seek to the start of the recording"),
    Binding("end", "seek_to(1)", "End", show=False, priority=True,
            tooltip="Seek to the end of the recording"),
    Binding("left_square_bracket", "speed(-1)", "Slower", key_display="[", priority=True,
            tooltip="Play slower"),
    Binding("right_square_bracket", "speed(1)", "Faster", key_display="]", priority=True,
            tooltip="Play faster"),
]  # fmt: skip


class WatchScreen(Screen[None]):
    """A screen that shows a source: subclasses fill :meth:`show`."""

    TOP = 8  # IO ports / MMIO addresses per snapshot

    BINDINGS = [
        Binding("p", "freeze", "Freeze", tooltip="Freeze or unfreeze the view (tracing goes on)"),
        *REPLAY_BINDINGS,
    ]

    def __init__(self, source: ExitSource) -> None:
        super().__init__()
        self.source = source
        self.frozen = False
        self._shown_version: object = None
        self._last_snapshot: StatsSnapshot | None = None

    def on_mount(self) -> None:
        self.refresh_view()
        self.set_interval(REFRESH_S, self._tick)

    def _tick(self) -> None:
        if not self.is_current:  # a screen under another one does not draw
            return
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
        return True

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
