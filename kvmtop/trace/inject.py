"""The one place kvmtop changes a tracee's registers: it has a VMM thread issue
``ioctl(fd, KVM_GET_STATS_FD)`` for its VM and vCPU fds, takes the new fds with pidfd_getfd, and
has the thread close its copies (:class:`StatsJob`); or, with ``--rip``, has it ask
``ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS)``, which KVM answers for that VM alone
(:class:`CheckJob`). KVM refuses both from any other process (EIO).

Only on the user's request (KVM's counters, guest RIPs), only at a syscall-entry stop (a seccomp stop is
one), and the thread's own syscall runs as before. Every vCPU ioctl takes that vCPU's mutex,
which its thread holds for as long as it is in KVM_RUN (an idle guest: seconds): so a vCPU's
stats fd is made by the thread that runs it, at the entry of its KVM_RUN, when the mutex is
free; the VM's, and the closes, by any thread. Steps:

1. at the entry stop, the registers are saved and the syscall about to run is replaced by the
   first injected one (``orig_rax`` and the argument registers);
2. each further injected syscall re-executes the ``syscall`` instruction (rip - 2) with new
   registers, stopped at its entry and exit;
3. last, the saved registers go back with rip - 2 and rax = the original syscall number: the
   thread executes its own syscall, which had not run yet, from the start, and the tracer gets
   its entry (or seccomp) stop again, which it handles as if nothing had happened.

Any other stop on the way (a signal, a group-stop) or the thread's death ends the injection at
once: the registers are set as in step 3 before the stop is handled normally, so a signal is
delivered exactly as it would have been, and its handler returns into the original syscall. The
job goes on at a later stop; fds made in the VMM and not yet closed are closed first. Memory is
never written. Called only from the tracer thread (x86_64 registers).
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from kvmtop.abi import ptrace_abi as pt
from kvmtop.abi.arch import x86_64 as arch
from kvmtop.abi.kvm import KVM_CHECK_EXTENSION, KVM_GET_STATS_FD
from kvmtop.decoder import VM_FD_LINK, vcpu_id_of_fd_link
from kvmtop.errors import KvmtopError
from kvmtop.host.procfs import fd_table, seccomp_of
from kvmtop.model.messages import StatsFds

MAX_ATTEMPTS = 20  # stops a job may be interrupted at before it gives up
VM = -1  # the key of the VM's stats fd; vCPUs are keyed by their id


@dataclass(slots=True)
class StatsJob:
    future: Future[StatsFds]
    todo: list[tuple[int, int]]  # (key, the VMM's VM or vCPU fd) still to ask for
    to_close: list[int] = field(default_factory=list)  # stats fds made in the VMM, still open there
    got: dict[int, int] = field(default_factory=dict)  # key -> kvmtop's fd
    error: str | None = None
    attempts: int = 0
    made_by: dict[int, int] = field(default_factory=dict)  # key -> tid
    asked_ns: int = field(default_factory=time.monotonic_ns)
    nudged: bool = False  # the tracer has interrupted the VMM's threads for it
    kicks: dict[int, int] = field(default_factory=dict)  # the process's (StatsFds.kicks)
    asking: tuple[int, int] | None = None  # the (key, fd) of the ioctl under way

    @property
    def finished(self) -> bool:
        return not self.to_close and (not self.todo or self.error is not None)

    def next_call(self, run: tuple[int, int] | None) -> tuple[int, tuple[int, ...]] | None:
        """The syscall (number, arguments) this stop can make for the job, if any."""
        if self.to_close:
            return arch.SYS_CLOSE, (self.to_close[-1],)
        item = self.asking = self.next_for(run)
        return None if item is None else (arch.SYS_IOCTL, (item[1], KVM_GET_STATS_FD, 0))

    def give_up(self) -> None:
        self.error = "KVM_GET_STATS_FD kept being interrupted by signals"  # only closes now

    def took(self, call: tuple[int, tuple[int, ...]], result: int, tid: int, pidfd: int) -> None:
        """What the syscall ``call`` returned, on thread ``tid``."""
        if call[0] == arch.SYS_CLOSE or self.asking is None:
            self.to_close.pop()
            return
        key = self.asking[0]
        self.todo = [t for t in self.todo if t[0] != key]
        self.made_by[key] = tid
        if result < 0:
            if result == -errno_module.ENOTTY or result == -errno_module.EINVAL:
                self.error = (
                    "this kernel has no KVM binary stats (KVM_GET_STATS_FD needs Linux 5.14+)"
                )
            else:
                self.error = f"KVM_GET_STATS_FD failed: {os.strerror(-result)}"
            return
        self.to_close.append(result)
        try:
            self.got[key] = pt.pidfd_getfd(pidfd, result)
        except OSError as exc:
            self.error = f"cannot take the stats fd: {exc.strerror}"

    def next_for(self, run: tuple[int, int] | None) -> tuple[int, int] | None:
        """The (key, fd) this stop can ask for: the VM's, or that of the vCPU whose KVM_RUN
        this is (``run``: its id and the fd being run, which is the one asked); None if
        neither is left."""
        if self.error is not None:
            return None
        for key, fd in self.todo:
            if key == VM:
                return key, fd
            if run is not None and key == run[0]:
                return run
        return None

    def settle(self) -> None:
        """Resolve the future (the fds pass to its reader), or close what was got."""
        if self.future.done():
            return
        if self.error is not None:
            self.release()
            self.future.set_exception(OSError(self.error))
        else:
            vm = self.got.pop(VM, None)
            self.future.set_result(StatsFds(dict(self.got), vm, dict(self.made_by), self.kicks))

    def release(self) -> None:
        for fd in self.got.values():
            os.close(fd)
        self.got.clear()


@dataclass(slots=True)
class CheckJob:
    """``KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)`` asked by the VMM on each VM fd of ``todo``:
    ``answers`` (VM fd -> the kvm_valid_regs bits KVM allows that VM; a failed ioctl: -errno).
    A VM ioctl takes no vCPU's mutex: any thread's syscall entry can ask it."""

    todo: list[int]
    answers: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0
    asked_ns: int = field(default_factory=time.monotonic_ns)
    nudged: bool = False
    future: Future[dict[int, int]] | None = None  # a caller's (the watch's), else --rip's own

    def settle(self, error: str | None = None) -> None:
        """Resolve the caller's future, if any: the answers, a VM given up on as -EINTR; or
        ``error`` (the VMM has gone, the trace ended)."""
        if self.future is None or self.future.done():
            return
        if error is not None:
            self.future.set_exception(KvmtopError(error))
        else:
            given_up = dict.fromkeys(self.todo, -errno_module.EINTR)
            self.future.set_result(self.answers | given_up)

    @property
    def finished(self) -> bool:
        return not self.todo or self.error is not None

    def next_call(self, run: tuple[int, int] | None) -> tuple[int, tuple[int, ...]] | None:
        if self.finished:
            return None
        return arch.SYS_IOCTL, (self.todo[0], KVM_CHECK_EXTENSION, arch.KVM_CAP_SYNC_REGS)

    def give_up(self) -> None:
        self.error = "KVM_CHECK_EXTENSION kept being interrupted by signals"

    def took(self, call: tuple[int, tuple[int, ...]], result: int, tid: int, pidfd: int) -> None:
        vm = call[1][0]
        self.todo.remove(vm)
        self.answers[vm] = result


def own_filter(pid: int, tids: list[int], one_stop: bool) -> int | None:
    """A thread of ``pid`` under a seccomp filter of its own (not kvmtop's: one-stop launch,
    ``one_stop``, has one), if any: a syscall kvmtop made it run could be refused or kill it."""
    own = 1 if one_stop else 0
    for tid in tids:
        mode, filters = seccomp_of(pid, tid)
        if mode == 1 or (mode == 2 and filters != own):
            return tid
    return None


def own_filter_message(pid: int, tid: int, what: str) -> str:
    """Why a VMM under a seccomp filter of its own is not asked ``what``."""
    return (f"pid {pid} runs under a seccomp filter of its own (thread {tid}), as Firecracker, "
            "crosvm and cloud-hypervisor do: a syscall kvmtop made it run could be refused or "
            f"kill it, so {what}")  # fmt: skip


def vm_fds(pid: int) -> list[int]:
    """The VM fds ``pid`` holds."""
    return sorted(fd for fd, link in fd_table(pid).items() if link == VM_FD_LINK)


def plan_job(future: Future[StatsFds], pid: int, tids: list[int], one_stop: bool,
             kicks: dict[int, int]) -> StatsJob:  # fmt: skip
    """What to ask for: the VM fd and one fd per vCPU of ``pid`` (Python's mmap, for one,
    holds a duplicate of its vCPU fd). A VMM thread under a seccomp filter of its own
    (Firecracker, crosvm and cloud-hypervisor filter their vCPU threads) might refuse the
    injected ioctl or be killed for it: such a VMM is left alone. kvmtop's own filter (one-stop
    launch, ``one_stop``) allows it."""
    by_key: dict[int, int] = {}
    for fd, link in fd_table(pid).items():
        vcpu = vcpu_id_of_fd_link(link)
        if vcpu is not None or link == VM_FD_LINK:
            by_key[VM if vcpu is None else vcpu] = fd
    todo = sorted(by_key.items())
    if not todo:
        raise KvmtopError(f"pid {pid} holds no VM or vCPU fd")
    tid = own_filter(pid, tids, one_stop)
    if tid is not None:
        raise KvmtopError(own_filter_message(pid, tid, "KVM's counters are not taken from it"))
    return StatsJob(future, todo, kicks=kicks)


class Interrupted(Exception):
    """A stop other than the injected syscall's, or the thread's death: ``status`` is for the
    tracer's normal handling."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def can_inject(tid: int, regs: ctypes.Structure) -> bool:
    """64-bit code that entered the kernel through a `syscall` instruction (read, not written)."""
    if regs.cs != arch.USER_CS_64:
        return False
    size = len(arch.SYSCALL_INSN)
    try:
        return bytes(pt.RemoteReader(tid, size).read(regs.rip - size)) == arch.SYSCALL_INSN
    except OSError:
        return False


