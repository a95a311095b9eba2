"""Watching a VM without tracing it: KVM's counters and samples of each vCPU's ``kvm_run``.

:class:`Watcher` takes KVM's counters of the VM (:func:`kvmtop.counters.taking.take_stats`: a brief
attach, the only moment the VMM is ever stopped), then duplicates each vCPU fd with
``pidfd_getfd`` (the same rights as ptrace, no stop) and maps its ``kvm_run`` read-only, and
starts one sampler thread for all vCPUs (:mod:`kvmtop.sampling.sampler`). From then on nothing of kvmtop
runs in, or stops, the VMM; :meth:`Watcher.close` closes every fd it took. Never ptrace here.
Before the first look it times this host's entry cost on a VM of kvmtop's own
(:mod:`kvmtop.sampling.entry_cost`: once per process), so that VMM times per exit are net of it.
Where it holds a vCPU's stats fd (its own counters', or the caller's), a look that sees a reason
also reads the vCPU's ``blocking`` counter: a vCPU waiting inside ``KVM_RUN`` keeps the reason it
last returned with; and at a reason after which a VMM does not run the vCPU again (an internal
error, a failed entry: KVM may write one and run the guest on), its ``exits`` counter, so that
such a look counts as the VMM's only if the guest did not run by the next look. A VMM stopped by
a signal is said to be stopped at each snapshot.

With ``rip`` (``watch --rip``) the same moment has the VMM answer
KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS) (:func:`kvmtop.counters.taking.take_moment`; a moment of
its own where the counters need none), and each vCPU's ``kvm_valid_regs`` is set where
:func:`kvmtop.trace.sync_regs.enable` finds it safe, through a writable mapping of the fd the
watch duplicated: never the VMM's memory, never ``kvm_dirty_regs``. :meth:`Watcher.close` puts
it back to 0.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import threading
import time
from collections import deque
from dataclasses import replace
from types import TracebackType
from typing import Any

from kvmtop.abi.arch import HOST
from kvmtop.abi.mmio_names import MmioNames, from_argv
from kvmtop.abi.ptrace_abi import pidfd_getfd
from kvmtop.counters.taking import Moment, copy_held_stats, take_moment
from kvmtop.counters.vm_stats import StatsSample, StatsUnavailable, VmStats, rates, vm_totals
from kvmtop.errors import NoSuchProcess, NotKvmProcess, PermissionDenied
from kvmtop.host.procfs import (
    cmdline,
    fd_table,
    is_stopped,
    permission_hint,
    run_delays,
    tracer_pid,
)
from kvmtop.host.vcpu_maps import vcpu_fds, vm_of_vcpu_fd
from kvmtop.model.vcpu_keys import VcpuKey
from kvmtop.sampling.entry_cost import EntryCost, measure
from kvmtop.sampling.sampler import make_sampler
from kvmtop.sampling.shares import HISTORY, Tally, WatchedVcpu, WatchSnapshot, estimate
from kvmtop.trace.sync_regs import ValidRegs, enable

RESET_CHECK_LOOKS = 200  # looks of a running VM that must show a vCPU inside KVM_RUN
UNTRACED_WAIT_S = 2.0  # for the counters' tracer to have left every thread


def _held_stats(pid: int) -> VmStats | None:
    """KVM's counters from the stats fds the VMM holds itself (no attach), if it holds them."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        return copy_held_stats(pid, pidfd, fd_table(pid), set(vcpu_fds(pid).values()))
    except OSError:
        return None
    finally:
        os.close(pidfd)


