"""The watch view's reasons pane: the whole VM's time in the VMM by exit reason, sampled, each
share with its 95% bound (the bar's solid part is the low bound, its light part reaches the
high one), beside KVM's exact exits/s of that reason where its counters count it and the mean
VMM time per exit that gives, net of KVM's own part of each exit (the subtitle says how much,
or that it was not timed)."""

from __future__ import annotations

from rich.text import Text

from kvmtop.sampling.entry_cost import EntryCost
from kvmtop.sampling.shares import COUNTER_OF_REASON, VcpuWatch
from kvmtop.units import duration, human
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane
from kvmtop.widgets.shares import SHARE_W, share_bar

IN_RUN = "in KVM_RUN"


class VmmReasons(ReasonPane):
    TITLE = "VM's time by exit reason, sampled ±95%"

    def draw(self, vm: VcpuWatch, entry: EntryCost | str = "not timed") -> Text:
        subtitle = (f"VMM/exit net of KVM's {entry.ns / 1e3:.1f} µs/exit"
                    if isinstance(entry, EntryCost) else f"KVM's part of each exit {entry}")  # fmt: skip
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle
        by_reason = vm.by_reason
        width = max(30, self.room[0])
        name_w = max([len(palette.short(r)) for r in by_reason] + [len(IN_RUN)])
        bar_w = max(4, width - name_w - SHARE_W - 22)
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{'':<{name_w}} {'share ±':>{SHARE_W}} {'exits/s':>9} {'VMM/exit':>9}\n",
                    style="bold")  # fmt: skip
        rows = [(IN_RUN, vm.in_run), *by_reason.items()]  # largest first
        for label, share in rows:
            style = palette.reason_style(self, label) if label != IN_RUN else None
            rate = vm.kvm_rates.get(COUNTER_OF_REASON.get(label, ""))
            mean = vm.mean_vmm_ns.get(label)
            text.append(f"{palette.short(label):<{name_w}} ", style=style or "")
            text.append(f"{share.text():>{SHARE_W}} ")
            text.append(f"{human(rate) if rate is not None else '':>9} ", style="bold")
            text.append(f"{duration(round(mean)) if mean is not None else '':>9} ")
            sure, open_ = share_bar(share, bar_w)
            text.append(sure, style=style or "dim")
            text.append(open_ + "\n", style=style or "dim")
        if not by_reason:
            text.append("no sample in the VMM yet", style="italic")
        text.rstrip()
        return text
