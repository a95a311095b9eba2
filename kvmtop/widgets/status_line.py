"""The status line: attached since, exits recorded, exits lost, stops per second."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from kvmtop.sources import SourceStatus
from kvmtop.stats import StatsSnapshot
from kvmtop.units import elapsed, human


class StatusLine(Static):
    DEFAULT_CSS = """
    StatusLine { height: 1; background: $panel; color: $text; padding: 0 1; }
    """

    def show(self, status: SourceStatus, snap: StatsSnapshot, frozen: bool) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {status.state} ", style="reverse")
        if frozen:
            text.append(" FROZEN (p) ", style="bold reverse")
        since = "for" if status.live else "at"
        text.append(f"  {since} {elapsed(status.since_s)}")
        text.append(f"   exits {human(snap.total)}")
        text.append("   lost ")
        text.append(str(snap.lost), style="bold red" if snap.lost else "")
        text.append(f"   stops/s {human(snap.stops_per_s)}")
        text.append(f"   vCPUs {len(snap.vcpus)}")
        self.update(text)
