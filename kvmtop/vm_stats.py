"""A VM's KVM counters, held after a brief attach: every exit, also those KVM handles itself.

:func:`take_stats` attaches to a VMM, has one of its threads make the stats fds (see
:mod:`kvmtop.inject`) and detaches at once; or, while a tracing session is on, its tracer does
the same. A VMM that holds stats fds of its own (a QEMU that keeps them for ``query-stats``)
needs no attach: :func:`copy_held_stats` copies them with ``pidfd_getfd``. From then on
:class:`VmStats` reads the counters with one pread per fd: no ptrace, no
cost to the VM, for as long as kvmtop holds the fds. The fds keep the VM's kernel state alive,
so they are closed as soon as the VMM exits (:meth:`VmStats.vmm_alive`).
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from kvmtop.errors import KvmtopError
from kvmtop.inject import StatsFds
from kvmtop.kvm_stats import CUMULATIVE, StatDesc, StatsFile, StatsFormatError, Values
from kvmtop.procfs import check_attachable, is_stopped
from kvmtop.ptrace_abi import pidfd_getfd

VM_STATS_LINK, VCPU_STATS_LINK = (
    "anon_inode:kvm-vm-stats",
    "anon_inode:kvm-vcpu-stats",
)  # vCPU: ":N"
VCPU_IDENT = re.compile(r"kvm-\d+/vcpu-(\d+)$")  # a vCPU stats fd's id string
CANCEL_POLL_S = 0.05  # how often a take looks whether it is still wanted
SIGNAL_EXITS = "signal_exits"  # a vCPU's KVM_RUNs ended by a signal, or by a tracer's interrupt
T = TypeVar("T")


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
            _close_quietly(fds.vm)
            for fd in fds.vcpus.values():
                _close_quietly(fd)
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


def _close_quietly(fd: int | None) -> None:
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


def settle_stats(
    pid: int, future: Future[StatsFds], timeout: float = 10.0, cancel: threading.Event | None = None
) -> VmStats:
    """The VmStats behind a tracer's :meth:`~kvmtop.tracer_thread.Tracer.stats_fds` answer."""
    try:
        fds = result_unless(future, timeout, cancel)
    except TimeoutError:  # first: TimeoutError is an OSError, with no message of its own
        if is_stopped(pid, traced=True):
            raise StatsUnavailable(stopped_message(pid)) from None
        raise StatsUnavailable(
            f"no KVM counters for pid {pid}: its vCPU threads did not enter KVM_RUN within "
            f"{timeout:g} s (are its vCPUs paused?); a vCPU's counters can only be made by the "
            "thread that runs it"
        ) from None
    except OSError as exc:
        raise StatsUnavailable(f"no KVM counters for pid {pid}: {exc}") from None
    return VmStats(pid, fds)


def stopped_message(pid: int) -> str:
    return (
        f"no KVM counters for pid {pid}: it is stopped (SIGSTOP; /proc state T), so its vCPUs "
        "are not running and none of its threads can make the counters' fds (KVM makes them "
        f"only for the VM's own process); resume it with kill -CONT {pid}"
    )


def result_unless(future: Future[T], timeout: float, cancel: threading.Event | None) -> T:
    """``future.result(timeout)``, given up at once (StatsCancelled) when ``cancel`` is set."""
    deadline = time.monotonic() + timeout
    while True:
        if cancel is not None and cancel.is_set():
            raise StatsCancelled("cancelled")
        left = deadline - time.monotonic()
        try:
            return future.result(max(0.0, min(left, CANCEL_POLL_S)))
        except TimeoutError:
            if left <= CANCEL_POLL_S:
                raise


def take_stats(pid: int, timeout: float = 10.0, cancel: threading.Event | None = None) -> VmStats:
    """Attach to ``pid``, take its stats fds, detach: the VMM runs on untraced. ``cancel`` set
    (the exporter stopping) gives up at once: the tracer detaches, which is safe at any point,
    since it injects whole syscalls between two of its own steps."""
    from kvmtop.tracer_thread import Tracer  # the tracer only for the moment of the attach

    check_attachable(pid)
    if is_stopped(pid):  # no thread of it would stop for the tracer: waiting is no use
        raise StatsUnavailable(stopped_message(pid))
    tracer = Tracer()
    tracer.start()
    try:
        result_unless(tracer.attach(pid), timeout, cancel)
        try:
            return settle_stats(pid, tracer.stats_fds(), timeout, cancel)
        finally:
            tracer.detach()
    finally:
        tracer.stop(timeout)


def _vcpu_of_stats_fd(fd: int) -> int | None:
    """The vCPU id a vCPU stats fd is of (from its id string), or None if it cannot be read."""
    try:
        found = VCPU_IDENT.search(StatsFile(fd).ident)
    except (OSError, StatsFormatError):
        return None
    return int(found.group(1)) if found is not None else None


def copy_held_stats(
    pid: int, pidfd: int, table: dict[int, str], vcpu_ids: set[int]
) -> VmStats | None:
    """The stats fds the VMM holds itself, copied with ``pidfd_getfd`` (no attach, no stop): when
    it holds one of its only VM and one of each of ``vcpu_ids``, else None (nothing kept)."""
    vm_fds = [fd for fd, link in table.items() if link == VM_STATS_LINK]
    vcpu_fds = [fd for fd, link in table.items() if link.startswith(VCPU_STATS_LINK)]
    if len(vm_fds) != 1 or len(vcpu_fds) < len(vcpu_ids):
        return None
    copies: dict[int, int] = {}
    vm: int | None = None
    try:
        vm = pidfd_getfd(pidfd, vm_fds[0])
        for fd in vcpu_fds:
            copy = pidfd_getfd(pidfd, fd)
            vcpu = _vcpu_of_stats_fd(copy)
            if vcpu is None or vcpu in copies:
                os.close(copy)
                continue
            copies[vcpu] = copy
    except OSError:
        pass  # closed meanwhile, or the VMM ended: nothing is kept
    if vm is None or set(copies) != vcpu_ids:
        for fd in [*copies.values(), vm]:
            _close_quietly(fd)
        return None
    try:
        return VmStats(pid, StatsFds(copies, vm, {}))
    except StatsUnavailable:
        return None
