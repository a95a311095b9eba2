"""A process being traced: how it is taken (seized or launched), its vCPU mappings, and its
listener. The tracer thread decides what happens to it; this module carries it out, and only the
tracer thread calls its ptrace parts (seizing). The listener's thread calls :meth:`on_unknown`,
which touches no ptrace.
"""

from __future__ import annotations

import errno as errno_module
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kvmtop import ptrace_abi as pt
from kvmtop.arch import HOST
from kvmtop.decoder import KVM_RUN
from kvmtop.errors import NoSuchProcess, PermissionDenied
from kvmtop.events import Detached, VcpuSeen
from kvmtop.hot_state import MODE_NOTIFY, MODE_ONE_STOP, MODE_TWO_STOP, set_sync_wakeup
from kvmtop.inject import StatsJob
from kvmtop.notify_thread import Notifier
from kvmtop.procfs import check_attachable, permission_hint, task_ids, tgid_of
from kvmtop.spawn import spawn_stopped
from kvmtop.vcpu_maps import RunPage, open_run_page, vcpu_fds

OPTIONS = pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_TRACEEXEC
MODES = {"notify": MODE_NOTIFY, "trace": MODE_ONE_STOP, "": MODE_TWO_STOP}


@dataclass(slots=True)
class TracedProcess:
    pid: int
    pidfd: int
    argv: tuple[str, ...]
    launched: bool
    mode: int  # hot_state.MODE_*
    t0: int  # when tracing began (monotonic ns): record times count from it
    filter_note: str = ""  # why a cheaper way of stopping is not in place
    pages: dict[int, RunPage] = field(default_factory=dict)  # the VMM's fd number -> run page
    pages_lock: threading.Lock = field(default_factory=threading.Lock)
    detaching: str | None = None  # why, once a detach has begun
    detach_waiters: list[Future[Detached]] = field(default_factory=list)
    stats_job: StatsJob | None = None  # KVM_GET_STATS_FD asked for, not yet done
    listener: int = -1  # kvmtop's copy of the command's seccomp listener (notify mode)
    notifier: Notifier | None = None

    # --- vCPUs ---------------------------------------------------------------------------------

    def open_page(self, engine: Any, tid: int, fd: int, at_run: bool = True) -> None:
        """Map the vCPU behind ``fd`` and give it to the engine. At a KVM_RUN (``at_run``), one
        that cannot be read is given all the same (vCPU -1), so that its exits are counted as
        lost, not missed; at its creation the VMM may not have mapped it yet."""
        try:
            page = open_run_page(self.pid, self.pidfd, fd)
        except OSError:
            if at_run:
                engine.add_page(self.pid, fd, -1, tid, None, 0)
            return
        with self.pages_lock:
            old = self.pages.pop(fd, None)
            self.pages[fd] = page
        engine.add_page(self.pid, fd, page.vcpu, 0, page.mapping, page.address)
        if old is not None:
            old.close()

    def forget_page(self, engine: Any, fd: int) -> None:
        engine.remove_page(self.pid, fd)
        with self.pages_lock:
            page = self.pages.pop(fd, None)
        if page is not None:
            page.close()

    def forget_pages(self, engine: Any) -> None:
        with self.pages_lock:
            fds = list(self.pages)
        for fd in fds:
            self.forget_page(engine, fd)

    def open_known_vcpus(self, engine: Any) -> list[VcpuSeen]:
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
            self.open_page(engine, 0, fd)
            if fd in self.pages:
                seen.append(VcpuSeen(vcpu, 0, time.monotonic_ns()))
        return seen

    # --- the listener (seccomp user notification) ------------------------------------------------

    def start_notifier(
        self, engine: Any, on_full: Callable[[], None], on_error: Callable[[str], None]
    ) -> None:
        def on_unknown(tid: int, fd: int, is_run: bool) -> None:
            self.on_unknown(engine, tid, fd, is_run)

        self.notifier = Notifier(engine, self.listener, on_unknown, on_full, on_error)
        self.listener = -1  # the listener's thread closes it
        self.notifier.start()

    def on_unknown(self, engine: Any, tid: int, fd: int, is_run: bool) -> None:
        """A notification from a thread or vCPU fd the engine does not know yet."""
        if engine.thread(tid) is None:
            if tgid_of(tid) != self.pid:
                return  # a process the command started: let its ioctl go on, uncounted
            engine.add_thread(tid, self.pid)  # before its clone event reached the tracer
        if is_run and engine.page(self.pid, fd) is None:
            self.open_page(engine, tid, fd)


