"""The histogram pane: every exit reason seen, with count, share and rate, as horizontal bars."""

from __future__ import annotations

from rich.text import Text

from kvmtop.aggregate.exits import ReasonStats
from kvmtop.units import human
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane

NO_EXIT = "coalesced (no exit)"


class ReasonBars(ReasonPane):
    TITLE = "exit reasons"

    def draw(self, reasons: tuple[ReasonStats, ...], total: int, coalesced: int = 0) -> Text:
        width = max(20, self.room[0])
        name_w = max([len(palette.short(r.label)) for r in reasons] + [6])
        if coalesced:
            name_w = max(name_w, len(NO_EXIT))
        bar_w = max(4, width - name_w - 32)
        text = Text(no_wrap=True, overflow="crop")
        if not reasons:
            text.append("no exits yet", style="italic")
        peak = max((r.count for r in reasons), default=1)
        for r in reasons:
            share = 100 * r.count / total if total else 0.0
            style = palette.reason_style(self, r.label)
            text.append(f"{palette.short(r.label):<{name_w}} ", style=style)
            text.append(f"{human(r.count):>8} {share:5.1f}% {human(r.rate):>7}/s ")
            cells = max(1 if r.count else 0, round(r.count * bar_w / peak))
            text.append("█" * cells, style=style)
            text.append("\n")
        if coalesced:  # writes KVM queued without an exit: no share of the exits
            text.append(f"{NO_EXIT:<{name_w}} {human(coalesced):>8}\n", style="italic")
        text.rstrip()
        return text
