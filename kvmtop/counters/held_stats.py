"""The VMs whose KVM stats fds the TUI holds: for the kernel view, and for the process list's
exit rates. Holding them costs the VMs nothing (no ptrace); sampling is one pread per fd.
Taking them blocks for an attach, so :meth:`HeldStats.take` runs off the UI thread; a VM
whose VMM has ended is dropped, and its fds closed, at the next :meth:`HeldStats.tick`.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass

from kvmtop.counters.taking import settle_stats, take_stats
from kvmtop.counters.vm_stats import StatsSample, VmStats, vm_totals
from kvmtop.model.messages import StatsFds


@dataclass(slots=True)
class _Held:
    stats: VmStats
    previous: StatsSample
    latest: StatsSample


class HeldStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vms: dict[int, _Held] = {}

    def take(self, pid: int, via: Future[StatsFds] | None = None) -> VmStats:
        """Take and hold the fds of ``pid``, made through ``via`` (a tracer already attached to
        it) or by a brief attach of kvmtop's own; if they are held already, the new ones are
        closed. Raises KvmtopError."""
        stats = settle_stats(pid, via) if via is not None else take_stats(pid)
        first = stats.sample()
        with self._lock:
            if pid in self._vms:  # taken twice at once: keep the first
                stats.close()
                return self._vms[pid].stats
            self._vms[pid] = _Held(stats, first, first)
        return stats

    def get(self, pid: int) -> VmStats | None:
        with self._lock:
            held = self._vms.get(pid)
        return held.stats if held is not None else None

    def samples(self, pid: int) -> tuple[StatsSample, StatsSample] | None:
        """The last two samples of ``pid`` (previous, latest)."""
        with self._lock:
            held = self._vms.get(pid)
        return (held.previous, held.latest) if held is not None else None

    def tick(self) -> None:
        """Sample every held VM; drop those whose VMM has ended."""
        with self._lock:
            items = list(self._vms.items())
        for pid, held in items:
            if not held.stats.vmm_alive():
                with self._lock:
                    self._vms.pop(pid, None)
                held.stats.close()
                continue
            held.previous, held.latest = held.latest, held.stats.sample()

    def exit_rate(self, pid: int) -> float | None:
        """All the VM's exits per second (KVM's ``exits``, summed over vCPUs) between the last
        two samples; None if its fds are not held."""
        with self._lock:
            held = self._vms.get(pid)
        if held is None:
            return None
        before, now = held.previous, held.latest
        dt = (now.t_ns - before.t_ns) / 1e9
        if dt <= 0:
            return 0.0
        descs = held.stats.descs()
        return (
            vm_totals(now, descs).get("exits", 0) - vm_totals(before, descs).get("exits", 0)
        ) / dt

    def close(self) -> None:
        with self._lock:
            items = list(self._vms.values())
            self._vms.clear()
        for held in items:
            held.stats.close()