def kvm_run_fd(info: memoryview) -> int | None:
    """The vCPU fd, if the syscall entering (PTRACE_GET_SYSCALL_INFO) is KVM_RUN."""
    nr, fd, request = pt.SYSCALL_INFO_ENTRY.unpack_from(info)
    return fd if nr == HOST.SYS_IOCTL and request & 0xFFFFFFFF == KVM_RUN else None


def exit_status_of(status: int) -> int:
    """A shell-style status: the exit code, or 128 + the signal that killed it."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return status


def seize_process(
    pid: int,
    engine: Any,
    begin: Callable[[TracedProcess], None],
    abort: Callable[[str, None], None],
) -> TracedProcess:
    """PTRACE_SEIZE every thread of ``pid`` (listing again until none is new), then interrupt
    each once so that it can be resumed with PTRACE_SYSCALL. ``begin`` makes it the tracer's
    process; ``abort`` detaches what was seized when the attach fails half-way."""
    t0 = time.monotonic_ns()
    argv = check_attachable(pid)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NoSuchProcess(f"no such process: {pid}") from None
    proc = TracedProcess(pid, pidfd, argv, launched=False, mode=MODE_TWO_STOP, t0=t0)
    begin(proc)
    engine.add_process(pid, MODE_TWO_STOP)
    seized: list[int] = []
    try:
        while True:  # threads created while we seize: list again until nothing is new
            new = [t for t in task_ids(pid) if engine.thread(t) is None]
            if not new:
                break
            for tid in new:
                try:
                    pt.ptrace(pt.PTRACE_SEIZE, tid, 0, OPTIONS)
                except pt.PtraceError as exc:
                    if exc.errno == errno_module.ESRCH:
                        continue  # exited meanwhile
                    if exc.errno == errno_module.EPERM and not seized:
                        raise PermissionDenied(permission_hint(pid)) from None
                    raise
                seized.append(tid)
                engine.add_thread(tid, pid)
    except BaseException:
        if seized:
            abort("attach failed", None)
        else:
            _abandon(proc, engine)
        raise
    if not seized:
        _abandon(proc, engine)
        raise NoSuchProcess(f"no such process: {pid}")
    for tid in seized:
        try:
            pt.ptrace(pt.PTRACE_INTERRUPT, tid, 0, 0)
        except pt.PtraceError as exc:
            if exc.errno != errno_module.ESRCH:
                raise
    return proc


def _abandon(proc: TracedProcess, engine: Any) -> None:
    """An attach that seized nothing: forget the process (the tracer's slot is freed by the
    caller's exception path)."""
    engine.remove_process(proc.pid)
    os.close(proc.pidfd)
    proc.detaching = "attach failed"


def launch_process(
    argv: list[str],
    seccomp: str,
    engine: Any,
    child_stdio: str | None,
    stdout_to_stderr: bool,
) -> TracedProcess:
    """Start ``argv`` stopped (:func:`kvmtop.spawn.spawn_stopped`) and seize it; the caller
    continues it. Under a notifying filter, kvmtop takes the listener from it now."""
    t0 = time.monotonic_ns()
    spawned = spawn_stopped(argv, seccomp, child_stdio, stdout_to_stderr)
    mode = MODES[spawned.filter]
    options = OPTIONS | (pt.PTRACE_O_EXITKILL if mode != MODE_TWO_STOP else 0)
    options |= pt.PTRACE_O_TRACESECCOMP if mode == MODE_ONE_STOP else 0
    pt.ptrace(pt.PTRACE_SEIZE, spawned.pid, 0, options)
    pidfd = os.pidfd_open(spawned.pid)
    note = spawned.why
    listener = -1
    if mode == MODE_NOTIFY:
        listener = pt.pidfd_getfd(pidfd, spawned.listener)
        if not set_sync_wakeup(listener):
            note = "the kernel cannot wake the listener synchronously (Linux 6.6+)"
    proc = TracedProcess(spawned.pid, pidfd, tuple(argv), launched=True, mode=mode, t0=t0,
                         filter_note=note, listener=listener)  # fmt: skip
    engine.add_process(proc.pid, mode)
    engine.add_thread(proc.pid, proc.pid)
    return proc
