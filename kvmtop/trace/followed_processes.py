"""The processes one session traces: those attached to (``-p``, one or more) or the command
launched, and, for a launched command, every process it starts (fork, vfork, clone), as
``strace -f`` follows them. The tracer thread decides what happens to them; this module keeps
them, numbers their vCPUs (:mod:`kvmtop.model.vcpu_keys`) and notes what the recording must hear of
them. The listener's thread reaches them only through :meth:`Followed.on_unknown`.
"""

from __future__ import annotations

import errno as errno_module
import os
import time
from collections.abc import Callable
from concurrent.futures import Future

from kvmtop.abi import ptrace_abi as pt
from kvmtop.errors import NoSuchProcess, PermissionDenied
from kvmtop.host.procfs import (
    check_attachable,
    cmdline,
    parent_of,
    permission_hint,
    task_ids,
    tgid_of,
)
from kvmtop.host.spawn import spawn_stopped
from kvmtop.model.events import ProcessSeen
from kvmtop.model.messages import Detached
from kvmtop.model.vcpu_keys import VcpuSlots
from kvmtop.trace.engine import MODE_NOTIFY, MODE_ONE_STOP, MODE_TWO_STOP, PtraceEngine
from kvmtop.trace.notify_listener import Notifier, set_sync_wakeup
from kvmtop.trace.traced_process import TracedProcess

OPTIONS = pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_TRACEEXEC
# A launched command's children too (an attached VMM's are left alone: a helper it starts may be
# setuid, which tracing would defeat).
FOLLOW = pt.PTRACE_O_TRACEFORK | pt.PTRACE_O_TRACEVFORK
MODES = {"notify": MODE_NOTIFY, "trace": MODE_ONE_STOP, "": MODE_TWO_STOP}


class Followed:
    def __init__(self, t0: int, launched: bool, mode: int, filter_note: str = "") -> None:
        self.t0 = t0  # record times count from it
        self.launched = launched
        self.mode = mode  # engine.MODE_*: every process inherits the filter, and the mode
        self.filter_note = filter_note  # why a cheaper way of stopping is not in place
        self.procs: dict[int, TracedProcess] = {}
        self.roots: list[int] = []  # the pids asked for, or the command launched
        self.slots = VcpuSlots()
        self.detaching: str | None = None  # why, once a detach has begun
        self.detach_waiters: list[Future[Detached]] = []
        self.listener = -1  # kvmtop's copy of the filter's listener (notify mode), until started
        self.notifier: Notifier | None = None
        self.root_status: int | None = None  # how the launched command itself exited
        # Threads and processes whose first stop came before their creator's clone or fork
        # event: taken in then, so that event, when it comes, must not take them in again (they
        # may have exited and been reaped meanwhile, and a zombie never reports again).
        self.early: set[int] = set()
        self._news: list[ProcessSeen] = []  # for the next batch
        # the listener's thread found a vCPU: called before its first run is let go (--rip)
        self.on_vcpu_found: Callable[[TracedProcess, int], None] | None = None

    # --- the processes ---------------------------------------------------------------------------

    def add(self, pid: int, pidfd: int, argv: tuple[str, ...], ppid: int = 0) -> TracedProcess:
        proc = TracedProcess(pid, pidfd, argv, self.mode, self.slots, ppid)
        self.procs[pid] = proc
        self._news.append(ProcessSeen(pid, ppid, argv, time.monotonic_ns()))
        return proc

    def adopt(self, pid: int, ppid: int = 0) -> TracedProcess | None:
        """A process a followed one has started (its tracer is kvmtop already, by
        PTRACE_O_TRACEFORK and kin); None if it has gone meanwhile."""
        found = self.procs.get(pid)
        if found is not None:
            return found
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        return self.add(pid, pidfd, cmdline(pid), ppid or parent_of(pid))

    def execed(self, proc: TracedProcess) -> None:
        proc.argv = cmdline(proc.pid)
        self._news.append(ProcessSeen(proc.pid, proc.ppid, proc.argv, time.monotonic_ns()))

    def ended(self, proc: TracedProcess, engine: PtraceEngine, exit_status: int | None) -> None:
        """``proc`` has exited (``exit_status``) or been detached (None)."""
        self.procs.pop(proc.pid, None)
        proc.close(engine)
        if proc.pid == self.roots[0] and exit_status is not None:
            self.root_status = exit_status
        self._news.append(
            ProcessSeen(proc.pid, proc.ppid, proc.argv, time.monotonic_ns(), True, exit_status)
        )

    def proc_of(self, engine: PtraceEngine, tid: int) -> TracedProcess | None:
        state = engine.thread(tid)
        return None if state is None else self.procs.get(state.pid)

    def take_news(self) -> tuple[ProcessSeen, ...]:
        news, self._news = tuple(self._news), []
        return news

    @property
    def vcpu_threads(self) -> int:
        return sum(len(proc.pages) for proc in self.procs.values())

    # --- the listener (seccomp user notification) ------------------------------------------------

    def start_notifier(
        self, engine: PtraceEngine, on_full: Callable[[], None], on_error: Callable[[str], None]
    ) -> None:
        def on_unknown(tid: int, fd: int, is_run: bool) -> None:
            self.on_unknown(engine, tid, fd, is_run)

        self.notifier = Notifier(engine, self.listener, on_unknown, on_full, on_error)
        self.listener = -1  # the listener's thread closes it
        self.notifier.start()

    def on_unknown(self, engine: PtraceEngine, tid: int, fd: int, is_run: bool) -> None:
        """A notification from a thread or vCPU fd the engine does not know yet. Every thread
        of a followed process starts stopped until the tracer has taken it in, so a thread
        unknown here belongs to no followed process: its ioctl goes on, uncounted."""
        state = engine.thread(tid)
        if state is None:
            proc = self.procs.get(tgid_of(tid))
            if proc is None:
                return
            engine.add_thread(tid, proc.pid)
        else:
            proc = self.procs.get(state.pid)
            if proc is None:
                return
        if is_run and engine.page(proc.pid, fd) is None:
            proc.open_page(engine, tid, fd)
            if self.on_vcpu_found is not None:
                self.on_vcpu_found(proc, tid)


