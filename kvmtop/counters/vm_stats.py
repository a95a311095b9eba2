"""A VM's KVM counters, held after a brief attach: every exit, also those KVM handles itself.

:mod:`kvmtop.counters.taking` takes the stats fds (a brief attach, or a copy of those the VMM
holds itself); from then on :class:`VmStats` reads the counters with one pread per fd: no ptrace, no
cost to the VM, for as long as kvmtop holds the fds. The fds keep the VM's kernel state alive,
so they are closed as soon as the VMM exits (:meth:`VmStats.vmm_alive`).
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmtop.abi.binary_stats import CUMULATIVE, StatDesc, StatsFile, StatsFormatError, Values
from kvmtop.errors import KvmtopError
from kvmtop.model.messages import StatsFds

VM_STATS_LINK, VCPU_STATS_LINK = (
    "anon_inode:kvm-vm-stats",
    "anon_inode:kvm-vcpu-stats",
)  # vCPU: ":N"
SIGNAL_EXITS = "signal_exits"  # a vCPU's KVM_RUNs ended by a signal, or by a tracer's interrupt


class StatsUnavailable(KvmtopError):
    """The kernel has no binary stats, or they could not be had from this VMM."""


class StatsCancelled(StatsUnavailable):
    """The take was given up (the exporter is stopping)."""


@dataclass(frozen=True, slots=True)
class StatsSample:
    t_ns: int
    vm: Values
    vcpus: dict[int, Values]


class VmStats:
    """The stats fds of one VM (owned: :meth:`close` closes them)."""

    def __init__(self, pid: int, fds: StatsFds) -> None:
        self.pid = pid
        self.made_by = fds.made_by  # which VMM thread made each fd (vCPU id or VM: tid)
        # {vCPU id: signal exits kvmtop's own interrupts caused}, left out of signal_exits
        self.kicks = fds.kicks
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            pass  # already gone: vmm_alive() says so
        self.vm: StatsFile | None = None
        self.vcpus: dict[int, StatsFile] = {}
        try:
            self.vm = StatsFile(fds.vm) if fds.vm is not None else None
            for vcpu, fd in sorted(fds.vcpus.items()):
                self.vcpus[vcpu] = StatsFile(fd)
        except (OSError, StatsFormatError) as exc:
            close_quietly(fds.vm)
            for fd in fds.vcpus.values():
                close_quietly(fd)
            raise StatsUnavailable(f"unreadable KVM stats: {exc}") from None

    def descs(self, vcpu: bool = True) -> tuple[StatDesc, ...]:
        f = next(iter(self.vcpus.values()), None) if vcpu else self.vm
        return f.layout.descs if f is not None else ()

    def sample(self) -> StatsSample:
        """The counters now; a vCPU's ``signal_exits`` less those kvmtop's own interrupts
        caused (its attach, its request for these fds, its detach end a vCPU's KVM_RUN as a
        signal does, and KVM counts each)."""
        vcpus = {vcpu: f.read() for vcpu, f in self.vcpus.items()}
        for vcpu, kicks in list(self.kicks.items()):
            count = vcpus.get(vcpu, {}).get(SIGNAL_EXITS)
            if isinstance(count, int):
                vcpus[vcpu][SIGNAL_EXITS] = max(0, count - kicks)
        return StatsSample(time.monotonic_ns(), self.vm.read() if self.vm is not None else {},
                           vcpus)  # fmt: skip

    def kicked(self) -> int:
        """The signal exits kvmtop's own interrupts caused, left out of ``signal_exits``."""
        return sum(self.kicks.values())

    @property
    def exit_fd(self) -> int | None:
        """An fd that turns readable when the VMM exits (for select/poll); None once closed."""
        return self._pidfd

    def vmm_alive(self) -> bool:
        if self._pidfd is None:
            return False
        return not select.select([self._pidfd], [], [], 0)[0]  # readable once it has exited

    def close(self) -> None:
        for f in (self.vm, *self.vcpus.values()):
            if f is not None:
                f.close()
        self.vcpus.clear()
        self.vm = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def rates(before: StatsSample, after: StatsSample, descs: tuple[StatDesc, ...],
          values: Callable[[StatsSample], Values]) -> dict[str, float]:  # fmt: skip
    """Per-second rates of the cumulative counters between two samples."""
    dt = (after.t_ns - before.t_ns) / 1e9
    if dt <= 0:
        return {}
    a, b = values(before), values(after)
    out = {}
    for d in descs:
        if d.kind == CUMULATIVE and not d.histogram:
            x, y = a.get(d.name), b.get(d.name)
            if isinstance(x, int) and isinstance(y, int):
                out[d.name] = (y - x) / dt
    return out


def vm_totals(sample: StatsSample, descs: tuple[StatDesc, ...]) -> dict[str, int]:
    """The vCPU counters summed over the VM's vCPUs (cumulative ones only)."""
    out = dict.fromkeys((d.name for d in descs if d.kind == CUMULATIVE and not d.histogram), 0)
    for values in sample.vcpus.values():
        for name in out:
            v = values.get(name)
            if isinstance(v, int):
                out[name] += v
    return out
