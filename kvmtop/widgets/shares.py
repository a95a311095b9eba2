"""A sampled share as a bar: its solid part reaches the low bound of its 95% interval, its
light part the high bound, so a share measured from few samples shows how little it says."""

from __future__ import annotations

from kvmtop.sampling.shares import Share

SHARE_W = 11  # "100.0% ±0.0"


def share_bar(share: Share, width: int) -> tuple[str, str]:
    """The share as a bar of ``width`` cells (of 100%): the cells sure to be filled (up to the
    low bound) and those the bound leaves open (up to the high bound)."""
    sure = round(share.low * width)
    open_ = max(0, round(share.high * width) - sure)
    if share.hits and sure + open_ == 0:
        open_ = 1
    return "█" * sure, "░" * open_
