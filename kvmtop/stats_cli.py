"""``kvmtop stats -p PID``: KVM's own counters of a VM, live, after a brief attach.

Every interval: a table of every counter the kernel describes, per vCPU and for the VM (totals
and rates; histograms as percentiles and counts), or with ``--json`` one JSON object per line.
The VMM is traced only for the moment it takes to make the stats fds; it then runs untraced.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from kvmtop.kvm_stats import CUMULATIVE, StatDesc, Values, histogram_percentile
from kvmtop.units import duration
from kvmtop.vm_stats import StatsSample, VmStats, rates, take_stats, vm_totals

CLEAR = "\x1b[H\x1b[J"


def run_stats(pid: int, interval: float, as_json: bool, count: int | None, out: TextIO) -> int:
    stats = take_stats(pid)
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        first = last = stats.sample()
        shown = 0
        while not stopping and (count is None or shown < count):
            deadline = time.monotonic() + interval
            while not stopping and time.monotonic() < deadline and stats.vmm_alive():
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            alive = stats.vmm_alive()
            sample = stats.sample()
            if as_json:
                print(json.dumps(sample_json(stats, first, last, sample)), file=out, flush=True)
            else:
                live = out.isatty()
                print((CLEAR if live else "") + stats_table(stats, first, last, sample),
                      file=out, flush=True)  # fmt: skip
            last = sample
            shown += 1
            if not alive:
                print(f"kvmtop: pid {pid} exited", file=sys.stderr)
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stats.close()
    return 0


def _scaled(desc: StatDesc, raw: float) -> str:
    if desc.unit == "seconds":
        return duration(int(raw * desc.scale * 1e9))
    if desc.unit == "boolean":
        return "yes" if raw else "no"
    value = raw * desc.scale
    text = f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:.2f}"
    return text + (" B" if desc.unit == "bytes" else " cyc" if desc.unit == "cycles" else "")


def _cell(desc: StatDesc, values: Values, rate: float | None) -> str:
    v = values.get(desc.name)
    if isinstance(v, tuple):
        n = sum(v)
        if not n:
            return "-"
        p50 = histogram_percentile(desc, v, 0.5) or 0.0
        p99 = histogram_percentile(desc, v, 0.99) or 0.0
        return (
            f"n={n:,} p50≥{_scaled(desc, p50 / desc.scale)} p99≥{_scaled(desc, p99 / desc.scale)}"
        )
    if v is None:
        return "-"
    text = _scaled(desc, v)
    if rate is not None and desc.kind == CUMULATIVE:
        text += f" ({_scaled(desc, rate)}/s)" if rate else ""
    return text


def _vcpu_values(vcpu: int) -> Callable[[StatsSample], Values]:
    return lambda sample: sample.vcpus.get(vcpu, {})


def stats_table(stats: VmStats, first: StatsSample, last: StatsSample, now: StatsSample) -> str:
    """Counters down, vCPUs (and the VM's sum) across; rates since the previous sample."""
    descs = stats.descs()
    since = (now.t_ns - first.t_ns) / 1e9
    head = f"pid {stats.pid}  KVM's own counters, {len(stats.vcpus)} vCPU(s), {since:.1f} s"
    vcpus = sorted(now.vcpus)
    columns = ["all vCPUs", *(f"vCPU {v}" for v in vcpus)]
    totals_now, totals_before = vm_totals(now, descs), vm_totals(last, descs)
    dt = max(1e-9, (now.t_ns - last.t_ns) / 1e9)
    vcpu_rates = {v: rates(last, now, descs, _vcpu_values(v)) for v in vcpus}
    rows = []
    for d in descs:
        if d.histogram:
            cells = ["", *(_cell(d, now.vcpus[v], None) for v in vcpus)]
        else:
            total = totals_now.get(d.name)
            total_rate = (total - totals_before[d.name]) / dt if total is not None else None
            total_cell = _cell(d, {d.name: total}, total_rate) if total is not None else ""
            cells = [
                total_cell,
                *(_cell(d, now.vcpus[v], vcpu_rates[v].get(d.name)) for v in vcpus),
            ]
        rows.append((d.name, cells))
    vm_descs = stats.descs(vcpu=False)
    vm_rates = rates(last, now, vm_descs, lambda s: s.vm)
    vm_rows = [(d.name, [_cell(d, now.vm, vm_rates.get(d.name))]) for d in vm_descs]
    return "\n".join([head, "", *_grid(["VCPU COUNTER", *columns], rows), "",
                      *_grid(["VM COUNTER", "value"], vm_rows)])  # fmt: skip


def _grid(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    table = [header, *([name, *cells] for name, cells in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]


def _json_values(descs: tuple[StatDesc, ...], values: Values) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in descs:
        v = values.get(d.name)
        if isinstance(v, tuple):
            nonzero = [(d.bucket_low(i), n) for i, n in enumerate(v) if n]
            out[d.name] = {"low": [lo for lo, _ in nonzero], "count": [n for _, n in nonzero]}
        elif v is not None:
            out[d.name] = v
    return out


def sample_json(stats: VmStats, first: StatsSample, last: StatsSample, now: StatsSample
                ) -> dict[str, Any]:  # fmt: skip
    """One interval: raw values as the kernel gives them (names carry units, e.g. ``_ns``;
    histograms as the low edge and count of each non-empty bucket), and per-second rates of
    the cumulative counters since the previous object."""
    descs, vm_descs = stats.descs(), stats.descs(vcpu=False)
    return {
        "t": round((now.t_ns - first.t_ns) / 1e9, 6),
        "pid": stats.pid,
        "vm": _json_values(vm_descs, now.vm),
        "vcpus": {str(v): _json_values(descs, values) for v, values in sorted(now.vcpus.items())},
        "rates": {
            "vm": rates(last, now, vm_descs, lambda s: s.vm),
            **{
                str(v): rates(last, now, descs, _vcpu_values(v)) for v in sorted(now.vcpus)
            },  # fmt: skip
        },
    }
