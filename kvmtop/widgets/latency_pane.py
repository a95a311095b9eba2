"""Latency per exit reason: time in the guest per KVM_RUN and the VMM's handling time (and,
attached, that time net of kvmtop's stops, with where its mean lies), with median and p99, and,
as the pane's width allows, max, min and a small log2 histogram; where its height does not allow
two lines a reason, medians and p99s on one."""

from __future__ import annotations

from rich.text import Text

from kvmtop.aggregate.exits import LatencyHistogram, ReasonStats, bound_text
from kvmtop.units import duration
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane

FIRST, LAST = 8, 34  # the histogram's powers of two: 2^8 ns .. 2^34 ns (256 ns .. 17 s)
HIST_W = LAST - FIRST + 1
NUM_W = 8  # "132.3µs" and a space
NAME_W = 5  # "exit", "MMIO"; longer names are cut where the pane is narrow


def log2_strip(h: LatencyHistogram, first: int = FIRST, last: int = LAST) -> str:
    """Powers of two 2^first..2^last ns (256 ns .. 17 s) as sparkline glyphs, the first holding
    the shorter times too (a net time of 0) and the last the longer ones."""
    octaves = h.octaves()
    shown = octaves[first : last + 1]
    shown[0] += sum(octaves[:first])
    shown[-1] += sum(octaves[last + 1 :])
    return "".join(palette.sparkline(shown))


def lines_for(reasons: tuple[ReasonStats, ...]) -> int:
    """The lines of the full table: a header, and a line per time a reason (g, v and n)."""
    return 1 + (2 + any(r.handling_net.count for r in reasons)) * len(reasons)


def columns_for(width: int, name_w: int) -> tuple[list[str], bool]:
    """The statistics a line of ``width`` holds, in their order, and whether the histogram fits:
    p50 and p99 always, then max, min and the histogram as there is room."""
    room = width - name_w - 3 - 2 * NUM_W
    shown = ["p50", "p99"]
    for extra in ("max", "min"):
        if room >= NUM_W:
            shown.insert(0 if extra == "min" else len(shown), extra)
            room -= NUM_W
    return shown, room >= 2 + HIST_W


class LatencyPane(ReasonPane):
    TITLE = "latency: g guest, v VMM, n net"

    def draw(self, reasons: tuple[ReasonStats, ...]) -> Text:
        text = Text(no_wrap=True, overflow="crop")
        if not reasons:
            return Text("no exits yet", style="italic")
        width, lines = self.room
        longest = max(len(palette.short(r.label)) for r in reasons)
        if lines < lines_for(reasons) and width >= 4 + 4 * NUM_W:  # "MMIO", 4 numbers
            return self.draw_one_line_each(reasons, max(4, min(longest, width - 4 * NUM_W)))
        name_w = max(NAME_W, min(longest, width - 3 - 3 * NUM_W))
        shown, histogram = columns_for(width, name_w)
        # the net's mean on a line of its own where the row has no room for it and lines are spare
        net_rows = any(r.handling_net.count for r in reasons)
        mean_line = net_rows and lines >= 1 + 4 * len(reasons)
        self.border_title = self.TITLE + (", log2 histogram" if histogram else "")
        text.append(f"{'exit':<{name_w}}   " + "".join(f"{c:>{NUM_W}}" for c in shown),
                    style="bold")  # fmt: skip
        if histogram:  # both ends of its axis
            text.append("  " + "<512ns".ljust(HIST_W - 4) + "≥17s", style="bold")
        text.append("\n")
        for r in reasons:
            style = palette.reason_style(self, r.label)
            rows = (("g", r.guest), ("v", r.handling))
            if r.handling_net.count:
                rows += (("n", r.handling_net),)
            for kind, h in rows:
                name = palette.short(r.label)[:name_w] if kind == "g" else ""
                text.append(f"{name:<{name_w}} ", style=style)
                text.append(f"{kind} ")
                if not h.count:
                    text.append(f"{'-':>{NUM_W}}" * len(shown) + "\n")
                    continue
                if kind == "n" and not r.net_known:
                    # per-exit estimates floored at 0: where their mean cannot be told, nor can
                    # their spread
                    text.append(
                        f"{'unknown':>{NUM_W}}  (within the spread of kvmtop's own stops)\n"
                    )
                    continue
                values = {"min": h.min_ns, "p50": h.median, "p99": h.p99, "max": h.max_ns}
                cells = [duration(values[c]) for c in shown]
                if kind == "n" and not r.net_median_known:  # most estimates cut at 0
                    cells = [
                        "cut" if c in ("min", "p50") else v
                        for c, v in zip(shown, cells, strict=True)
                    ]
                text.append("".join(f"{v:>{NUM_W}}" for v in cells))
                mean = f"mean {bound_text(r.net_mean_bound)}" if kind == "n" else ""
                room = width - name_w - 3 - NUM_W * len(shown)
                if histogram and (not mean or room >= 2 + HIST_W + 2 + len(mean)):
                    text.append("  ")
                    text.append(log2_strip(h), style=style)
                    room -= 2 + HIST_W
                if mean and room >= 2 + len(mean):  # else in place of the net's histogram
                    text.append(f"  {mean}")
                elif mean and mean_line:
                    text.append(f"\n{'':<{name_w}}   {mean}")
                text.append("\n")
        text.rstrip()
        return text

    def draw_one_line_each(self, reasons: tuple[ReasonStats, ...], name_w: int) -> Text:
        """Where the pane is too short for a line per time: a reason's guest median and p99 and
        its VMM median on one line, and the VMM's p99 or, where measured, its median net of
        kvmtop's stops (the VMM's median stays: `o` orders by it)."""
        text = Text(no_wrap=True, overflow="crop")
        net = any(r.handling_net.count for r in reasons)
        self.border_title = f"latency: g guest, v VMM{', n net' if net else ''}"
        heads = ("g p50", "g p99", "v p50", "n p50" if net else "v p99")
        text.append(f"{'exit':<{name_w}}" + "".join(f"{h:>{NUM_W}}" for h in heads) + "\n",
                    style="bold")  # fmt: skip
        for r in reasons:
            text.append(f"{palette.short(r.label)[:name_w]:<{name_w}}",
                        style=palette.reason_style(self, r.label))  # fmt: skip
            last = r.handling_net.median if net else r.handling.p99
            cells = ((r.guest, r.guest.median), (r.guest, r.guest.p99),
                     (r.handling, r.handling.median), (r.handling_net if net else r.handling, last))  # fmt: skip
            shown = [duration(v) if h.count else "-" for h, v in cells]
            if net and r.handling_net.count and not r.net_median_known:
                shown[-1] = "unknown"  # estimates floored at 0: no basis, or most of them cut
            text.append("".join(f"{v:>{NUM_W}}" for v in shown))
            text.append("\n")
        text.rstrip()
        return text
