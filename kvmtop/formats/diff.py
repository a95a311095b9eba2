"""Two recordings side by side (``kvmtop diff A B``): pure, two snapshots and their durations in,
rows out. Never reads a file (the CLI loads the recordings) and never touches a tracee.

A row is an exit reason of the whole VM, a reason of one vCPU (matched by its VM's place among
the recording's VMs and its KVM id: pids and fd numbers differ between runs), an IO port or an
MMIO address. Rates are over each recording's own time, so recordings of different lengths
compare by rate; the change of a row is B's over A's. A row that one recording lacks is ``new``
or ``gone``. ``--threshold PCT`` asks whether any row's rate or p99 moved by more than PCT; rows
of few exits are left out of that question, since their rates and p99s are mostly noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from kvmtop.aggregate.exits import LatencyHistogram, ReasonStats, StatsSnapshot, VcpuSnapshot
from kvmtop.units import duration

MIN_COUNT = 100  # exits a row needs (in A or B) to count for --threshold; its p99s need it in both
KINDS = ("reason", "vcpu", "io", "mmio")
RATIOS = ("count", "rate", "guest_p99", "vmm_p99")  # the figures a row compares, B over A


@dataclass(frozen=True, slots=True)
class Side:
    """One recording's figures for one row; latencies in ns, None where not measured (IO ports
    and MMIO addresses, one-stop tracing's VMM time)."""

    count: int
    rate: float  # per second of the recording's own time
    guest_p50: int | None = None
    guest_p99: int | None = None
    vmm_p50: int | None = None
    vmm_p99: int | None = None


@dataclass(frozen=True, slots=True)
class DiffRow:
    kind: str  # one of KINDS
    key: str  # "KVM_EXIT_MMIO", "vCPU 0 KVM_EXIT_IO", "0x0080 out size 1", "0x0000000c0000 write len 1"
    a: Side | None  # None: the recording A has no such row
    b: Side | None

    @property
    def status(self) -> str:
        return "new" if self.a is None else "gone" if self.b is None else "both"

    def ratio(self, figure: str) -> float | None:
        """B's ``figure`` (a :class:`Side` field: "count", "rate", "guest_p99"...) over A's."""
        return _ratio(getattr(self.a, figure, None), getattr(self.b, figure, None))

    @property
    def most_count(self) -> int:
        return max(self.a.count if self.a else 0, self.b.count if self.b else 0)

    def size(self) -> float:
        """How far it moved: the largest |log2| of its rate and p99 ratios (a halving as large
        as a doubling); infinite for a row one side lacks."""
        if self.a is None or self.b is None:
            return math.inf
        ratios = (self.ratio("rate"), self.ratio("guest_p99"), self.ratio("vmm_p99"))
        return max((abs(math.log2(r)) if r else math.inf for r in ratios if r is not None),
                   default=0.0)  # fmt: skip

    def moved(self, pct: float, min_count: int = MIN_COUNT) -> list[str]:
        """What moved by more than ``pct`` percent: "rate", "guest p99", "vmm p99", or the row
        itself ("new", "gone"); nothing for a row of fewer than ``min_count`` exits."""
        if self.most_count < min_count:
            return []
        if self.a is None or self.b is None:
            return [self.status]
        both = min(self.a.count, self.b.count) >= min_count
        figures = [("rate", self.ratio("rate"))]
        if both:
            figures += [("guest p99", self.ratio("guest_p99")), ("vmm p99", self.ratio("vmm_p99"))]
        return [name for name, r in figures if r is not None and abs(r - 1) * 100 > pct]


def _ratio(a: float | None, b: float | None) -> float | None:
    """b / a; None where either is unknown or a is 0."""
    if a is None or b is None or a == 0:
        return None
    return b / a


def _p(h: LatencyHistogram, q: float) -> int | None:
    return h.percentile(q) if h.count else None


