"""KVM's counters as a table of text: counters down, the VM's vCPUs (and their sum) across,
with rates since the previous sample and histograms as percentiles. Pure: `kvmtop stats` prints
it, the TUI's kernel view shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmtop.abi.binary_stats import CUMULATIVE, StatDesc, Values, histogram_percentile
from kvmtop.counters.vm_stats import StatsSample, VmStats, rates, vm_totals
from kvmtop.units import duration, human

Rows = list[tuple[str, list[str]]]

# Shown first, in this order, where the kernel has them: why and how often the vCPUs exit.
# Every other counter follows in the kernel's own order.
FIRST = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "hypercalls",
         "insn_emulation", "signal_exits", "pf_taken", "halt_wait_ns", "halt_wait_hist")  # fmt: skip


def in_reading_order(descs: tuple[StatDesc, ...]) -> list[StatDesc]:
    rank = {name: i for i, name in enumerate(FIRST)}
    return sorted(descs, key=lambda d: rank.get(d.name, len(FIRST)))  # stable: kernel order


@dataclass(frozen=True, slots=True)
class CounterTable:
    columns: list[str]  # "all vCPUs", "vCPU 0", ...
    rows: Rows  # (vCPU counter, a cell per column)
    vm_rows: Rows  # (VM counter, [value])


def _shown(desc: StatDesc, value: float, compact: bool = False) -> str:
    """A value in the descriptor's unit, as people read it; ``compact``: 12.3k, not 12,345."""
    if desc.unit == "seconds":
        return duration(int(value * 1e9))
    if desc.unit == "boolean":
        return "yes" if value else "no"
    if compact:
        text = human(value)
    else:
        text = f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"
    return text + (" B" if desc.unit == "bytes" else " cyc" if desc.unit == "cycles" else "")


def _cell(desc: StatDesc, values: Values, rate: float | None, compact: bool = False) -> str:
    v = values.get(desc.name)
    if isinstance(v, tuple):
        n = sum(v)
        if not n:
            return "-"
        p50 = histogram_percentile(desc, v, 0.5) or 0.0
        p99 = histogram_percentile(desc, v, 0.99) or 0.0
        count = human(n) if compact else f"{n:,}"
        return f"n={count} p50≥{_shown(desc, p50)} p99≥{_shown(desc, p99)}"
    if v is None:
        return "-"
    text = _shown(desc, desc.in_unit(v), compact)
    if rate and desc.kind == CUMULATIVE:
        text += f" ({_shown(desc, desc.in_unit(rate), compact)}/s)"
    return text


def vcpu_values(vcpu: int) -> Callable[[StatsSample], Values]:
    return lambda sample: sample.vcpus.get(vcpu, {})


def counter_table(
    stats: VmStats, last: StatsSample, now: StatsSample, compact: bool = False
) -> CounterTable:
    """``compact``: numbers as 12.3k (the TUI, where the columns must fit a terminal)."""
    descs = stats.descs()
    vcpus = sorted(now.vcpus)
    columns = ["all vCPUs", *(f"vCPU {v}" for v in vcpus)]
    totals_now, totals_before = vm_totals(now, descs), vm_totals(last, descs)
    dt = max(1e-9, (now.t_ns - last.t_ns) / 1e9)
    vcpu_rates = {v: rates(last, now, descs, vcpu_values(v)) for v in vcpus}
    rows: Rows = []
    for d in in_reading_order(descs):
        if d.histogram:
            cells = ["", *(_cell(d, now.vcpus[v], None, compact) for v in vcpus)]
        else:
            total = totals_now.get(d.name)
            total_rate = (total - totals_before[d.name]) / dt if total is not None else None
            total_cell = _cell(d, {d.name: total}, total_rate, compact) if total is not None else ""
            cells = [
                total_cell,
                *(_cell(d, now.vcpus[v], vcpu_rates[v].get(d.name), compact) for v in vcpus),
            ]
        rows.append((d.name, cells))
    vm_descs = stats.descs(vcpu=False)
    vm_rates = rates(last, now, vm_descs, lambda s: s.vm)
    vm_rows: Rows = [(d.name, [_cell(d, now.vm, vm_rates.get(d.name), compact)]) for d in vm_descs]
    return CounterTable(columns, rows, vm_rows)


def kick_note(stats: VmStats) -> str:
    """What ``signal_exits`` leaves out: the KVM_RUNs kvmtop's own interrupts ended. "" when
    none did."""
    kicked = stats.kicked()
    if not kicked:
        return ""
    return (f"signal_exits leaves out the {kicked} this kvmtop caused (its attach, its request "
            "for these counters and its detach end a vCPU's KVM_RUN as a signal does); those of "
            "earlier attaches, by kvmtop or any tracer, stay in it, and a detach that lands as a "
            "vCPU enters KVM_RUN can leave it 1 more, after kvmtop has gone")  # fmt: skip


def io_note(stats: VmStats, last: StatsSample, now: StatsSample, traced_io: float | None) -> str:
    """What is known when ``io_exits`` did not grow between two samples but ``insn_emulation``
    did: KVM counted the guest's port IO in insn_emulation. Why it emulated it is not known here
    (real-mode code without "unrestricted guest" is one cause, not the only one), so the note
    does not say. ``traced_io``: the IO exits/s the VMM saw over the same interval, if traced.
    "" when nothing needs saying."""
    descs = stats.descs()
    names = {d.name for d in descs}
    if not {"io_exits", "insn_emulation"} <= names or now.t_ns <= last.t_ns:
        return ""
    grew = {
        name: vm_totals(now, descs)[name] - vm_totals(last, descs)[name]
        for name in ("io_exits", "insn_emulation")
    }
    if grew["io_exits"] or not grew["insn_emulation"]:
        return ""
    emulated = human(grew["insn_emulation"] / ((now.t_ns - last.t_ns) / 1e9))
    if traced_io:
        return (
            f"io_exits did not grow while the VMM saw {human(traced_io)} IO exits/s: KVM "
            f"counted that port IO in insn_emulation ({emulated}/s)"
        )
    return (
        f"io_exits did not grow, insn_emulation did ({emulated}/s): port IO that KVM emulates "
        "counts there, not in io_exits"
    )
