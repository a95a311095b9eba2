"""Latency per exit reason: time in the guest per KVM_RUN and the VMM's handling time, with
min, median, p99, max and a small log2 histogram."""

from __future__ import annotations

from rich.text import Text

from kvmtop.stats import LatencyHistogram, ReasonStats
from kvmtop.units import duration
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane


def log2_strip(h: LatencyHistogram, first: int = 8, last: int = 34) -> str:
    """Buckets 2^first..2^last ns (256 ns .. 17 s) as sparkline glyphs."""
    return "".join(palette.sparkline(list(h.buckets[first : last + 1])))


class LatencyPane(ReasonPane):
    TITLE = "latency: in the guest | VMM handling (log2 histogram 256ns..17s)"

    def show(self, reasons: tuple[ReasonStats, ...]) -> None:
        text = Text(no_wrap=True, overflow="crop")
        name_w = max([len(palette.short(r.label)) for r in reasons] + [6])
        text.append(
            f"{'reason':<{name_w}} {'':2}{'min':>9}{'p50':>9}{'p99':>9}{'max':>9}  {'256ns':<27}\n",
            style="bold",
        )
        for r in reasons:
            style = palette.reason_style(self, r.label)
            for kind, h in (("guest", r.guest), ("vmm", r.handling)):
                name = palette.short(r.label) if kind == "guest" else ""
                text.append(f"{name:<{name_w}} ", style=style)
                text.append(f"{kind[0]} ")
                if h.count:
                    cells = [duration(v) for v in (h.min_ns, h.median, h.p99, h.max_ns)]
                    text.append("".join(f"{c:>9}" for c in cells) + "  ")
                    text.append(log2_strip(h), style=style)
                else:
                    text.append(f"{'-':>9}" * 4)
                text.append("\n")
        if not reasons:
            text.append("no exits yet", style="italic")
        text.rstrip()
        self.update(text)
