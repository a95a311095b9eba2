"""The watch view's busiest IO ports and MMIO addresses by the VMM's time handling them,
sampled (±95%), as many of each as the pane's height holds."""

from __future__ import annotations

from rich.text import Text

from kvmtop.abi.mmio_names import fit_name
from kvmtop.sampling.shares import SiteShare
from kvmtop.widgets.pane import ReasonPane
from kvmtop.widgets.shares import SHARE_W

Sites = tuple[SiteShare, ...]
LABEL_W = 18  # "0x0080 out POST"; wider panes show more of longer names


def lines_for(ports: int, addresses: int) -> int:
    return 3 + max(1, ports) + max(1, addresses)


def _label(site: SiteShare, width: int) -> str:
    """The site's label in ``width`` columns: an MMIO name shortened in its device, its register
    kept (``0xfeb02e60 read vio23 InterruptStatus``)."""
    if len(site.label) <= width or site.reason != "KVM_EXIT_MMIO" or not site.name:
        return site.label[:width]
    last = site.name.split()[-1]
    for prefix in (site.prefix, site.prefix[: -len(site.direction) + 1]):  # "read", then "r"
        shown = f"{prefix} {fit_name(site.name, max(0, width - len(prefix) - 1))}"
        if shown.endswith(f" {last}") and len(shown) <= width:
            return shown
    return shown[:width]


class SampledTargets(ReasonPane):
    TITLE = "ports, addresses: VMM time"  # 29 columns inside the pane at 80

    def draw(self, ports: Sites, addresses: Sites) -> Text:
        room = self.room[1] - 3
        address_rows = min(len(addresses), max(1, room // 2), max(1, room - len(ports)))
        port_rows = max(1, room - address_rows)
        label_w = max(LABEL_W, self.room[0] - SHARE_W)
        text = Text(no_wrap=True, overflow="crop")
        for title, rows, shown in (("IO port", ports, port_rows),
                                   ("MMIO address", addresses, address_rows)):  # fmt: skip
            if title != "IO port":
                text.append("\n")
            text.append(f"{title:<{label_w}}{'share ±':>{SHARE_W}}\n", style="bold")
            for site in rows[: max(1, shown)]:
                text.append(f"{_label(site, label_w):<{label_w}}{site.share.text():>{SHARE_W}}\n")
            if not rows:
                text.append("(none)\n", style="italic")
        text.rstrip()
        return text