def seize_process(pid: int, engine: PtraceEngine, group: Followed) -> TracedProcess:
    """PTRACE_SEIZE every thread of ``pid`` (listing again until none is new), then interrupt
    each once so that it can be resumed with PTRACE_SYSCALL. The process joins ``group`` as
    soon as a thread is seized: when the attach fails half-way, detaching the group lets go
    of what was seized."""
    argv = check_attachable(pid)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NoSuchProcess(f"no such process: {pid}") from None
    proc = group.add(pid, pidfd, argv)
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
        if not seized:
            raise NoSuchProcess(f"no such process: {pid}")
    except BaseException:
        if not seized:  # nothing to let go of: forget it
            group.procs.pop(pid, None)
            proc.close(engine)
        raise
    for tid in seized:
        pt.ptrace_unless_gone(pt.PTRACE_INTERRUPT, tid)
    return proc


def launch_process(
    argv: list[str],
    seccomp: str,
    engine: PtraceEngine,
    child_stdio: str | None,
    stdout_to_stderr: bool,
    child_stderr: str | None = None,
) -> Followed:
    """Start ``argv`` stopped (:func:`kvmtop.host.spawn.spawn_stopped`) and seize it, to be followed
    with every process it starts; the caller continues it. Under a notifying filter, kvmtop
    takes the listener from it now."""
    t0 = time.monotonic_ns()
    spawned = spawn_stopped(argv, seccomp, child_stdio, stdout_to_stderr, child_stderr)
    mode = MODES[spawned.filter]
    options = OPTIONS | FOLLOW | (pt.PTRACE_O_EXITKILL if mode != MODE_TWO_STOP else 0)
    options |= pt.PTRACE_O_TRACESECCOMP if mode == MODE_ONE_STOP else 0
    pt.ptrace(pt.PTRACE_SEIZE, spawned.pid, 0, options)
    pidfd = os.pidfd_open(spawned.pid)
    group = Followed(t0, launched=True, mode=mode, filter_note=spawned.why)
    if mode == MODE_NOTIFY:
        group.listener = pt.pidfd_getfd(pidfd, spawned.listener)
        if not set_sync_wakeup(group.listener):
            group.filter_note = "the kernel cannot wake the listener synchronously (Linux 6.6+)"
    group.roots.append(spawned.pid)
    group.add(spawned.pid, pidfd, tuple(argv), os.getpid())
    engine.add_process(spawned.pid, mode)
    engine.add_thread(spawned.pid, spawned.pid)
    return group
