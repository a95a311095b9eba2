"""The watch view's vCPU pane: one block per vCPU, as the attached view's: its exits/s from
KVM's counters (exact), its share of time in the VMM now (sampled, ±95%), a 60 s timeline of
that share (each second's bar out of 100%), and a stacked bar of its VMM time by exit reason,
with the largest reasons by name below it as the pane has room. Drawing only: the watcher's
snapshot holds every number."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style

from kvmtop.sampling.shares import VcpuWatch
from kvmtop.units import human
from kvmtop.widgets import palette
from kvmtop.widgets.shares import SHARE_W
from kvmtop.widgets.vcpu_table import (
    ID_W,
    LEGEND_W,
    RATE_W,
    Columns,
    VcpuTable,
    stacked_bar,
    timeline_width,
)

NUMBERS_W = ID_W + RATE_W + SHARE_W + 4


def dominant(v: VcpuWatch) -> str | None:
    """The reason that takes most of the vCPU's VMM time (its timeline's colour)."""
    return next(iter(v.by_reason), None)  # largest first


class SampledVcpus(VcpuTable, inherit_bindings=False):
    """The attached view's vCPU pane, its rows a watcher's vCPUs (Enter opens nothing)."""

    BINDINGS = [b for b in VcpuTable.BINDINGS if b.action != "open"]  # type: ignore[union-attr]
    DEFAULT_CSS = VcpuTable.DEFAULT_CSS.replace("VcpuTable", "SampledVcpus")
    COLUMNS = Columns(
        f"{'in VMM ±':>{SHARE_W}}",
        ("share of time in the VMM", "in the VMM"),
        "VMM time by reason",
        NUMBERS_W,
    )

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.border_title = "vCPUs: exits/s exact (KVM's counters); time in the VMM sampled"

    def show(self, rows: tuple[VcpuWatch, ...]) -> None:  # type: ignore[override]
        self.take_rows(rows)  # its title stays

    @property
    def selected_vcpu(self) -> int | None:
        return None

    def vcpu_line(self, v: VcpuWatch, sub: int, base: Style, width: int) -> list[Segment]:  # type: ignore[override]
        k = self.lines_per_vcpu
        muted = base + Style(dim=True)
        id_w = self.id_w
        numbers_w = NUMBERS_W + id_w - ID_W
        if sub == 0:
            rate = human(v.exits_per_s) if v.exits_per_s is not None else "-"
            numbers = f"{v.label:>{id_w}} {rate:>{RATE_W}} {v.vmm.text():>{SHARE_W}}  "
            segments = [Segment(numbers, base)]
        elif sub == 1:
            run = f"in run {v.in_run.text()}"
            segments = [Segment(f"{run:>{numbers_w - 2}}  ", muted)]
        elif sub == 2 and v.vmm_own is not None:  # the VMM's share net of KVM's part
            own = f"VMM's own {100 * v.vmm_own.low:.0f}-{100 * v.vmm_own.high:.0f}%"
            segments = [Segment(f"{own:>{numbers_w - 2}}  ", muted)]
        else:
            segments = [Segment(" " * numbers_w, base)]
        seconds = timeline_width(width, id_w, NUMBERS_W)
        history = [round(100 * s) for s in v.history[-seconds:]]
        glyphs = "".join(palette.chart_row(history, sub, k, top=100)).rjust(seconds)
        segments.append(Segment(glyphs, base + palette.reason_style(self, dominant(v))))
        segments.append(Segment("  ", base))
        bar_w = max(0, width - numbers_w - seconds - 2)
        reasons = list(v.by_reason.items())  # largest first
        if sub == 0:
            parts = [(label, share.hits) for label, share in reasons]
            segments += stacked_bar(self, parts, v.vmm.hits, bar_w, base)
        elif sub <= len(reasons) and bar_w >= LEGEND_W:
            label, share = reasons[sub - 1]
            style = base + palette.reason_style(self, label)
            segments.append(Segment(f"{palette.short(label)[:12]:<12}", style))
            segments.append(Segment(f"{share.text():>{SHARE_W}}", muted))
        return segments
