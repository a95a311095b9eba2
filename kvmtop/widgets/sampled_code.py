"""The watch view's guest code pane (``--rip``): the guest code the VM's time in the VMM went to,
sampled at the exits, each with its exit reason and its share ±95%, as many rows as the pane's
height holds. The rows come named: the screen names them (symbols), the pane only draws."""

from __future__ import annotations

from rich.text import Text

from kvmtop.sampling.shares import Share
from kvmtop.widgets import palette
from kvmtop.widgets.pane import ReasonPane
from kvmtop.widgets.shares import SHARE_W

SampledCodeRow = tuple[str, Share, str]  # reason label, share of the looks, code text


def lines_for(rows: int) -> int:
    """The lines of the pane's text: a header and a row per address (one for none)."""
    return 1 + max(1, rows)


class SampledCode(ReasonPane):
    TITLE = "guest code: VMM time, sampled at the exits (--rip)"

    def draw(self, rows: tuple[SampledCodeRow, ...], note: str = "") -> Text:
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{'reason':<8}{'share ±':>{SHARE_W}}  code\n", style="bold")
        if not rows:
            text.append(f"({note or 'no guest RIP sampled yet'})\n", style="italic")
        for label, share, code in rows[: max(1, self.room[1] - 1)]:
            text.append(f"{palette.short(label)[:7]:<8}", style=palette.reason_style(self, label))
            text.append(f"{share.text():>{SHARE_W}}  {code}\n")
        text.rstrip()
        return text
