"""A vCPU's timeline per exit reason: one 60 s sparkline for each reason seen."""

from __future__ import annotations

from rich.text import Text

from kvmtop.units import human
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane


class ReasonTimelines(ReasonPane):
    TITLE = "exits per second by reason, last 60 s"

    def show(self, by_reason: dict[str, tuple[int, ...]]) -> None:
        text = Text(no_wrap=True, overflow="crop")
        name_w = max([len(palette.short(label)) for label in by_reason] + [6])
        ranked = sorted(by_reason.items(), key=lambda kv: -sum(kv[1]))
        for label, series in ranked:
            style = palette.reason_style(self, label)
            text.append(f"{palette.short(label):<{name_w}} ", style=style)
            text.append("".join(palette.sparkline(series)), style=style)
            text.append(f" peak {human(max(series))}/s\n")
        if not by_reason:
            text.append("no exits in the last 60 s", style="italic")
        text.rstrip()
        self.update(text)
