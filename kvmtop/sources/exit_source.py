"""What the attached view watches: a live tracing session (:class:`kvmtop.sources.live.LiveSource`),
or a recording played back (:class:`kvmtop.sources.replay.Replay`). Both answer the same few questions (a snapshot of the
aggregate, one vCPU's snapshot, a status), so every pane works the same on either.

Nothing here draws, traces or feeds the aggregate, and nothing here imports a source: what every
source gives, for the views (and widgets) to read. The sources are :mod:`kvmtop.sources.live`,
:mod:`kvmtop.sources.replay` and :mod:`kvmtop.sources.watch_feed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from kvmtop.aggregate.exits import StatsSnapshot, VcpuSnapshot


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