def _side(r: ReasonStats, seconds: float) -> Side:
    rate = r.count / seconds if seconds > 0 else 0.0
    return Side(r.count, rate, _p(r.guest, 0.5), _p(r.guest, 0.99), _p(r.handling, 0.5),
                _p(r.handling, 0.99))  # fmt: skip


def vcpu_names(snapshot: StatsSnapshot) -> dict[int, str]:
    """Each vCPU's name for matching across recordings: `vCPU 0`, or `VM 2 vCPU 0` when the
    recording has several VMs (VMs numbered from 1 in the order they were first seen)."""
    vms: dict[tuple[int, int], int] = {}
    for v in snapshot.vcpus:
        if v.key is not None:
            vms.setdefault((v.key.pid, v.key.vm), len(vms) + 1)
    out = {}
    for v in snapshot.vcpus:
        vcpu_id, vm = (v.vcpu, 1) if v.key is None else (v.key.vcpu, vms[(v.key.pid, v.key.vm)])
        out[v.vcpu] = f"VM {vm} vCPU {vcpu_id}" if len(vms) > 1 else f"vCPU {vcpu_id}"
    return out


def _rows(snapshot: StatsSnapshot, seconds: float) -> dict[tuple[str, str], Side]:
    """Every row of one recording, by (kind, key)."""
    rate = (lambda n: n / seconds) if seconds > 0 else (lambda n: 0.0)
    rows: dict[tuple[str, str], Side] = {}
    for r in snapshot.reasons:
        rows[("reason", r.label)] = _side(r, seconds)
    names = vcpu_names(snapshot)
    for v in snapshot.vcpus:
        rows.update(_vcpu_rows(v, names[v.vcpu], seconds))
    for p in snapshot.io:
        rows[("io", f"0x{p.port:04x} {p.direction} size {p.size}")] = Side(p.count, rate(p.count))
    for m in snapshot.mmio:
        kind = "write" if m.write else "read"
        key = f"0x{m.address:012x} {kind} len {m.length}"
        rows[("mmio", key)] = Side(m.count, rate(m.count))
    return rows


def _vcpu_rows(
    v: VcpuSnapshot, name: str, seconds: float
) -> Iterable[tuple[tuple[str, str], Side]]:
    yield ("vcpu", f"{name} all"), Side(v.total, v.total / seconds if seconds > 0 else 0.0)
    for r in v.reasons:
        yield ("vcpu", f"{name} {r.label}"), _side(r, seconds)


def diff_snapshots(
    a: StatsSnapshot, a_seconds: float, b: StatsSnapshot, b_seconds: float,
    min_count: int = MIN_COUNT,
) -> list[DiffRow]:  # fmt: skip
    """Every row of either recording: the rows of ``min_count`` exits or more (in A or B)
    first, the largest change first among them (a row one side lacks is the largest, then by
    count), then the smaller rows the same way."""
    rows_a, rows_b = _rows(a, a_seconds), _rows(b, b_seconds)
    keys = list(dict.fromkeys([*rows_a, *rows_b]))
    rows = [DiffRow(kind, key, rows_a.get((kind, key)), rows_b.get((kind, key)))
            for kind, key in keys]  # fmt: skip
    rows.sort(key=lambda r: (r.most_count < min_count, -r.size(), -r.most_count,
                             KINDS.index(r.kind), r.key))  # fmt: skip
    return rows


def moved_rows(rows: Iterable[DiffRow], pct: float, min_count: int = MIN_COUNT) -> list[DiffRow]:
    return [r for r in rows if r.moved(pct, min_count)]


# --- text and JSON ----------------------------------------------------------------------------------


def change_text(ratio: float | None) -> str:
    """+100.0%, -50.0%; "" where unknown."""
    return "" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def _ns(ns: int | None) -> str:
    return "-" if ns is None else duration(ns)


def _pair(a: int | None, b: int | None) -> str:
    return f"{_ns(a)} → {_ns(b)}"


