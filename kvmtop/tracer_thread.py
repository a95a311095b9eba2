"""The tracing engine: the one thread that owns ptrace.

The kernel wants every ptrace request for a tracee to come from the thread that attached it, so
everything ptrace happens on :class:`Tracer`'s own thread. Other threads talk to it through a
command queue (attach, launch, detach, quit) and receive :mod:`kvmtop.events` messages in batches
on ``Tracer.out``.

How a KVM exit is seen: every thread of the VMM is seized (PTRACE_SEIZE, never SIGSTOP) and
resumed with PTRACE_SYSCALL. At the syscall-entry stop of ``ioctl(vcpu_fd, KVM_RUN)`` the time is
taken; at its syscall-exit stop the exit is read from kvmtop's own read-only mapping of that
vCPU's ``struct kvm_run``. Threads that never touch KVM are resumed with PTRACE_CONT once they
have used up a small syscall budget, so they cost no stops. kvmtop never writes the tracee's
memory or registers, passes every signal through unchanged, and when it detaches (or its thread
dies, which makes the kernel detach) the VMM runs on as if never traced.

Waking the thread: it sleeps in waitpid(), which no queue can interrupt, so it keeps a tiny
child of its own ("kicker"); stopping that child with SIGSTOP makes waitpid return.
"""

from __future__ import annotations

import errno as errno_module
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kvmtop import ptrace_abi as pt
from kvmtop.arch import HOST
from kvmtop.decoder import KVM_CREATE_VCPU, KVM_RUN, decode_exit, exit_reason_of
from kvmtop.errors import (
    KvmtopError,
    NoSuchProcess,
    PermissionDenied,
)
from kvmtop.events import (
    EXIT_CYCLE,
    Attached,
    Detached,
    ExitBatch,
    ExitEvent,
    TracerFailed,
    TracerMessage,
    VcpuSeen,
)
from kvmtop.inject import StatsFds, StatsJob, plan_job, run_job
from kvmtop.procfs import (
    check_attachable,
    permission_hint,
    task_ids,
    tgid_of,
)
from kvmtop.spawn import spawn_kicker, spawn_stopped
from kvmtop.stop_wait import StopWaiter
from kvmtop.vcpu_maps import RunPage, open_run_page, vcpu_fds
from kvmtop.xlat_exit import ExitReason

OPTIONS = pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_TRACEEXEC
WAIT_FLAGS = pt.WALL | pt.WNOTHREAD | os.WUNTRACED
GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
KVMIO = 0xAE  # the ioctl type byte of every KVM ioctl
SYSCALL_BUDGET = 256  # non-KVM syscalls a thread may make before it is no longer syscall-traced
BATCH_MAX = 4096
FLUSH_INTERVAL_S = 0.1


@dataclass(slots=True)
class _Thread:
    tid: int
    proc: _Process
    budget: int = SYSCALL_BUDGET
    runner: bool = False  # has run KVM_RUN or created a vCPU: always syscall-traced
    run_page: RunPage | None = None  # set between KVM_RUN entry and exit
    in_run: bool = False
    entry_ns: int = 0
    creating_vcpu: bool = False


@dataclass(slots=True)
class _Process:
    pid: int
    pidfd: int
    argv: tuple[str, ...]
    launched: bool
    one_stop: bool = False  # seccomp filter in place: one stop per KVM_RUN, at its entry
    t0: int = 0  # Attached.t_ns: batch times are relative to it
    pages: dict[int, RunPage] = field(default_factory=dict)  # VMM fd number -> run page
    detaching: str | None = None  # why, once a detach has begun
    detach_waiters: list[Future[Detached]] = field(default_factory=list)
    stats_job: StatsJob | None = None  # KVM_GET_STATS_FD asked for, not yet done


