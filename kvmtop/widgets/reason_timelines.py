"""A vCPU's timeline per exit reason: one sparkline of exits per second for each reason seen,
the newest second on the right, and its peak; as many of the last 60 s as the pane's width
holds (the title says how many). The reasons come in the order given (`o`), the others after
them, busiest first."""

from __future__ import annotations

from rich.text import Text

from kvmtop.aggregate.exits import TIMELINE_SECONDS
from kvmtop.units import human
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane


class ReasonTimelines(ReasonPane):
    TITLE = "exits/s by reason: peak, last 60 s"

    def draw(self, by_reason: dict[str, tuple[int, ...]], order: tuple[str, ...] = ()) -> Text:
        text = Text(no_wrap=True, overflow="crop")
        name_w = max([len(palette.short(label)) for label in by_reason] + [6])
        seconds = max(0, min(TIMELINE_SECONDS, self.room[0] - name_w - 7))
        title = f"exits/s by reason: peak, last {seconds} s"
        if self.border_title != title:  # setting it lays the screen out again
            self.border_title = title
        place = {label: i for i, label in enumerate(order)}
        ranked = sorted(
            by_reason.items(), key=lambda kv: (place.get(kv[0], len(place)), -sum(kv[1]))
        )
        for label, series in ranked:
            style = palette.reason_style(self, label)
            shown = series[-seconds:] if seconds else ()
            text.append(f"{palette.short(label):<{name_w}} ", style=style)
            text.append(f"{human(max(shown, default=0)):>5} ")
            text.append("".join(palette.sparkline(list(shown))), style=style)
            text.append("\n")
        if not by_reason:
            text.append("no exits in the last 60 s", style="italic")
        text.rstrip()
        return text
