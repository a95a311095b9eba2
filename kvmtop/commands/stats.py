"""``kvmtop stats -p PID``: KVM's own counters of a VM, live, after a brief attach.

Every interval: a table of every counter the kernel describes, per vCPU and for the VM (totals
and rates; histograms as percentiles and counts), or with ``--json`` one JSON object per line.
The VMM is traced only for the moment it takes to make the stats fds; it then runs untraced.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any, TextIO

from kvmtop.abi.binary_stats import StatDesc, Values
from kvmtop.counters.kernel_table import counter_table, io_note, kick_note, vcpu_values
from kvmtop.counters.taking import take_stats
from kvmtop.counters.vm_stats import StatsCancelled, StatsSample, VmStats, rates
from kvmtop.host.procfs import is_stopped

CLEAR = "\x1b[H\x1b[J"


class SignalStop:
    """While held, SIGINT and SIGTERM set :attr:`stopping` instead of ending the process: a
    live loop ends at its next check and closes what it holds."""

    def __init__(self) -> None:
        self.event = threading.Event()  # set by the signal: a take of KVM's counters gives up
        self._previous: dict[int, Any] = {}

    @property
    def stopping(self) -> bool:
        return self.event.is_set()

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.event.set()

    def __enter__(self) -> SignalStop:
        self._previous = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *_exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run_stats(pid: int, interval: float, as_json: bool, count: int | None, out: TextIO) -> int:
    with SignalStop() as signals:
        try:
            stats = take_stats(pid, cancel=signals.event)
        except StatsCancelled:
            return 0  # stopped while the counters were being taken: the VMM is let go
        try:
            first = last = stats.sample()
            shown = 0
            while not signals.stopping and (count is None or shown < count):
                deadline = time.monotonic() + interval
                while not signals.stopping and time.monotonic() < deadline and stats.vmm_alive():
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
            stats.close()
    return 0


def stats_table(stats: VmStats, first: StatsSample, last: StatsSample, now: StatsSample) -> str:
    """Counters down, vCPUs (and the VM's sum) across; rates since the previous sample."""
    since = (now.t_ns - first.t_ns) / 1e9
    head = f"pid {stats.pid}  KVM's own counters, {len(stats.vcpus)} vCPU(s), {since:.1f} s"
    if is_stopped(stats.pid):
        head += "  (stopped: its vCPUs are not running)"
    table = counter_table(stats, last, now)
    notes = [note for note in (io_note(stats, last, now, None), kick_note(stats)) if note]
    return "\n".join([head, *(f"note: {note}" for note in notes), "", *_grid(["VCPU COUNTER", *table.columns], table.rows), "",
                      *_grid(["VM COUNTER", "value"], table.vm_rows)])  # fmt: skip


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
    histograms as the low edge and count of each non-empty bucket), but ``signal_exits`` less
    those kvmtop's own interrupts caused (``kvmtop_signal_exits``, per vCPU), and per-second
    rates of the cumulative counters since the previous object."""
    descs, vm_descs = stats.descs(), stats.descs(vcpu=False)
    return {
        "t": round((now.t_ns - first.t_ns) / 1e9, 6),
        "pid": stats.pid,
        "stopped": is_stopped(stats.pid),
        "vm": _json_values(vm_descs, now.vm),
        "vcpus": {str(v): _json_values(descs, values) for v, values in sorted(now.vcpus.items())},
        "kvmtop_signal_exits": {str(v): n for v, n in sorted(stats.kicks.items())},
        "rates": {
            "vm": rates(last, now, vm_descs, lambda s: s.vm),
            **{
                str(v): rates(last, now, descs, vcpu_values(v)) for v in sorted(now.vcpus)
            },  # fmt: skip
        },
    }