def _wait_syscall_stop(tid: int) -> None:
    _, status = os.waitpid(tid, pt.WALL)
    if (status & 0xFF) != 0x7F or (status >> 8) != pt.SYSCALL_STOP:
        raise Interrupted(status)


def _regs_for(saved: ctypes.Structure, nr: int, args: tuple[int, ...]) -> ctypes.Structure:
    regs = type(saved).from_buffer_copy(saved)
    regs.rip = saved.rip - len(arch.SYSCALL_INSN)
    regs.rax = nr
    regs.orig_rax = nr
    for name, value in zip(arch.SYSCALL_ARG_REGS, args, strict=False):
        setattr(regs, name, value)
    return regs


def _signed(value: int) -> int:
    return ctypes.c_long(value).value


def run_job(
    job: StatsJob | CheckJob, tid: int, pidfd: int, resume: int, run: tuple[int, int] | None
) -> int | None:
    """Do what ``job`` can on thread ``tid``, stopped at a syscall entry (``run``: the vCPU id
    and fd if that syscall is KVM_RUN); ``resume`` is how the thread is resumed afterwards
    (PTRACE_SYSCALL or PTRACE_CONT). Returns the status of the thread's next stop for the
    tracer to handle (normally the entry of its own syscall again), or None when nothing was
    done here (the thread is still at its stop)."""
    if job.next_call(run) is None:
        return None
    saved = pt.ptrace_getregs(tid)
    if not can_inject(tid, saved):
        return None
    if job.attempts >= MAX_ATTEMPTS and job.error is None:
        job.give_up()
    job.attempts += 1
    restart = _regs_for(saved, saved.orig_rax, ())  # the thread's own syscall, from the start
    first = True
    try:
        while True:
            call = job.next_call(run)
            if call is None:
                break
            regs = _regs_for(saved, *call)
            if first:  # at the entry stop: this syscall takes the place of the thread's own
                regs.rip, regs.rax = saved.rip, saved.rax
            pt.ptrace_setregs(tid, regs)
            if not first:  # the `syscall` instruction again
                pt.ptrace(pt.PTRACE_SYSCALL, tid, 0, 0)
                _wait_syscall_stop(tid)  # its entry
            first = False
            pt.ptrace(pt.PTRACE_SYSCALL, tid, 0, 0)
            _wait_syscall_stop(tid)  # its exit
            job.took(call, _signed(pt.ptrace_getregs(tid).rax), tid, pidfd)
    except Interrupted as stop:
        if (stop.status & 0xFF) == 0x7F:  # still there: as if its syscall had not begun
            pt.ptrace_setregs(tid, restart)
        return stop.status
    if first:
        return None
    pt.ptrace_setregs(tid, restart)
    pt.ptrace(resume, tid, 0, 0)
    _, status = os.waitpid(tid, pt.WALL)
    return status
