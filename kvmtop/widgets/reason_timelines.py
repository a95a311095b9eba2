"""A vCPU's timeline per exit reason: one sparkline of exits per second for each reason seen,
the newest second on the right; as many of the last 60 s as the pane's width holds."""

from __future__ import annotations

from rich.text import Text

from kvmtop.units import human
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane


class ReasonTimelines(ReasonPane):
    TITLE = "exits/s by reason: peak, last 60 s"

    def draw(self, by_reason: dict[str, tuple[int, ...]]) -> Text:
        text = Text(no_wrap=True, overflow="crop")
        name_w = max([len(palette.short(label)) for label in by_reason] + [6])
        room = self.room[0] - name_w - 7
        ranked = sorted(by_reason.items(), key=lambda kv: -sum(kv[1]))
        for label, series in ranked:
            style = palette.reason_style(self, label)
            shown = series[-room:] if room > 0 else ()
            text.append(f"{palette.short(label):<{name_w}} ", style=style)
            text.append(f"{human(max(series, default=0)):>5} ")
            text.append("".join(palette.sparkline(list(shown))), style=style)
            text.append("\n")
        if not by_reason:
            text.append("no exits in the last 60 s", style="italic")
        text.rstrip()
        return text
