"""Colours of exit reasons, from the theme's variables, and the glyphs of small charts, shared by
every pane. Pure drawing: scales numbers to glyphs, computes no statistics."""

from __future__ import annotations

import zlib

from rich.style import Style
from textual.widget import Widget

from kvmtop.decoder import UNSEEN_LABEL

SLOTS = 8
_FIXED = {
    "KVM_EXIT_IO": 0,
    "KVM_EXIT_MMIO": 1,
    "KVM_EXIT_HLT": 2,
    "KVM_EXIT_INTR": 3,
    "KVM_EXIT_X86_RDMSR": 4,
    "KVM_EXIT_X86_WRMSR": 5,
    "KVM_EXIT_SYSTEM_EVENT": 6,
    "KVM_EXIT_SHUTDOWN": 6,
    "KVM_EXIT_INTERNAL_ERROR": 7,
    "KVM_EXIT_FAIL_ENTRY": 7,
}
_THEME_COLOURS = (
    "$primary",
    "$success",
    "$accent",
    "$secondary",
    "$warning",
    "$warning-lighten-2",
    "$primary-lighten-3",
    "$error",
)
COMPONENT_CLASSES = frozenset(f"reason--{i}" for i in range(SLOTS))
SPARK = " ▁▂▃▄▅▆▇█"


def slot(label: str) -> int:
    found = _FIXED.get(label)
    return found if found is not None else 4 + zlib.crc32(label.encode()) % 4


def css_for(widget: str) -> str:
    """DEFAULT_CSS rules giving ``widget``'s reason component classes the theme's colours."""
    return "\n".join(
        f"{widget} > .reason--{i} {{ color: {colour}; }}" for i, colour in enumerate(_THEME_COLOURS)
    )


def reason_style(widget: Widget, label: str | None) -> Style:
    if label is None:
        return Style()
    return widget.get_component_rich_style(f"reason--{slot(label)}", partial=True)


def sparkline(values: tuple[int, ...] | list[int], top: int | None = None) -> list[str]:
    """One glyph per value, scaled to ``top`` (default: the largest value)."""
    peak = top if top is not None else max(values, default=0)
    if peak <= 0:
        return [" " if v == 0 else SPARK[1] for v in values]
    out = []
    for v in values:
        if v <= 0:
            out.append(" ")
        else:
            out.append(SPARK[max(1, min(8, round(v * 8 / peak)))])
    return out


def chart_row(
    values: tuple[int, ...] | list[int], row: int, rows: int, top: int | None = None
) -> list[str]:
    """Line ``row`` (0 = top) of a bar chart ``rows`` lines high, scaled to ``top`` (default:
    the largest value): each line holds 8 eighths of a bar."""
    if rows <= 1:
        return sparkline(values, top)
    peak = top if top is not None else max(values, default=0)
    floor = (rows - 1 - row) * 8  # eighths below this line
    out = []
    for v in values:
        level = 0 if peak <= 0 or v <= 0 else max(1, round(v * rows * 8 / peak))
        out.append(SPARK[max(0, min(8, level - floor))])
    return out


SHORT_NAMES = {UNSEEN_LABEL: "FAIL/UNKNOWN"}


def short(label: str) -> str:
    """A reason's name in a pane: no KVM_EXIT_ prefix, and at most 12 columns for those of
    kvmtop's own making."""
    return SHORT_NAMES.get(label) or label.removeprefix("KVM_EXIT_")
