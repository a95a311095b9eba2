"""A process being traced and its vCPU mappings. The tracer thread decides what happens to it;
this module carries it out. No ptrace here; the listener's thread may open pages too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvmtop.abi import ptrace_abi as pt
from kvmtop.abi.arch import HOST
from kvmtop.abi.kvm import KVM_RUN
from kvmtop.decoder import vcpu_id_of_fd_link
from kvmtop.host.procfs import fd_table
from kvmtop.host.vcpu_maps import RunPage, open_run_page, vcpu_fds, vm_of_vcpu_fd
from kvmtop.model.events import VcpuSeen
from kvmtop.model.vcpu_keys import VcpuKey, VcpuSlots
from kvmtop.trace.engine import Engine
from kvmtop.trace.inject import CheckJob, StatsJob
from kvmtop.trace.sync_regs import ValidRegs, enable


@dataclass(slots=True)
class TracedProcess:
    """One process of the session (:class:`kvmtop.trace.followed_processes.Followed`) and its vCPU mappings."""

    pid: int
    pidfd: int
    argv: tuple[str, ...]
    mode: int  # engine.MODE_*
    slots: VcpuSlots  # the session's, shared by all its processes
    ppid: int = 0
    pages: dict[int, RunPage] = field(default_factory=dict)  # the VMM's fd number -> run page
    pages_lock: threading.Lock = field(default_factory=threading.Lock)
    stats_job: StatsJob | None = None  # KVM_GET_STATS_FD asked for, not yet done
    # --rip: KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS) asked for, not yet answered; the answers
    # per VM fd; the vCPU fds whose kvm_valid_regs kvmtop set, and those it has decided on
    check_job: CheckJob | None = None
    sync_allowed: dict[int, int] = field(default_factory=dict)
    valid_regs: dict[int, ValidRegs] = field(default_factory=dict)
    rip_decided: set[int] = field(default_factory=set)
    vm_of: dict[int, int] = field(default_factory=dict)  # vCPU fd -> its VM's fd
    # {vCPU id: KVM_RUNs that kvmtop's own interrupts ended}: KVM counts each in signal_exits
    kicks: dict[int, int] = field(default_factory=dict)

    # --- vCPUs ---------------------------------------------------------------------------------

    def count_kick(self, fd: int) -> None:
        """kvmtop's own interrupt ended a KVM_RUN on ``fd``: KVM counted a signal exit for
        that vCPU that the VMM did not cause."""
        try:
            vcpu = vcpu_id_of_fd_link(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
        except OSError:
            return  # closed meanwhile
        if vcpu is not None:
            self.kicks[vcpu] = self.kicks.get(vcpu, 0) + 1

    def open_page(self, engine: Engine, tid: int, fd: int, at_run: bool = True) -> VcpuSeen | None:
        """Map the vCPU behind ``fd`` and give it to the engine, numbered as the session
        numbers its vCPUs. At a KVM_RUN (``at_run``), one that cannot be read is given all the
        same (vCPU -1), so that its exits are counted as lost, not missed; at its creation the
        VMM may not have mapped it yet."""
        try:
            table = fd_table(self.pid)
            vcpu = vcpu_id_of_fd_link(table.get(fd, ""))
            page = open_run_page(self.pid, self.pidfd, fd)
        except OSError:
            vcpu = None
        if vcpu is None:
            if at_run:
                engine.add_page(self.pid, fd, -1, tid, None, 0)
            return None
        key = VcpuKey(self.pid, vm_of_vcpu_fd(table, fd), vcpu)
        slot = self.slots.slot(key)
        with self.pages_lock:
            old = self.pages.pop(fd, None)
            self.pages[fd] = page
            self.vm_of[fd] = key.vm
        engine.add_page(self.pid, fd, slot, 0, page.mapping, page.address)
        engine.add_ring(self.pid, fd, key.vm, page.ring)
        if old is not None:
            old.close()
        return VcpuSeen(slot, 0, time.monotonic_ns(), key)

    def forget_page(self, engine: Engine, fd: int) -> None:
        engine.remove_page(self.pid, fd)
        valid_regs = self.valid_regs.pop(fd, None)
        if valid_regs is not None:
            valid_regs.close()  # kvm_valid_regs back to 0
        self.rip_decided.discard(fd)
        with self.pages_lock:
            page = self.pages.pop(fd, None)
            self.vm_of.pop(fd, None)
        if page is not None:
            page.close()

    # --- guest RIPs (--rip; kvmtop.trace.sync_regs) ----------------------------------------------

    def vms_to_check(self) -> list[int]:
        """The VM fds of vCPUs not yet decided on whose VMM has not answered KVM_CAP_SYNC_REGS."""
        with self.pages_lock:
            vms = {vm for fd, vm in self.vm_of.items() if fd not in self.rip_decided}
        return sorted(vm for vm in vms if vm not in self.sync_allowed)

    def enable_rips(self, engine: Any) -> list[str]:
        """Set kvm_valid_regs of every vCPU not yet decided on whose VM's answer is in, where
        it is safe (kvmtop.trace.sync_regs); what could not be done, for the user."""
        notes = []
        with self.pages_lock:
            todo = [(fd, self.vm_of[fd], page) for fd, page in self.pages.items()
                    if fd not in self.rip_decided and self.vm_of.get(fd) in self.sync_allowed]  # fmt: skip
        for fd, vm, page in todo:
            self.rip_decided.add(fd)
            got = enable(page.fd, self.sync_allowed[vm])
            if isinstance(got, str):
                notes.append(f"pid {self.pid} vCPU {page.vcpu}: no guest RIP: {got}")
            elif got is not None:
                self.valid_regs[fd] = got
                engine.set_rip(self.pid, fd, True)
        return notes

    def restore_rips(self) -> None:
        """Every kvm_valid_regs kvmtop set back to 0 (the tracer is going away)."""
        for valid_regs in self.valid_regs.values():
            valid_regs.restore()

    def forget_pages(self, engine: Engine) -> None:
        with self.pages_lock:
            fds = list(self.pages)
        for fd in fds:
            self.forget_page(engine, fd)

    def open_known_vcpus(self, engine: Engine) -> list[VcpuSeen]:
        """The vCPUs a running VMM has (one fd each), mapped before its next KVM_RUN."""
        try:
            fds = vcpu_fds(self.pid)
        except OSError:
            return []
        seen = []
        opened: set[int] = set()
        for fd, vcpu in sorted(fds.items()):
            if vcpu in opened:
                continue  # another fd of the same vCPU: its first KVM_RUN will map that one
            opened.add(vcpu)
            found = self.open_page(engine, 0, fd)
            if found is not None:
                seen.append(found)
        return seen

    def close(self, engine: Engine) -> None:
        self.forget_pages(engine)
        engine.remove_process(self.pid)
        os.close(self.pidfd)


def kvm_run_fd(info: memoryview) -> int | None:
    """The vCPU fd, if the syscall entering (PTRACE_GET_SYSCALL_INFO) is KVM_RUN."""
    nr, fd, request = pt.SYSCALL_INFO_ENTRY.unpack_from(info)
    return fd if nr == HOST.SYS_IOCTL and request & 0xFFFFFFFF == KVM_RUN else None


def interrupted_run_fd(regs: Any) -> int | None:
    """The vCPU fd, if the registers at an interrupt's stop (PTRACE_GETREGS) show a KVM_RUN
    that the interrupt ended: the ioctl returned EINTR, as for a signal."""
    if regs.orig_rax != HOST.SYS_IOCTL or regs.rsi & 0xFFFFFFFF != KVM_RUN:
        return None
    return int(regs.rdi) if ctypes.c_long(regs.rax).value == -errno.EINTR else None


def exit_status_of(status: int) -> int:
    """A shell-style status: the exit code, or 128 + the signal that killed it."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return status