def _row_text(r: DiffRow, vmm: bool) -> str:
    a, b = r.a, r.b
    change = change_text(r.ratio("rate")) if r.status == "both" else r.status
    counts = (
        f"{a.count if a else '-':>9} {b.count if b else '-':>9} {change_text(r.ratio('count')):>9}"
    )
    rates = f"{f'{a.rate:.1f}' if a else '-':>10} {f'{b.rate:.1f}' if b else '-':>10}"
    line = f"{change:>9}  {r.kind:<6} {r.key:<30} {counts} {rates}"
    if r.kind in ("reason", "vcpu") and r.key.split()[-1] != "all":
        g = _pair(a and a.guest_p50, b and b.guest_p50), _pair(a and a.guest_p99, b and b.guest_p99)
        line += f"  {g[0]:>19} {g[1]:>19} {change_text(r.ratio('guest_p99')):>8}"
        if vmm:
            v = _pair(a and a.vmm_p50, b and b.vmm_p50), _pair(a and a.vmm_p99, b and b.vmm_p99)
            line += f"  {v[0]:>19} {v[1]:>19} {change_text(r.ratio('vmm_p99')):>8}"
    return line.rstrip()


def diff_table(rows: list[DiffRow], heads: tuple[str, str], pct: float | None = None,
               min_count: int = MIN_COUNT) -> str:  # fmt: skip
    """The rows as a table, after two head lines (what A and B are)."""
    # the VMM's columns where a recording has them (not in one-stop tracing: no split known)
    vmm = any(s is not None and s.vmm_p50 is not None for r in rows for s in (r.a, r.b))
    header = (f"{'CHANGE':>9}  {'KIND':<6} {'WHAT':<30} {'COUNT A':>9} {'COUNT B':>9} {'COUNTS':>9}"
              f" {'RATE A/s':>10} {'RATE B/s':>10}  {'GUEST p50 A → B':>19} {'p99 A → B':>19}"
              f" {'p99':>8}")  # fmt: skip
    if vmm:
        header += f"  {'VMM p50 A → B':>19} {'p99 A → B':>19} {'p99':>8}"
    lines = [f"A  {heads[0]}", f"B  {heads[1]}",
             "CHANGE: B's rate over A's (each over its own recording's time); COUNTS: B's count "
             "over A's; new/gone: a row only B/A has", "", header, "-" * len(header)]  # fmt: skip
    lines += [_row_text(r, vmm) for r in rows]
    if pct is not None:
        moved = moved_rows(rows, pct, min_count)
        lines.append("")
        if moved:
            lines.append(f"moved by more than {pct:g}% (rows of {min_count}+ exits):")
            lines += [f"  {r.kind} {r.key}: {', '.join(r.moved(pct, min_count))}" for r in moved]
        else:
            lines.append(f"nothing moved by more than {pct:g}% (rows of {min_count}+ exits)")
    return "\n".join(lines) + "\n"


def _side_json(s: Side | None) -> dict[str, object] | None:
    if s is None:
        return None
    return {"count": s.count, "rate": round(s.rate, 3), "guest_p50_ns": s.guest_p50,
            "guest_p99_ns": s.guest_p99, "vmm_p50_ns": s.vmm_p50, "vmm_p99_ns": s.vmm_p99}  # fmt: skip


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def diff_json(rows: list[DiffRow], recordings: dict[str, object], pct: float | None = None,
              min_count: int = MIN_COUNT) -> dict[str, object]:  # fmt: skip
    """``recordings``: what A and B are (file, exits, duration_s), as the CLI knows them."""
    return {
        **recordings,
        "threshold_pct": pct,
        "min_count": min_count,
        "moved": [] if pct is None else [
            {"kind": r.kind, "key": r.key, "what": r.moved(pct, min_count)}
            for r in moved_rows(rows, pct, min_count)
        ],
        "rows": [
            {"kind": r.kind, "key": r.key, "status": r.status, "a": _side_json(r.a),
             "b": _side_json(r.b),
             **{f"{fig}_ratio": _rounded(r.ratio(fig)) for fig in RATIOS}}
            for r in rows
        ],
    }  # fmt: skip
