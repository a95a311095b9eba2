"""Where the attached view's exits come from: a live tracing session, or a recording played
back. Both expose the same aggregate and clock, so every pane works the same on either.

Nothing here draws or traces: the live source reads a TraceSession; the replay source feeds a
Recording into its own ExitStats as its clock advances.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kvmtop.events import ExitBatch
from kvmtop.recording import Recording, open_recording
from kvmtop.session import SessionState, TraceSession
from kvmtop.stats import ExitStats


@dataclass(frozen=True, slots=True)
class SourceStatus:
    title: str  # what is being watched
    state: str  # "attached", "replay 1.0x", "paused", "ended: exited with status 1", ...
    since_s: float  # seconds since the start of tracing (or of the recording)
    live: bool


def command_line(argv: tuple[str, ...]) -> str:
    """argv for a title line: the program's base name, then its arguments."""
    return " ".join((os.path.basename(argv[0]), *argv[1:])) if argv else ""


class LiveSource:
    """A TraceSession as the attached view sees it."""

    def __init__(self, session: TraceSession) -> None:
        self.session = session

    @property
    def stats(self) -> ExitStats:
        return self.session.stats

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def advance(self) -> None:
        pass  # the tracer feeds the aggregate itself

    def status(self) -> SourceStatus:
        s = self.session
        title = f"pid {s.pid}  {command_line(s.argv)}" if s.pid else "not attached"
        since = (time.monotonic_ns() - s.attached_at_ns) / 1e9 if s.attached_at_ns else 0.0
        state = s.state.value
        if s.state is SessionState.ENDED:
            state = (
                f"ended: exited with status {s.exit_status}"
                if s.exit_status is not None
                else "detached"
            )
        return SourceStatus(title, state, since, live=True)


class ReplaySource:
    """Plays a recording at ``speed`` times real time; pause, seek and speed change at will.
    Seeking backwards rebuilds the aggregate from the start (streaming: memory stays bounded)."""

    SPEEDS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0)

    def __init__(self, path: str) -> None:
        self.recording: Recording = open_recording(path)
        self.path = path
        self.speed = 1.0
        self.paused = False
        self.start_ns = self.recording.meta.start_ns
        self.position_ns = self.start_ns
        self.end_ns: int | None = None  # known once the whole file has been read
        self._wall = time.monotonic()
        self._restart()

    def _restart(self) -> None:
        self.stats = ExitStats()
        self._batches: Iterator[ExitBatch] = self.recording.batches(max_events=512)
        self._pending: ExitBatch | None = None
        self._fed_ns = self.start_ns

    def now_ns(self) -> int:
        return self.position_ns

    def advance(self) -> None:
        """Move the clock by the wall time since the last call, and feed what it passed."""
        wall = time.monotonic()
        if not self.paused:
            self.position_ns += int((wall - self._wall) * 1e9 * self.speed)
        self._wall = wall
        if self.end_ns is not None and self.position_ns > self.end_ns:
            self.position_ns = self.end_ns
        self._feed_to(self.position_ns)

    def _feed_to(self, target_ns: int) -> None:
        while True:
            batch = self._pending
            if batch is None:
                batch = next(self._batches, None)
                if batch is None:
                    self.end_ns = self._fed_ns
                    if self.recording.end is not None:
                        self.end_ns = max(self._fed_ns, self.recording.end.t_ns)
                    return
            events = batch.events
            if events and events[-1].exit_ns > target_ns:
                cut = next(i for i, e in enumerate(events) if e.exit_ns > target_ns)
                if cut:
                    self.stats.add_batch(
                        ExitBatch(events[:cut], batch.vcpus, batch.lost, batch.stops)
                    )
                    batch = ExitBatch(events[cut:])
                elif batch.vcpus or batch.stops or batch.lost:
                    self.stats.add_batch(ExitBatch((), batch.vcpus, batch.lost, batch.stops))
                    batch = ExitBatch(events)
                self._pending = batch
                self._fed_ns = target_ns
                return
            self.stats.add_batch(batch)
            self._pending = None
            if events:
                self._fed_ns = events[-1].exit_ns

    def toggle_pause(self) -> None:
        self.paused = not self.paused

    def seek(self, delta_s: float) -> None:
        target = max(self.start_ns, self.position_ns + int(delta_s * 1e9))
        if self.end_ns is not None:
            target = min(target, self.end_ns)
        if target < self._fed_ns:
            self._restart()
        self.position_ns = target
        self._feed_to(target)

    def seek_to(self, fraction: float) -> None:
        """Jump to a fraction (0..1) of the recording (the end must be known: read to it)."""
        if self.end_ns is None:
            self._feed_to(2**62)
        end = self.end_ns or self.start_ns
        self._restart()
        self.position_ns = self.start_ns + int((end - self.start_ns) * max(0.0, min(1.0, fraction)))
        self._feed_to(self.position_ns)

    def faster(self, step: int) -> None:
        i = min(range(len(self.SPEEDS)), key=lambda k: abs(self.SPEEDS[k] - self.speed))
        self.speed = self.SPEEDS[max(0, min(len(self.SPEEDS) - 1, i + step))]

    def status(self) -> SourceStatus:
        meta = self.recording.meta
        state = "paused" if self.paused else f"replay {self.speed:g}x"
        if self.end_ns is not None and self.position_ns >= self.end_ns:
            state = "replay ended"
        title = f"{self.path}: pid {meta.pid}  {command_line(meta.argv)}"
        return SourceStatus(title, state, (self.position_ns - self.start_ns) / 1e9, live=False)


ExitSource = LiveSource | ReplaySource
