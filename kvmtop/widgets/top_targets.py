"""The busiest IO ports (well-known x86 ports named) and MMIO addresses."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from kvmtop.arch import HOST
from kvmtop.stats import MmioCount, PortCount
from kvmtop.units import human


class TopTargets(Static):
    DEFAULT_CSS = """
    TopTargets { height: auto; border: round $primary-darken-2; padding: 0 1; }
    """

    def __init__(self, rows: int = 8, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rows = rows
        self.border_title = "top IO ports and MMIO addresses"

    def show(
        self, io: tuple[PortCount, ...], mmio: tuple[MmioCount, ...], exact: bool = True
    ) -> None:
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{'IO port':<9}{'dir':<4}{'size':>4}{'count':>9}  name\n", style="bold")
        for p in io[: self.rows]:
            name = HOST.PORT_NAMES.get(p.port, "")
            text.append(
                f"0x{p.port:04x}   {p.direction:<4}{p.size:>4}{human(p.count):>9}  {name}\n"
            )
        if not io:
            text.append("(none)\n", style="italic")
        text.append(f"\n{'MMIO address':<16}{'op':<6}{'len':>4}{'count':>9}\n", style="bold")
        for m in mmio[: self.rows]:
            op = "write" if m.write else "read"
            text.append(f"0x{m.address:<14x}{op:<6}{m.length:>4}{human(m.count):>9}\n")
        if not mmio:
            text.append("(none)\n", style="italic")
        if not exact:
            text.append("(bounded table: counts are upper bounds)", style="italic")
        text.rstrip()
        self.update(text)