class Tracer:
    """Owns the tracing thread. One traced process at a time; attach again after a detach."""

    def __init__(
        self,
        with_data: bool = False,
        child_stdio: str | None = None,
        child_stdout_to_stderr: bool = False,
    ) -> None:
        self.out: queue.SimpleQueue[TracerMessage] = queue.SimpleQueue()
        self.with_data = with_data
        self.child_stdio = child_stdio  # launched commands' stdio goes here (TUI: /dev/null)
        self.child_stdout_to_stderr = child_stdout_to_stderr  # kvmtop's stdout is a stream
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="kvmtop-tracer", daemon=True)
        self._ready = threading.Event()
        self._kicker = 0
        self._kicker_pipe = -1
        self._quit = False
        self._quit_after_detach = False
        self._proc: _Process | None = None
        self._threads: dict[int, _Thread] = {}
        self._detached_children: set[int] = set()  # launched, detached, not yet reaped
        self._events: list[ExitEvent] = []
        self._seen: list[VcpuSeen] = []
        self._lost = 0
        self._stops = 0
        self._unflushed = False
        self._info = pt.SyscallInfo()
        self._ticker = threading.Thread(target=self._tick, name="kvmtop-tick", daemon=True)

    # --- the API other threads call --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        self._ticker.start()

    def attach(self, pid: int) -> Future[Attached]:
        return self._send("attach", pid)

    def launch(self, argv: list[str], one_stop: bool = False) -> Future[Attached]:
        """Start ``argv`` traced. ``one_stop``: under a seccomp filter that stops only KVM_RUN
        and KVM_CREATE_VCPU, one stop per exit; the command's life is then tied to kvmtop's
        (ending the trace ends it), since its filtered ioctls need a tracer."""
        return self._send("launch", (list(argv), one_stop))

    def detach(self) -> Future[Detached]:
        return self._send("detach", None)

    def stats_fds(self) -> Future[StatsFds]:
        """KVM's binary stats fds of the traced VM and its vCPUs, made by one of its threads
        (see :mod:`kvmtop.inject`); the caller owns the fds. Fails with OSError if the kernel
        has no binary stats."""
        return self._send("stats", None)

    def stop(self, timeout: float = 2.0) -> None:
        """Detach if attached, then end the thread (bounded by ``timeout``)."""
        if self._thread.is_alive():
            self._send("quit", None)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _send(self, command: str, arg: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if not self._thread.is_alive():
            future.set_exception(KvmtopError("the tracer is not running"))
            return future
        self._commands.put((command, arg, future))
        self._kick()
        return future

    def _kick(self) -> None:
        try:
            os.kill(self._kicker, signal.SIGSTOP)
        except ProcessLookupError:
            pass  # the tracer is gone or re-forking its kicker

    def _tick(self) -> None:
        """Makes sure exits reach ``out`` within FLUSH_INTERVAL_S even when the guest goes quiet."""
        while self._thread.is_alive():
            time.sleep(FLUSH_INTERVAL_S)
            if self._unflushed or (self._proc is not None and self._proc.stats_job is not None):
                self._kick()

    # --- the tracing thread ------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._kicker = self._spawn_kicker()
            self._ready.set()
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - report, then let the kernel detach
            self.out.put(TracerFailed(f"tracer failed: {exc!r}", kind="KvmtopError"))
            # Returning ends this thread; the kernel then detaches every tracee (no EXITKILL).
        finally:
            self._ready.set()
            if self._kicker:
                os.close(self._kicker_pipe)  # its `read` sees end of file: it exits
                try:
                    os.kill(self._kicker, signal.SIGCONT)
                    os.waitpid(self._kicker, 0)
                except OSError:
                    pass

    def _spawn_kicker(self) -> int:
        if self._kicker_pipe >= 0:
            os.close(self._kicker_pipe)
        pid, self._kicker_pipe = spawn_kicker()
        return pid

    def _loop(self) -> None:
        monotonic_ns = time.monotonic_ns
        wait = StopWaiter(WAIT_FLAGS).wait
        dispatch = self._dispatch
        while not self._quit:
            tid, status = wait()
            dispatch(tid, status, monotonic_ns())

    def _dispatch(self, tid: int, status: int, now: int) -> None:
        th = self._threads.get(tid)
        if th is not None and (status & 0xFF) == 0x7F:  # WIFSTOPPED
            self._stops += 1
            try:
                if (status >> 8) == pt.SYSCALL_STOP:
                    self._syscall_stop(th, now)
                else:
                    self._other_stop(th, status)
            except pt.PtraceError as exc:
                if exc.errno != errno_module.ESRCH:
                    raise
                # Killed while stopped (exit_group, SIGKILL need no tracer): its exit
                # status follows, and is handled like any other.
            if len(self._events) >= BATCH_MAX:
                self._flush()
        elif tid == self._kicker:
            self._on_kicker(status)
        else:
            self._on_exit_or_stranger(tid, status, th)

    # Per KVM exit: 2 stops (KVM_RUN entry and exit), each costing waitpid +
    # PTRACE_GET_SYSCALL_INFO + PTRACE_SYSCALL = 3 syscalls; the exit is read from our own
    # mapping of kvm_run (0 syscalls), timestamps come from the vDSO.
    def _syscall_stop(self, th: _Thread, now: int) -> None:
        info = self._info.fetch(th.tid)
        op = info[0]
        if op == pt.PTRACE_SYSCALL_INFO_ENTRY:
            if th.proc.stats_job is not None:
                if self._inject(th, pt.PTRACE_SYSCALL, info):
                    return
            if th.proc.one_stop:  # its KVM_RUN entries are seccomp stops: nothing to do here
                self._resume(th, 0)
                return
            nr, fd, request = pt.SYSCALL_INFO_ENTRY.unpack_from(info)
            if nr == HOST.SYS_IOCTL and (request >> 8) & 0xFF == KVMIO:
                request &= 0xFFFFFFFF
                if request == KVM_RUN:
                    th.runner = True
                    th.in_run = True
                    page = th.run_page = th.proc.pages.get(fd) or self._open_page(th, fd)
                    if page is not None and page.tid != th.tid:
                        self._vcpu_moved(page, th.tid, now)
                    th.entry_ns = now
                elif request == KVM_CREATE_VCPU:
                    th.runner = True
                    th.creating_vcpu = True
                else:
                    th.budget = SYSCALL_BUDGET  # a KVM thread: keep watching it
            elif th.budget > 0:
                th.budget -= 1
        elif op == pt.PTRACE_SYSCALL_INFO_EXIT:
            if th.in_run:
                th.in_run = False
                rval = pt.SYSCALL_INFO_EXIT.unpack_from(info)[0]
                self._record_exit(th, rval, now)
            elif th.creating_vcpu:
                th.creating_vcpu = False
                rval = pt.SYSCALL_INFO_EXIT.unpack_from(info)[0]
                if rval >= 0:
                    self._forget_page(th.proc, rval)  # a new vCPU can reuse a closed fd number
                    self._open_page(th, rval)
        self._resume(th, 0)

    def _record_exit(self, th: _Thread, rval: int, now: int) -> None:
        page = th.run_page
        th.run_page = None
        if page is None:
            if rval == 0:
                self._lost += 1  # an exit happened, but its kvm_run could not be read
            return
        view = page.view()
        if rval == 0:
            reason, a, b, flags, data = decode_exit(view, self.with_data)
            event = ExitEvent(page.vcpu, reason, 0, th.entry_ns, now, a, b, flags, data)
        else:
            event = ExitEvent(page.vcpu, exit_reason_of(view), -rval, th.entry_ns, now)
        self._events.append(event)
        self._unflushed = True

    # One stop per KVM exit: at a vCPU's next KVM_RUN entry its kvm_run still holds the exit
    # the previous run ended with (nobody clears it), so that exit is read then. Per stop:
    # waitpid + PTRACE_GET_SYSCALL_INFO + PTRACE_CONT; the read costs no syscall.
    def _seccomp_stop(self, th: _Thread) -> None:
        now = time.monotonic_ns()
        info = self._info.fetch(th.tid)
        if th.proc.stats_job is not None and self._inject(th, pt.PTRACE_CONT, info):
            return
        _nr, fd, request = pt.SYSCALL_INFO_ENTRY.unpack_from(info)
        request &= 0xFFFFFFFF
        if request == KVM_RUN:
            page = th.proc.pages.get(fd) or self._open_page(th, fd)
            if page is not None:
                if page.tid != th.tid:
                    self._vcpu_moved(page, th.tid, now)
                if page.open_since:
                    self._record_cycle(page, now)
                page.open_since = now
                # With immediate_exit set, KVM_RUN returns EINTR at once and leaves exit_reason
                # as it was: remember it, or the previous exit would be counted twice.
                page.open_immediate = bool(page.view()[IMMEDIATE_EXIT_OFFSET])
        elif request == KVM_CREATE_VCPU:
            th.creating_vcpu = True  # resumed with PTRACE_SYSCALL: its return gives the fd
        self._resume(th, 0)

    def _record_cycle(self, page: RunPage, now: int) -> None:
        """The exit that ended the run entered at ``page.open_since``; its times span the run
        and the VMM's handling (EXIT_CYCLE)."""
        view = page.view()
        reason = ExitReason.INTR if page.open_immediate else exit_reason_of(view)
        if reason == ExitReason.INTR:  # the kernel sets it when a signal ends the run (EINTR)
            event = ExitEvent(
                page.vcpu, reason, errno_module.EINTR, page.open_since, now, flags=EXIT_CYCLE
            )
        else:
            _r, a, b, flags, data = decode_exit(view, self.with_data)
            event = ExitEvent(
                page.vcpu, reason, 0, page.open_since, now, a, b, flags | EXIT_CYCLE, data
            )
        page.open_since = 0
        self._events.append(event)
        self._unflushed = True

    def _close_runs(self, proc: _Process, tid: int | None) -> None:
        """A vCPU thread (``tid``; None: all) has ended: the exit of its last run is final. A
        last run that a dying process's kill cut short (KVM_EXIT_INTR) is no exit of the guest."""
        now = time.monotonic_ns()
        for page in proc.pages.values():
            if page.open_since and (tid is None or page.tid == tid):
                if page.open_immediate or exit_reason_of(page.view()) == ExitReason.INTR:
                    page.open_since = 0
                else:
                    self._record_cycle(page, now)

    def _open_page(self, th: _Thread, fd: int) -> RunPage | None:
        proc = th.proc
        try:
            page = open_run_page(proc.pid, proc.pidfd, fd)
        except OSError:
            return None
        proc.pages[fd] = page
        self._vcpu_moved(page, th.tid, time.monotonic_ns())
        return page

    def _vcpu_moved(self, page: RunPage, tid: int, now: int) -> None:
        """First run of a vCPU found at attach, or a VMM that moved a vCPU to another thread."""
        page.tid = tid
        self._seen.append(VcpuSeen(page.vcpu, tid, now))
        self._unflushed = True

    def _forget_page(self, proc: _Process, fd: int) -> None:
        page = proc.pages.pop(fd, None)
        if page is not None:
            page.close()

    def _other_stop(self, th: _Thread, status: int) -> None:
        sig = (status >> 8) & 0xFF
        event = status >> 16
        if event == pt.PTRACE_EVENT_SECCOMP:
            self._seccomp_stop(th)
        elif event == 0:
            self._resume(th, sig)  # signal-delivery-stop: pass the signal on, unchanged
        elif event == pt.PTRACE_EVENT_STOP:
            if sig in GROUP_STOP_SIGNALS and th.proc.detaching is None:
                # group-stop: stay stopped (until SIGCONT) but keep reporting to us
                self._ptrace(pt.PTRACE_LISTEN, th, 0)
            else:
                self._resume(th, 0)  # PTRACE_INTERRUPT, or the end of a group-stop
        elif event == pt.PTRACE_EVENT_CLONE:
            new_tid = pt.ptrace_geteventmsg(th.tid)
            if new_tid not in self._threads:
                self._threads[new_tid] = _Thread(new_tid, th.proc)
            self._resume(th, 0)
        elif event == pt.PTRACE_EVENT_EXEC:
            self._on_exec(th)
            self._resume(self._threads[th.proc.pid], 0)
        else:
            self._resume(th, 0)

    def _on_exec(self, th: _Thread) -> None:
        """A new program image: the old threads and vCPU fds are gone; the exec'ing thread now
        has the leader's tid."""
        proc = th.proc
        for tid in [t for t, other in self._threads.items() if other.proc is proc]:
            del self._threads[tid]
        for fd in list(proc.pages):
            self._forget_page(proc, fd)
        self._threads[proc.pid] = _Thread(proc.pid, proc)

    def _resume(self, th: _Thread, sig: int) -> None:
        proc = th.proc
        if proc.detaching is not None:
            self._ptrace(pt.PTRACE_DETACH, th, sig)
            self._threads.pop(th.tid, None)
            if not any(t.proc is proc for t in self._threads.values()):
                self._finish(proc, proc.detaching, None)
        elif proc.one_stop:  # only the seccomp filter stops it; or KVM_CREATE_VCPU's return
            syscalls = th.creating_vcpu or proc.stats_job is not None
            self._ptrace(pt.PTRACE_SYSCALL if syscalls else pt.PTRACE_CONT, th, sig)
        elif th.runner or th.budget > 0 or proc.stats_job is not None:
            self._ptrace(pt.PTRACE_SYSCALL, th, sig)
        else:
            self._ptrace(pt.PTRACE_CONT, th, sig)

    def _ptrace(self, request: int, th: _Thread, sig: int) -> None:
        try:
            pt.ptrace(request, th.tid, 0, sig)
        except pt.PtraceError as exc:
            if exc.errno != errno_module.ESRCH:
                raise
            # Killed while stopped (SIGKILL needs no tracer): its exit status follows.

    def _on_exit_or_stranger(self, tid: int, status: int, th: _Thread | None) -> None:
        if (status & 0xFF) == 0x7F:
            if tid in self._detached_children:
                return  # a launched command we no longer trace was stopped: not ours to handle
            # A new thread reporting before its parent's clone event: adopt it.
            proc = self._proc
            if proc is not None and tgid_of(tid) == proc.pid:
                self._stops += 1
                th = self._threads[tid] = _Thread(tid, proc)
                self._other_stop(th, status)
            else:  # one of a VMM we have detached from (its clone raced the detach): let it go
                try:
                    pt.ptrace(pt.PTRACE_DETACH, tid, 0, 0)
                except pt.PtraceError:
                    pass  # gone meanwhile
            return
        exit_status = _exit_status(status)
        if tid in self._detached_children:
            self._detached_children.discard(tid)
            self.out.put(Detached(tid, "exited", time.monotonic_ns(), exit_status))
            return
        if th is None:
            return
        del self._threads[tid]
        proc = th.proc
        if proc.one_stop:
            self._close_runs(proc, tid)
        if tid == proc.pid:  # the leader reports last: the whole VMM has ended
            for other in [t for t, o in self._threads.items() if o.proc is proc]:
                del self._threads[other]
            self._finish(proc, "exited", exit_status)
        elif proc.detaching is not None and not any(t.proc is proc for t in self._threads.values()):
            self._finish(proc, proc.detaching, None)

    def _finish(self, proc: _Process, why: str, exit_status: int | None) -> None:
        if self._proc is not proc:
            return
        if proc.stats_job is not None:
            proc.stats_job.error = f"no KVM counters: {why}"
            proc.stats_job.settle()
            proc.stats_job = None
        if proc.one_stop:
            self._close_runs(proc, None)
        for fd in list(proc.pages):
            self._forget_page(proc, fd)
        os.close(proc.pidfd)
        self._flush()
        detached = Detached(proc.pid, why, time.monotonic_ns(), exit_status)
        if proc.launched and exit_status is None:
            self._detached_children.add(proc.pid)
        self._proc = None
        self.out.put(detached)
        for waiter in proc.detach_waiters:
            if not waiter.done():
                waiter.set_result(detached)
        if self._quit_after_detach:
            self._quit = True

    def _flush(self) -> None:
        if self._events or self._seen or self._lost or self._stops:
            base_ns = self._proc.t0 if self._proc is not None else 0
            batch = ExitBatch.of(self._events, base_ns, self._seen, self._lost, self._stops)
            self.out.put(batch)
            self._events = []
            self._seen = []
            self._lost = 0
            self._stops = 0
        self._unflushed = False

    # --- commands ------------------------------------------------------------------------------

    def _on_kicker(self, status: int) -> None:
        if (status & 0xFF) == 0x7F:
            os.kill(self._kicker, signal.SIGCONT)
        else:
            self._kicker = self._spawn_kicker()  # someone killed it; a new one
        self._flush()
        self._nudge_stats()
        while True:
            try:
                command, arg, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                if command == "attach":
                    future.set_result(self._attach(arg))
                elif command == "launch":
                    future.set_result(self._launch(*arg))
                elif command == "detach":
                    self._begin_detach("detached", future)
                elif command == "quit":
                    self._quit_when_detached(future)
                elif command == "stats":
                    self._start_stats(future)
            except KvmtopError as exc:
                if command != "stats":  # the tracing goes on; only the asker needs to know
                    self.out.put(TracerFailed(str(exc), kind=type(exc).__name__))
                future.set_exception(exc)

    # --- KVM's own counters (kvmtop.inject) -------------------------------------------------------

    def _start_stats(self, future: Future[StatsFds]) -> None:
        proc = self._proc
        if proc is None or proc.detaching is not None:
            raise KvmtopError("not attached")
        if proc.stats_job is not None:
            raise KvmtopError("KVM's counters are being fetched already")
        tids = [t.tid for t in self._threads.values() if t.proc is proc]
        proc.stats_job = plan_job(future, proc.pid, tids, proc.one_stop)

    def _nudge_stats(self) -> None:
        """A busy vCPU's next KVM_RUN entry comes at once, and so does some thread's syscall.
        If the job is not done after 0.2 s, the threads are interrupted: a blocking syscall
        restarts (its entry comes again); a KVM_RUN returns EINTR, as for any signal, which
        VMMs handle by running it again (an idle vCPU may not leave KVM_RUN for seconds)."""
        proc = self._proc
        job = proc.stats_job if proc is not None else None
        if proc is None or job is None or job.nudged:
            return
        if time.monotonic_ns() - job.asked_ns > 200_000_000:
            job.nudged = True
            self._interrupt(proc)

    def _interrupt(self, proc: _Process) -> None:
        for th in [t for t in self._threads.values() if t.proc is proc]:
            try:
                pt.ptrace(pt.PTRACE_INTERRUPT, th.tid, 0, 0)
            except pt.PtraceError as exc:
                if exc.errno != errno_module.ESRCH:
                    raise

    def _inject(self, th: _Thread, resume: int, info: memoryview) -> bool:
        """Go on with the stats job on ``th``, at a syscall entry (``info``: its
        PTRACE_GET_SYSCALL_INFO). False: nothing was done, the stop is handled as usual; True:
        handled (the stop that followed was dispatched)."""
        proc = th.proc
        job = proc.stats_job
        assert job is not None
        if proc.detaching is not None:
            return False
        run = None
        run_fd = _kvm_run_fd(info)
        if run_fd is not None:
            page = proc.pages.get(run_fd) or self._open_page(th, run_fd)
            run = (page.vcpu, run_fd) if page is not None else None
        try:
            status = run_job(job, th.tid, proc.pidfd, resume, run)
        except pt.PtraceError as exc:
            if exc.errno != errno_module.ESRCH:
                raise
            return True  # killed meanwhile: its exit status follows
        if job.finished:
            proc.stats_job = None
            job.settle()
        if status is None:
            return False
        self._dispatch(th.tid, status, time.monotonic_ns())
        return True

    def _quit_when_detached(self, future: Future[Any]) -> None:
        future.set_result(None)
        if self._proc is None:
            self._quit = True
        else:
            self._quit_after_detach = True
            self._begin_detach("detached", None)

    def _begin_detach(self, why: str, future: Future[Detached] | None) -> None:
        proc = self._proc
        if proc is None:
            if future is not None:
                future.set_exception(KvmtopError("not attached"))
            return
        if future is not None:
            proc.detach_waiters.append(future)
        if proc.one_stop:
            # Its filtered ioctls need a tracer (ENOSYS without one): ending the trace ends
            # the command, gracefully; its exit is reported as usual.
            os.kill(proc.pid, signal.SIGTERM)
            return
        if proc.detaching is not None:
            return  # already under way
        proc.detaching = why
        self._interrupt(proc)
        if not any(t.proc is proc for t in self._threads.values()):
            self._finish(proc, why, None)

    def _attach(self, pid: int) -> Attached:
        if self._proc is not None:
            raise KvmtopError(f"already attached to pid {self._proc.pid}; detach first")
        t0 = time.monotonic_ns()
        argv = check_attachable(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcess(f"no such process: {pid}") from None
        proc = _Process(pid, pidfd, argv, launched=False, t0=t0)
        self._proc = proc
        seized: list[int] = []
        try:
            while True:  # threads created while we seize: list again until nothing is new
                new = [t for t in task_ids(pid) if t not in self._threads]
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
                    self._threads[tid] = _Thread(tid, proc)
        except BaseException:
            if seized:
                self._begin_detach("attach failed", None)
            else:
                self._proc = None
                os.close(pidfd)
            raise
        if not seized:
            self._proc = None
            os.close(pidfd)
            raise NoSuchProcess(f"no such process: {pid}")
        for tid in seized:  # stop each once, so it can be resumed with PTRACE_SYSCALL
            try:
                pt.ptrace(pt.PTRACE_INTERRUPT, tid, 0, 0)
            except pt.PtraceError as exc:
                if exc.errno != errno_module.ESRCH:
                    raise
        self._open_known_vcpus(proc)
        attached = Attached(pid, argv, t0, launched=False)
        self._flush()
        self.out.put(attached)
        return attached

    def _open_known_vcpus(self, proc: _Process) -> None:
        try:
            fds = vcpu_fds(proc.pid)
        except OSError:
            return
        opened: set[int] = set()
        for fd, vcpu in sorted(fds.items()):
            if vcpu in opened:
                continue  # another fd of the same vCPU: its first KVM_RUN will map that one
            opened.add(vcpu)
            try:
                page = open_run_page(proc.pid, proc.pidfd, fd)
            except OSError:
                continue
            proc.pages[fd] = page
            self._seen.append(VcpuSeen(page.vcpu, 0, time.monotonic_ns()))

    def _launch(self, argv: list[str], one_stop: bool = False) -> Attached:
        """Start ``argv`` traced from its first instruction (:func:`spawn_stopped`): seized while
        it is stopped, then continued, it execs the command."""
        if self._proc is not None:
            raise KvmtopError(f"already attached to pid {self._proc.pid}; detach first")
        t0 = time.monotonic_ns()
        pid, filtered = spawn_stopped(argv, one_stop, self.child_stdio, self.child_stdout_to_stderr)
        options = OPTIONS | (pt.PTRACE_O_TRACESECCOMP | pt.PTRACE_O_EXITKILL if filtered else 0)
        pt.ptrace(pt.PTRACE_SEIZE, pid, 0, options)
        os.kill(pid, signal.SIGCONT)  # the launcher runs on, traced, and execs the command
        proc = _Process(
            pid, os.pidfd_open(pid), tuple(argv), launched=True, one_stop=filtered, t0=t0
        )
        self._proc = proc
        self._threads[pid] = _Thread(pid, proc)
        attached = Attached(pid, tuple(argv), t0, launched=True, one_stop=filtered)
        self.out.put(attached)
        return attached


IMMEDIATE_EXIT_OFFSET = 1  # offsetof(struct kvm_run, immediate_exit)


def _kvm_run_fd(info: memoryview) -> int | None:
    """The vCPU fd, if the syscall entering is KVM_RUN."""
    nr, fd, request = pt.SYSCALL_INFO_ENTRY.unpack_from(info)
    return fd if nr == HOST.SYS_IOCTL and request & 0xFFFFFFFF == KVM_RUN else None


def _exit_status(status: int) -> int:
    """A shell-style status: the exit code, or 128 + the signal that killed it."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return status
