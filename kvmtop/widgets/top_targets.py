"""The busiest IO ports (well-known x86 ports named) and MMIO addresses, as many of each as the
pane's height holds."""

from __future__ import annotations

from rich.text import Text

from kvmtop.arch import HOST
from kvmtop.stats import MmioCount, PortCount
from kvmtop.units import human
from kvmtop.widgets.pane import ReasonPane


def lines_for(io: int, mmio: int, exact: bool = True) -> int:
    """The lines the pane's text takes with ``io`` ports and ``mmio`` addresses."""
    return 3 + max(1, io) + max(1, mmio) + (0 if exact else 1)


class TopTargets(ReasonPane):
    TITLE = "top IO ports and MMIO addresses"

    def draw(
        self, io: tuple[PortCount, ...], mmio: tuple[MmioCount, ...], exact: bool = True
    ) -> Text:
        # two headers and a blank line between the tables; the rest split between them
        room = self.room[1] - 3 - (0 if exact else 1)
        mmio_rows = min(len(mmio), max(1, room // 2), max(1, room - len(io)))
        io_rows = max(1, room - mmio_rows)
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{'IO port':<8}{'dir':<4}{'size':>4}{'count':>8}  name\n", style="bold")
        for p in io[:io_rows]:
            name = HOST.PORT_NAMES.get(p.port, "")
            text.append(f"0x{p.port:04x}  {p.direction:<4}{p.size:>4}{human(p.count):>8}  {name}\n")
        if not io:
            text.append("(none)\n", style="italic")
        text.append(f"\n{'MMIO address':<15}{'op':<6}{'len':>3}{'count':>8}\n", style="bold")
        for m in mmio[: max(1, mmio_rows)]:
            op = "write" if m.write else "read"
            text.append(f"0x{m.address:<13x}{op:<6}{m.length:>3}{human(m.count):>8}\n")
        if not mmio:
            text.append("(none)\n", style="italic")
        if not exact:
            text.append("(bounded table: counts are upper bounds)", style="italic")
        text.rstrip()
        return text
