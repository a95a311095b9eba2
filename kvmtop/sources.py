"""What the attached view watches: a live tracing session, or a recording played back
(:class:`kvmtop.replay.Replay`). Both answer the same few questions (a snapshot of the
aggregate, one vCPU's snapshot, a status), so every pane works the same on either.

Nothing here draws, traces or feeds the aggregate: the live source only reads a TraceSession.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

from kvmtop.session import SessionState, TraceSession
from kvmtop.stats import StatsSnapshot, VcpuSnapshot
from kvmtop.units import ended_text


@dataclass(frozen=True, slots=True)
class SourceStatus:
    title: str  # what is being watched
    state: str  # "attached", "replay 1x", "paused", "ended: exited with status 1", ...
    since_s: float  # seconds since tracing began (live) or since the recording's start (replay)
    live: bool
    length_s: float | None = None  # a recording's length, once known
    busy: bool = False  # a replay seeking: the panes wait, only the status line moves
    exits: int | None = None  # a replay: the exits of the aggregate at since_s (while seeking too)
    ended_s: float | None = None  # live, tracing over: seconds since it ended (since_s stops)
    recording: str | None = None  # live: the file being recorded to (-o)
    # (monotonic ns, Unix time) of one instant, to tell an exit's time of day: live, this
    # host's clocks now; a replay, the recording's start
    clock: tuple[int, float] | None = None


class ExitSource(Protocol):
    def version(self) -> object:
        """Equal to the last value as long as nothing a view shows has changed."""
        ...

    def snapshot(self, top: int | None = 8) -> StatsSnapshot: ...

    def vcpu_snapshot(self, vcpu: int, top: int | None = 10) -> VcpuSnapshot | None: ...

    def status(self) -> SourceStatus: ...


def command_line(argv: tuple[str, ...]) -> str:
    """argv for a title line: the program's base name, then its arguments."""
    return " ".join((os.path.basename(argv[0]), *argv[1:])) if argv else ""


class LiveSource:
    """A TraceSession as the attached view sees it: its aggregate, read at the current time.
    The session replaces its aggregate on each attach, so it is looked up on every read."""

    def __init__(self, session: TraceSession) -> None:
        self.session = session

    @property
    def attached(self) -> bool:
        return self.session.state in (SessionState.ATTACHED, SessionState.ATTACHING)

    def version(self) -> object:
        s = self.session  # rates and timelines move on with each second, even with no exits
        return (s.stats, s.stats.total, s.stats.lost, s.state, time.monotonic_ns() // 10**9)

    def snapshot(self, top: int | None = 8) -> StatsSnapshot:
        return self.session.stats.snapshot(time.monotonic_ns(), top=top)

    def reset(self) -> None:
        """Start the view's counts over; the recording, if any, has every exit all the same."""
        self.session.stats.reset()

    def vcpu_snapshot(self, vcpu: int, top: int | None = 10) -> VcpuSnapshot | None:
        return self.session.stats.vcpu_snapshot(vcpu, time.monotonic_ns(), top=top)

    def status(self) -> SourceStatus:
        s = self.session
        title = f"pid {s.pid}  {command_line(s.argv)}" if s.pid else "not attached"
        now = time.monotonic_ns()
        until, ended_s = now, None
        if s.state is SessionState.ENDED and s.ended_at_ns is not None:
            until, ended_s = s.ended_at_ns, (now - s.ended_at_ns) / 1e9
        since = (until - s.attached_at_ns) / 1e9 if s.attached_at_ns else 0.0
        recording = s.record_path if s.state is SessionState.ATTACHED else None
        state = s.state.value
        if s.state is SessionState.ATTACHING:
            state = "attaching..."
        elif s.state is SessionState.ENDED:
            state = (
                f"ended: {ended_text(s.exit_status)}" if s.exit_status is not None else "detached"
            )
        return SourceStatus(title, state, since, live=True, ended_s=ended_s, recording=recording,
                            clock=(time.monotonic_ns(), time.time()))  # fmt: skip
