"""The process list's order: by any of its columns, either way, as htop's. Pure: processes in,
processes out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmtop.host.discovery import KvmProcess


@dataclass(frozen=True, slots=True)
class SortColumn:
    name: str  # the column's header, also its key in the table
    key: Callable[[KvmProcess, float | None], object]  # (process, its KVM exits/s) -> sort key
    descending: bool  # the natural order: the most first for amounts, A to Z for names


def _traced_by(p: KvmProcess) -> str:
    return str(p.tracer_pid) if p.tracer_pid else ""


COLUMNS = (
    SortColumn("PID", lambda p, r: p.pid, False),
    SortColumn("USER", lambda p, r: p.user, False),
    SortColumn("COMMAND", lambda p, r: p.name, False),
    SortColumn("VCPUS", lambda p, r: p.vcpus, True),
    SortColumn("CPU%", lambda p, r: p.cpu_percent, True),
    SortColumn("RSS", lambda p, r: p.rss, True),
    SortColumn("UPTIME", lambda p, r: p.uptime_s, True),
    SortColumn("TRACED BY", lambda p, r: _traced_by(p), False),
    SortColumn("KVM EXITS/S", lambda p, r: -1.0 if r is None else r, True),  # unknown: last
)
NAMES = tuple(c.name for c in COLUMNS)


def sorted_processes(
    procs: list[KvmProcess],
    column: str,
    reverse: bool,
    exit_rate: Callable[[int], float | None] = lambda pid: None,
) -> list[KvmProcess]:
    """``procs`` in ``column``'s natural order (``reverse``: the other way); ties by pid."""
    spec = COLUMNS[NAMES.index(column)]
    by_pid = sorted(procs, key=lambda p: p.pid)  # a stable sort keeps ties in pid order
    return sorted(by_pid, key=lambda p: spec.key(p, exit_rate(p.pid)),  # type: ignore[arg-type, return-value]
                  reverse=spec.descending != reverse)  # fmt: skip


def marker(column: str, reverse: bool) -> str:
    """▼ where the list goes down from the most (or from Z), ▲ where it goes up."""
    spec = COLUMNS[NAMES.index(column)]
    return "▼" if spec.descending != reverse else "▲"