def _wait_untraced(pid: int) -> None:
    """Until no thread of ``pid`` has kvmtop as its tracer (the counters' attach is over)."""
    me = os.getpid()
    deadline = time.monotonic() + UNTRACED_WAIT_S
    while True:
        try:
            tracers = {tracer_pid(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
        except OSError:
            return  # gone: the next step says so
        if me not in tracers or time.monotonic() > deadline:
            return
        time.sleep(0.001)


def _stats_of(stats: VmStats | None, vcpu_id: int) -> tuple[int, int, int]:
    """The vCPU's stats fd, the offset of its ``blocking`` counter and of its ``exits`` counter
    (-1: none), else (-1, 0, -1)."""
    held = stats.vcpus.get(vcpu_id) if stats is not None else None
    if held is None or held.fd < 0:
        return -1, 0, -1
    at = {d.name: held.layout.data_offset + d.offset for d in held.layout.descs}
    if "blocking" not in at:  # 1 while the vCPU waits in kvm_vcpu_block (Linux 5.16+)
        return -1, 0, -1
    return held.fd, at["blocking"], at.get("exits", -1)


class Watcher:
    """Counters and samples of one VMM's vCPUs (a context manager: it closes what it took)."""

    def __init__(self, pid: int, rate_hz: float = 1000.0, counters: bool = True,
                 seed: int | None = None, held: VmStats | None = None,
                 cancel: threading.Event | None = None, rip: bool = False) -> None:  # fmt: skip
        """``held``: the VM's stats fds, the caller's (kept open by it while this watches),
        for the looks to read each vCPU's ``blocking`` counter without counters of their own.
        ``cancel`` set: a take of KVM's counters under way gives up. ``rip``: the guest's RIP
        at the exits the looks see too (sets kvm_valid_regs where safe, until :meth:`close`)."""
        self.pid = pid
        self._cancel = cancel
        self.rate_hz = rate_hz
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        self._stats: VmStats | None = None
        self._sampler: Any = None
        self._pidfd: int | None = None
        self.note = ""
        self.counters_copied = False  # KVM's counters from the VMM's own stats fds: no attach
        self.stopped_seen = False  # a snapshot found the VMM stopped (SIGSTOP...)
        self.mmio_names = MmioNames()  # as report names them: the VMM's argv, x86's ranges
        self.rip = rip
        self.code_notes: list[str] = []  # with rip: the vCPUs that give none, and why
        self._valid_regs: list[ValidRegs] = []  # the fields set, to put back at close
        try:
            self._open(counters, seed, held)
        except BaseException:
            self.close()
            raise

    def _open(self, counters: bool, seed: int | None, held: VmStats | None) -> None:
        pid = self.pid
        if counters:
            self._stats = _held_stats(pid)
            self.counters_copied = self._stats is not None
        allowed = self._moment(pid, counters and self._stats is None)
        try:
            self._pidfd = os.pidfd_open(pid)
            table = fd_table(pid)
            found = vcpu_fds(pid)
        except ProcessLookupError:
            raise NoSuchProcess(f"no such process: {pid}") from None
        except PermissionError:
            raise PermissionDenied(
                f"cannot read pid {pid}'s vCPUs: {permission_hint(pid)}"
            ) from None
        if not found:
            raise NotKvmProcess(f"pid {pid} holds no KVM vCPU: not a VMM running a VM")
        self.mmio_names = from_argv(cmdline(pid))
        # one fd per vCPU: a VMM may hold several of the same (Python's mmap keeps a dup)
        first: dict[tuple[int, int], int] = {}
        for fd, vcpu_id in sorted(found.items()):
            first.setdefault((vm_of_vcpu_fd(table, fd), vcpu_id), fd)
        vms = sorted({vm for vm, _ in first})
        self.vcpus: list[WatchedVcpu] = []
        self._sampler = make_sampler(self.rate_hz, seed)
        for (vm, vcpu_id), fd in sorted(first.items()):
            try:
                dup = pidfd_getfd(self._pidfd, fd)
            except OSError as exc:
                if exc.errno == 1:  # EPERM
                    raise PermissionDenied(
                        f"cannot read pid {pid}'s vCPUs: {permission_hint(pid)}"
                    ) from None
                continue  # closed meanwhile
            self._fds.append(dup)
            page = mmap.mmap(dup, HOST.RUN_MAP_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            self._maps.append(page)
            index = self._sampler.add(page, *_stats_of(self._stats or held, vcpu_id))
            label = str(vcpu_id) if len(vms) == 1 else f"{pid}:{vm}:{vcpu_id}"
            self.vcpus.append(WatchedVcpu(label, VcpuKey(pid, vm, vcpu_id), vcpu_id))
            if allowed is not None:
                self._enable_rip(index, dup, allowed.get(vm, -errno.ENOENT), label)
        if not self.vcpus:
            raise NotKvmProcess(f"pid {pid}'s vCPUs went away")
        self._tally = Tally(len(self.vcpus))
        self._total = Tally(len(self.vcpus))
        self._histories = {i: deque(maxlen=HISTORY) for i in range(len(self.vcpus))}
        self._first = self._last = self._stats.sample() if self._stats is not None else None
        self._stopped = False
        self.entry: EntryCost | str = measure()  # before the sampler takes a CPU
        self._waited = run_delays(pid)
        self._sampler.start()

    def _moment(self, pid: int, stats: bool) -> dict[int, int] | None:
        """The one brief attach: KVM's counters where ``stats``, the VMM's answers to
        KVM_CAP_SYNC_REGS with ``rip`` (None: no RIPs, and :attr:`code_notes` says why)."""
        if not stats and not self.rip:
            return None
        try:  # its attach checks the pid and rights, with reasons
            taken = take_moment(pid, stats, self.rip, cancel=self._cancel)
        except StatsUnavailable as exc:
            taken = Moment(stats_error=str(exc), sync_error=str(exc))
        _wait_untraced(pid)
        if stats:
            self._stats = taken.stats
        if stats and taken.stats is None:
            self.note = f"KVM's counters: {taken.stats_error}"
        if self.rip and taken.sync_allowed is None:
            self.code_notes.append(f"no guest RIP: {taken.sync_error}")
        return taken.sync_allowed

    def _enable_rip(self, index: int, dup: int, answer: int, label: str) -> None:
        """Set the vCPU's kvm_valid_regs where safe, then have the sampler read its RIPs."""
        got = enable(dup, answer)
        if isinstance(got, str):
            self.code_notes.append(f"vCPU {label}: no guest RIP: {got}")
        elif got is not None:
            self._valid_regs.append(got)
            self._sampler.rip(index)

    # --- reading ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        if self._pidfd is None:
            return False
        import select

        return not select.select([self._pidfd], [], [], 0)[0]  # readable once it has exited

    @property
    def exit_fd(self) -> int | None:
        """Readable once the VMM has exited (for select/poll)."""
        return self._pidfd

    def snapshot(self, top: int = 8) -> WatchSnapshot:
        """The estimates since the previous call (or the start)."""
        taken = self._sampler.take()
        tally = Tally(len(self.vcpus))
        tally.add(taken)
        self._total.add(taken)
        tally.vmm_wait_ns = self._waited_since()
        tally.reset_seen = self._total.reset_seen  # once seen, the kernel resets: a VM fact
        for i, v in enumerate(tally.vcpus):
            if v.samples:
                self._histories[i].append((v.samples - v.in_run) / v.samples)
        self._stopped = is_stopped(self.pid)
        self.stopped_seen = self.stopped_seen or self._stopped
        now = self._counters_now()
        vcpu_rates, vm_rates = self._rates(self._last, now)
        self._last = now if now is not None else self._last
        return self._estimate(tally, vcpu_rates, vm_rates, top)

    def total(self, top: int = 8) -> WatchSnapshot:
        """The estimates since the start (taking nothing new)."""
        vcpu_rates, vm_rates = self._rates(self._first, self._last)
        return self._estimate(self._total, vcpu_rates, vm_rates, top)

    def _estimate(self, tally: Tally, vcpu_rates: dict[int, dict[str, float]],
                  vm_rates: dict[str, float], top: int) -> WatchSnapshot:  # fmt: skip
        note = self.note
        if self._stopped:
            note = (f"pid {self.pid} is stopped (a signal: state T): its vCPUs run nothing, and "
                    "the looks show the exit each was stopped at")  # fmt: skip
        elif (not self._total.reset_seen and self._total.looks >= RESET_CHECK_LOOKS
              and not self.stopped_seen):  # fmt: skip
            note = (f"counters only: no look saw a vCPU inside KVM_RUN (exit_reason 0) in "
                    f"{self._total.looks} looks; this kernel ({platform.release()}) may not reset "
                    "exit_reason at KVM_RUN entry, so the samples say nothing")  # fmt: skip
        snap = estimate(self.pid, self.rate_hz, tally, tuple(self.vcpus), vcpu_rates, vm_rates,
                        self._histories, top, note, self._stats is not None,
                        self.entry, self._stopped, self.mmio_names)  # fmt: skip
        return replace(snap, rip=self.rip, code_note="; ".join(self.code_notes))

    def _waited_since(self) -> int | None:
        """The ns the VMM's threads waited for a CPU since the last call: the most that the
        sampler can have kept a vCPU's thread off its CPU (None: not known)."""
        before, self._waited = self._waited, run_delays(self.pid)
        if before is None or self._waited is None:
            return None
        return sum(max(0, ns - before.get(tid, 0)) for tid, ns in self._waited.items())

    def _counters_now(self) -> StatsSample | None:
        if self._stats is None:  # held fds still read an ended VMM's last counts
            return None
        try:
            return self._stats.sample()
        except OSError:
            return None

    def _rates(self, before: StatsSample | None, after: StatsSample | None
               ) -> tuple[dict[int, dict[str, float]], dict[str, float]]:  # fmt: skip
        if self._stats is None or before is None or after is None or after is before:
            return {}, {}
        descs = self._stats.descs()
        per_vcpu = {v: rates(before, after, descs, lambda s, v=v: s.vcpus.get(v, {}))
                    for v in after.vcpus}  # fmt: skip
        whole = rates(before, after, descs, lambda s: vm_totals(s, descs))
        return per_vcpu, whole

    # --- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Put back every kvm_valid_regs it set, stop the sampler and close every fd and mapping
        it took (idempotent)."""
        for valid_regs in self._valid_regs:
            valid_regs.close()  # back to 0, unless something else has changed it since
        self._valid_regs.clear()
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None  # drops its hold on the mappings
        for page in self._maps:
            page.close()
        self._maps.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()
