"""The busiest IO ports (well-known x86 ports named) and MMIO addresses (named by mmio_names), as many of each as the
pane's height holds; below each table's exits, its writes that KVM coalesced (no exit)."""

from __future__ import annotations

from rich.text import Text

from kvmtop.abi.arch import HOST
from kvmtop.abi.mmio_names import MmioNames, fit_name
from kvmtop.aggregate.exits import CoalescedCount, MmioCount, PortCount
from kvmtop.units import human
from kvmtop.widgets.pane import ReasonPane

NO_EXIT = "coalesced (no exit)"
NARROW = 48  # columns below which MMIO rows are compact
NARROW_ROW, WIDE_ROW = 21, 34  # columns an MMIO row takes before its name


def _name_in(name: str, width: int) -> str:
    """The whole name where it fits, else shortened with its register kept."""
    return name if len(name) <= width else fit_name(name, width)


def lines_for(
    io: int, mmio: int, exact: bool = True, coalesced: tuple[CoalescedCount, ...] = ()
) -> int:
    """The lines the pane's text takes with ``io`` ports and ``mmio`` addresses, and the
    targets of coalesced writes under a heading of their own in each table."""
    return 3 + max(1, io) + max(1, mmio) + (0 if exact else 1) + _coalesced_lines(coalesced)


def _coalesced_lines(coalesced: tuple[CoalescedCount, ...]) -> int:
    pio = sum(c.pio for c in coalesced)
    return len(coalesced) + (1 if pio else 0) + (1 if len(coalesced) > pio else 0)


class TopTargets(ReasonPane):
    TITLE = "top IO ports and MMIO addresses"

    def draw(
        self, io: tuple[PortCount, ...], mmio: tuple[MmioCount, ...], exact: bool = True,
        coalesced: tuple[CoalescedCount, ...] = (), names: MmioNames | None = None,
    ) -> Text:  # fmt: skip
        # two headers and a blank line between the tables; the rest split between them
        ports = [c for c in coalesced if c.pio]
        addresses = [c for c in coalesced if not c.pio]
        room = self.room[1] - 3 - (0 if exact else 1) - _coalesced_lines(coalesced)
        mmio_rows = min(len(mmio), max(1, room // 2), max(1, room - len(io)))
        io_rows = max(1, room - mmio_rows)
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{'IO port':<8}{'dir':<4}{'size':>4}{'count':>8}  name\n", style="bold")
        for p in io[:io_rows]:
            name = HOST.PORT_NAMES.get(p.port, "")
            text.append(f"0x{p.port:04x}  {p.direction:<4}{p.size:>4}{human(p.count):>8}  {name}\n")
        if ports:
            text.append(f"{NO_EXIT}\n", style="italic")
        for c in ports:
            name = HOST.PORT_NAMES.get(c.address, "")
            text.append(f"0x{c.address:04x}  {'out':<4}{c.length:>4}{human(c.count):>8}  {name}\n")
        if not io and not ports:
            text.append("(none)\n", style="italic")
        narrow = self.room[0] < NARROW
        if narrow:  # op and len as "w4", names shortened: "0xfeb00050 w4   1.2k vio0 QueueNotify"
            text.append(f"\n{'MMIO':<10} {'op':<2}{'count':>7} name\n", style="bold")
        else:
            text.append(
                f"\n{'MMIO address':<15}{'op':<6}{'len':>3}{'count':>8}  name\n", style="bold"
            )
        for m in mmio[: max(1, mmio_rows)]:
            op = "write" if m.write else "read"
            if narrow:
                name = fit_name(m.name, self.room[0] - NARROW_ROW)
                text.append(
                    f"0x{m.address:<8x} {op[0]}{m.length:<1}{human(m.count):>7} {name}".rstrip()
                    + "\n"
                )
            else:
                text.append(
                    f"0x{m.address:<13x}{op:<6}{m.length:>3}{human(m.count):>8}  "
                    f"{_name_in(m.name, self.room[0] - WIDE_ROW)}\n"
                )
        if addresses:
            text.append(f"{NO_EXIT}\n", style="italic")
        for c in addresses:
            name = (names or MmioNames()).name(c.address)
            if narrow:
                name = fit_name(name, self.room[0] - NARROW_ROW)
                text.append(
                    f"0x{c.address:<8x} w{c.length:<1}{human(c.count):>7} {name}".rstrip() + "\n"
                )
            else:
                text.append(
                    f"0x{c.address:<13x}{'write':<6}{c.length:>3}{human(c.count):>8}  "
                    f"{_name_in(name, self.room[0] - WIDE_ROW)}\n"
                )
        if not mmio and not addresses:
            text.append("(none)\n", style="italic")
        if not exact:
            text.append("(bounded table: a count may be high)", style="italic")
        text.rstrip()
        return text
