"""The live source: a tracing session (:class:`~kvmtop.sources.session.TraceSession`) as the
attached view reads it. Only reads the session: never traces or feeds the aggregate.
"""

from __future__ import annotations

import time

from kvmtop.aggregate.exits import StatsSnapshot, VcpuSnapshot
from kvmtop.sources.exit_source import SourceStatus, command_line
from kvmtop.sources.session import SessionState, TraceSession
from kvmtop.units import ended_text


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
        if s.every_vmm and s.state is not SessionState.IDLE:
            title = "every VMM on the host"
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
