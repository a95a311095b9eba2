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

    _fields: list[Text] = []
    _name_last = False  # the last field is the recording's name, which may be cut

    def show(self, status: SourceStatus, snap: StatsSnapshot, frozen: bool) -> None:
        """The most telling first: what a narrow line leaves out, whole fields from the end, is
        the cost of tracing and the recording's file name (its ● stays in view)."""
        fields = [Text(f" {status.state} ", style="reverse")]
        if frozen:
            fields.append(Text(" FROZEN (p) ", style="bold reverse"))
        if status.recording is not None:
            fields.append(Text(" ● rec ", style="bold red"))
        if status.ended_s is not None:
            fields.append(
                Text(f"  {elapsed(status.ended_s)} ago, after {elapsed(status.since_s)} traced")
            )
        elif status.live:
            fields.append(Text(f"  for {elapsed(status.since_s)}"))
        else:
            length = f" / {elapsed(status.length_s)}" if status.length_s is not None else ""
            fields.append(Text(f"  at {elapsed(status.since_s)}{length}"))
        # seeking, the panes (and ``snap``) wait: the count is of where the seek has got to
        exits = status.exits if status.busy and status.exits is not None else snap.total
        fields.append(Text(f"   vCPUs {len(snap.vcpus)}"))
        fields.append(Text(f"   exits {human(exits)}"))
        fields.append(Text.assemble("   lost ", (str(snap.lost), "bold red" if snap.lost else "")))
        if snap.dropped:  # the kernel's tracepoint events it could not write: exits missing
            dropped = human(sum(n for _cpu, n in snap.dropped))
            fields.append(Text(f"   dropped {dropped} events", style="bold red"))
        if snap.total and not snap.stops:  # KVM's tracepoints, or seccomp's notifications
            fields.append(Text("   no stops"))
        else:
            fields.append(Text(f"   stops/s {human(snap.stops_per_s)}"))
            if snap.total:
                fields.append(Text(f" {snap.stops / snap.total:.1f}/exit"))
        if status.recording is not None:
            fields.append(Text(f"   recording to {status.recording}"))
        self._fields = fields
        self._name_last = status.recording is not None
        self.refresh()

    def render(self) -> Text:
        return fitted(self._fields, self.content_size.width, self._name_last)


NAME_SHOWN = 28  # "   recording to " and 12 cells of the name: cut (…) rather than left out


def fitted(fields: list[Text], width: int, cut_last: bool) -> Text:
    """``fields`` in order, each whole, up to the first that does not fit; the last, if
    ``cut_last``, is cut (…) instead where ``NAME_SHOWN`` cells of it fit. ``width`` 0: not laid
    out yet, all of them."""
    line = Text(no_wrap=True, overflow="ellipsis")
    for i, field in enumerate(fields):
        room = width - line.cell_len
        if width and field.cell_len > room:
            if cut_last and i == len(fields) - 1 and room >= NAME_SHOWN:
                field = field.copy()
                field.truncate(room, overflow="ellipsis")
                line.append_text(field)
            break
        line.append_text(field)
    return line
