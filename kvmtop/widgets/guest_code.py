"""Which guest code makes the exits (``--rip``): the top guest addresses (or their symbols) by
exits or by the VMM's time handling them, each with its exit reason, as many as the pane's
height holds. The rows come named: the screen names them (symbols), the pane only draws."""

from __future__ import annotations

from rich.text import Text

from kvmtop.units import duration, human
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane

CodeRow = tuple[str, int, int, str]  # reason label, exits, VMM ns (-1: not known), code text


def lines_for(rows: int) -> int:
    """The lines of the pane's text: a header and a row per address (one for none)."""
    return 1 + max(1, rows)


class GuestCodePane(ReasonPane):
    TITLE = "guest code (--rip)"

    def draw(self, rows: tuple[CodeRow, ...], by_time: bool = False, note: str = "") -> Text:
        self.border_title = f"guest code by {'VMM time' if by_time else 'exits'} (o orders)"
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{'reason':<8}{'exits':>7}{'VMM':>10}  code\n", style="bold")
        if not rows:
            text.append(f"({note or 'no guest RIP yet'})\n", style="italic")
        for label, count, vmm_ns, code in rows[: max(1, self.room[1] - 1)]:
            short = palette.short(label)
            vmm = duration(vmm_ns) if vmm_ns >= 0 else "-"
            text.append(f"{short[:7]:<8}", style=palette.reason_style(self, label))
            text.append(f"{human(count):>7}{vmm:>10}  {code}\n")
        return text
