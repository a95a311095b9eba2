"""The status line: attached since (since when it ended, or where a replay is), the file being
recorded to, exits recorded, exits lost (must stay 0), events the kernel dropped (the tracepoint
engine; must stay 0), ptrace stops per second and per exit so far (or none), vCPUs."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from kvmtop.aggregate.exits import StatsSnapshot
from kvmtop.sources.exit_source import SourceStatus
from kvmtop.units import elapsed, human


class StatusLine(Static):
    DEFAULT_CSS = """
    StatusLine { height: 1; background: $panel; color: $text; padding: 0 1; }
    """

    def show(self, status: SourceStatus, snap: StatsSnapshot, frozen: bool) -> None:
        """The most telling first: what is cut at the end of a narrow line is the cost of
        tracing and the recording's file name (its ● stays in view)."""
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {status.state} ", style="reverse")
        if frozen:
            text.append(" FROZEN (p) ", style="bold reverse")
        if status.recording is not None:
            text.append(" ● rec ", style="bold red")
        if status.ended_s is not None:
            text.append(f"  {elapsed(status.ended_s)} ago, after {elapsed(status.since_s)} traced")
        elif status.live:
            text.append(f"  for {elapsed(status.since_s)}")
        else:
            length = f" / {elapsed(status.length_s)}" if status.length_s is not None else ""
            text.append(f"  at {elapsed(status.since_s)}{length}")
        # seeking, the panes (and ``snap``) wait: the count is of where the seek has got to
        exits = status.exits if status.busy and status.exits is not None else snap.total
        text.append(f"   vCPUs {len(snap.vcpus)}   exits {human(exits)}")
        text.append("   lost ")
        text.append(str(snap.lost), style="bold red" if snap.lost else "")
        if snap.dropped:  # the kernel's tracepoint events it could not write: exits missing
            text.append(f"   dropped {human(sum(n for _cpu, n in snap.dropped))} events",
                        style="bold red")  # fmt: skip
        if snap.total and not snap.stops:  # KVM's tracepoints, or seccomp's notifications
            text.append("   no stops")
        else:
            text.append(f"   stops/s {human(snap.stops_per_s)}")
            if snap.total:
                text.append(f" {snap.stops / snap.total:.1f}/exit")
        if status.recording is not None:
            text.append(f"   recording to {status.recording}")
        self.update(text)
