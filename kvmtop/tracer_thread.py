"""The tracing engine: the one thread that owns ptrace, and decides.

The kernel wants every ptrace request for a tracee to come from the thread that attached it, so
everything ptrace happens on :class:`Tracer`'s own thread. Other threads talk to it through a
command queue (attach, launch, detach, quit) and receive :mod:`kvmtop.events` messages in batches
on ``Tracer.out``.

How a KVM exit is seen: every thread of the VMM is seized (PTRACE_SEIZE, never SIGSTOP) and
resumed with PTRACE_SYSCALL. At the syscall-entry stop of ``ioctl(vcpu_fd, KVM_RUN)`` the time is
taken; at its syscall-exit stop the exit is read from kvmtop's own read-only mapping of that
vCPU's ``struct kvm_run``. Threads that never touch KVM are resumed with PTRACE_CONT once they
have used up a small syscall budget, so they cost no stops. A launched command runs under a
seccomp filter instead: with user notification, its KVM_RUNs go to a listener thread
(:mod:`kvmtop.notify_thread`) and cost no ptrace stop at all; with SECCOMP_RET_TRACE, one stop
each. Either way an exit is read at the vCPU's next KVM_RUN entry.

The per-stop work is the engine's (:mod:`kvmtop.hot_state`, in C when built): it handles the
common stops itself and hands every other one back to this thread, which decides what happens
(new threads, exec, exits, signals, detach, KVM's counters) and tells the engine.

kvmtop never writes the tracee's memory (registers only for KVM's counters, on request), passes
every signal through unchanged, and when it detaches (or its thread dies, which makes the kernel
detach) the VMM runs on as if never traced.

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
from typing import Any

from kvmtop import ptrace_abi as pt
from kvmtop.errors import KvmtopError
from kvmtop.events import (
    Attached,
    Detached,
    ExitBatch,
    TracerEnded,
    TracerFailed,
    TracerMessage,
    VcpuSeen,
)
from kvmtop.hot_state import (
    MODE_NOTIFY,
    MODE_ONE_STOP,
    MODE_TWO_STOP,
    P_HANDBACK,
    P_NO_RESUME,
    P_SYSCALLS,
    make_engine,
    vcpu_records,
)
from kvmtop.inject import StatsFds, plan_job, run_job
from kvmtop.procfs import tgid_of
from kvmtop.spawn import spawn_kicker
from kvmtop.stop_wait import poll_max_ns_from_env
from kvmtop.traced import (
    OPTIONS,
    TracedProcess,
    exit_status_of,
    kvm_run_fd,
    launch_process,
    seize_process,
)

WAIT_FLAGS = pt.WALL | pt.WNOTHREAD | os.WUNTRACED
GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
BATCH_BYTES = 4096 * 32  # records the engine gathers before a flush
FLUSH_INTERVAL_S = 0.1
FLUSH_INTERVAL_NS = int(FLUSH_INTERVAL_S * 1e9)

__all__ = ["OPTIONS", "Tracer"]


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
        self.engine = make_engine(0, with_data, poll_max_ns_from_env(), WAIT_FLAGS)
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="kvmtop-tracer", daemon=True)
        self._ready = threading.Event()
        self._kicker = 0
        self._kicker_pipe = -1
        self._quit = False
        self._quit_after_detach = False
        self._proc: TracedProcess | None = None
        self._detached_children: set[int] = set()  # launched, detached, not yet reaped
        self._seen: list[VcpuSeen] = []
        self._lost = 0
        self._stops = 0  # the stops this thread handled itself
        self._last_base = 0  # record times' zero of the last session, for what is left of it
        self._info = pt.SyscallInfo()
        self._ticker = threading.Thread(target=self._tick, name="kvmtop-tick", daemon=True)

    # --- the API other threads call --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        self._ticker.start()

    def attach(self, pid: int) -> Future[Attached]:
        return self._send("attach", pid)

    def launch(self, argv: list[str], seccomp: str = "") -> Future[Attached]:
        """Start ``argv`` traced. ``seccomp``: "notify" (seccomp user notification, no ptrace
        stop per exit; else as "trace"), "trace" (SECCOMP_RET_TRACE, one stop per exit) or ""
        (two stops). Under a filter the command's life is tied to kvmtop's (ending the trace
        ends it), since its filtered ioctls need kvmtop."""
        return self._send("launch", (list(argv), seccomp))

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
            proc = self._proc
            if self.engine.pending() or (proc is not None and proc.stats_job is not None):
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
            proc = self._proc
            if proc is not None and proc.notifier is not None:
                proc.notifier.stop()
            if self._kicker:
                os.close(self._kicker_pipe)  # its `read` sees end of file: it exits
                try:
                    os.kill(self._kicker, signal.SIGCONT)
                    os.waitpid(self._kicker, 0)
                except OSError:
                    pass
            self.out.put(TracerEnded())

    def _spawn_kicker(self) -> int:
        if self._kicker_pipe >= 0:
            os.close(self._kicker_pipe)
        pid, self._kicker_pipe = spawn_kicker()
        return pid

    def _loop(self) -> None:
        run = self.engine.run
        monotonic_ns = time.monotonic_ns
        while not self._quit:
            got = run(monotonic_ns() + FLUSH_INTERVAL_NS, BATCH_BYTES)
            if got is None:  # a deadline or a full batch
                self._flush()
            else:
                self._dispatch(*got)

    def _dispatch(self, tid: int, status: int, now: int) -> None:
        """A stop or exit the engine handed back."""
        proc = self._proc
        ours = proc is not None and self.engine.thread(tid) is not None
        if ours and (status & 0xFF) == 0x7F:  # WIFSTOPPED
            assert proc is not None
            self._stops += 1
            try:
                if (status >> 8) == pt.SYSCALL_STOP:
                    self._syscall_stop(proc, tid, status, now)
                else:
                    self._other_stop(proc, tid, status, now)
            except pt.PtraceError as exc:
                if exc.errno != errno_module.ESRCH:
                    raise
                # Killed while stopped (exit_group, SIGKILL need no tracer): its exit
                # status follows, and is handled like any other.
        elif tid == self._kicker:
            self._on_kicker(status)
        else:
            self._on_exit_or_stranger(tid, status, proc if ours else None)

    def _syscall_stop(self, proc: TracedProcess, tid: int, status: int, now: int) -> None:
        info = self._info.fetch(tid)
        op = info[0]
        if op == pt.PTRACE_SYSCALL_INFO_ENTRY:
            if proc.stats_job is not None and self._inject(proc, tid, pt.PTRACE_SYSCALL, info):
                return
            fd = kvm_run_fd(info)
            if fd is not None and proc.mode == MODE_TWO_STOP:
                self._ensure_page(proc, tid, fd)
        elif op == pt.PTRACE_SYSCALL_INFO_EXIT:
            state = self.engine.thread(tid)
            if state is not None and state[3] and not state[4]:  # creating a vCPU
                rval = pt.SYSCALL_INFO_EXIT.unpack_from(info)[0]
                if rval >= 0:
                    proc.forget_page(self.engine, rval)  # a new vCPU can reuse a closed fd
                    proc.open_page(self.engine, tid, rval, at_run=False)
                self.engine.set_thread(tid, True, False)
                self._resume(proc, tid, 0)
                return
        self._handle_or_resume(proc, tid, status, now)

    def _handle_or_resume(self, proc: TracedProcess, tid: int, status: int, now: int) -> None:
        """The engine's bookkeeping for a syscall or seccomp stop, then the resume."""
        if not self.engine.handle(tid, status, now):
            self._resume(proc, tid, 0)
        elif proc.detaching is not None:
            self._resume(proc, tid, 0)  # handled without a resume (P_NO_RESUME): detach it

    def _ensure_page(self, proc: TracedProcess, tid: int, fd: int) -> None:
        if self.engine.page(proc.pid, fd) is None:
            proc.open_page(self.engine, tid, fd)

    def _other_stop(self, proc: TracedProcess, tid: int, status: int, now: int) -> None:
        sig = (status >> 8) & 0xFF
        event = status >> 16
        if event == pt.PTRACE_EVENT_SECCOMP:
            info = self._info.fetch(tid)
            if proc.stats_job is not None and self._inject(proc, tid, pt.PTRACE_CONT, info):
                return
            fd = kvm_run_fd(info)
            if fd is not None:
                self._ensure_page(proc, tid, fd)
            self._handle_or_resume(proc, tid, status, now)
        elif event == 0:
            self._resume(proc, tid, sig)  # signal-delivery-stop: pass the signal on, unchanged
        elif event == pt.PTRACE_EVENT_STOP:
            if sig in GROUP_STOP_SIGNALS and proc.detaching is None:
                # group-stop: stay stopped (until SIGCONT) but keep reporting to us
                self._ptrace(pt.PTRACE_LISTEN, tid, 0)
            else:
                self._resume(proc, tid, 0)  # PTRACE_INTERRUPT, or the end of a group-stop
        elif event == pt.PTRACE_EVENT_CLONE:
            self.engine.add_thread(pt.ptrace_geteventmsg(tid), proc.pid)
            self._resume(proc, tid, 0)
        elif event == pt.PTRACE_EVENT_EXEC:
            # A new program image: the old threads and vCPU fds are gone; the exec'ing thread
            # now has the leader's tid.
            for other in self.engine.threads_of(proc.pid):
                self.engine.remove_thread(other)
            proc.forget_pages(self.engine)
            self.engine.add_thread(proc.pid, proc.pid)
            self._resume(proc, proc.pid, 0)
        else:
            self._resume(proc, tid, 0)

    def _resume(self, proc: TracedProcess, tid: int, sig: int) -> None:
        if proc.detaching is not None:
            self._ptrace(pt.PTRACE_DETACH, tid, sig)
            self.engine.remove_thread(tid)
            if not self.engine.threads_of(proc.pid):
                self._finish(proc, proc.detaching, None)
            return
        try:
            self.engine.resume(tid, sig)
        except OSError as exc:
            if exc.errno != errno_module.ESRCH:
                raise

    def _ptrace(self, request: int, tid: int, sig: int) -> None:
        try:
            pt.ptrace(request, tid, 0, sig)
        except pt.PtraceError as exc:
            if exc.errno != errno_module.ESRCH:
                raise
            # Killed while stopped (SIGKILL needs no tracer): its exit status follows.

    def _on_exit_or_stranger(self, tid: int, status: int, proc: TracedProcess | None) -> None:
        if (status & 0xFF) == 0x7F:
            if tid in self._detached_children:
                return  # a launched command we no longer trace was stopped: not ours to handle
            # A new thread reporting before its parent's clone event: adopt it.
            proc = self._proc
            if proc is not None and tgid_of(tid) == proc.pid:
                self.engine.add_thread(tid, proc.pid)
                self._dispatch(tid, status, time.monotonic_ns())
            else:  # one of a VMM we have detached from (its clone raced the detach): let it go
                try:
                    pt.ptrace(pt.PTRACE_DETACH, tid, 0, 0)
                except pt.PtraceError:
                    pass  # gone meanwhile
            return
        exit_status = exit_status_of(status)
        if tid in self._detached_children:
            self._detached_children.discard(tid)
            self.out.put(Detached(tid, "exited", time.monotonic_ns(), exit_status))
            return
        if proc is None:
            return
        self.engine.remove_thread(tid)
        if proc.mode != MODE_TWO_STOP:
            self.engine.close_runs(proc.pid, tid, time.monotonic_ns())
        if tid == proc.pid:  # the leader reports last: the whole VMM has ended
            self._finish(proc, "exited", exit_status)
        elif proc.detaching is not None and not self.engine.threads_of(proc.pid):
            self._finish(proc, proc.detaching, None)

    def _finish(self, proc: TracedProcess, why: str, exit_status: int | None) -> None:
        if self._proc is not proc:
            return
        if proc.stats_job is not None:
            proc.stats_job.error = f"no KVM counters: {why}"
            proc.stats_job.settle()
            proc.stats_job = None
        if proc.notifier is not None:
            # Every process under the filter has gone before its leader reports; the listener
            # sees the hang-up and ends by itself.
            proc.notifier.wait(1.0)
        if proc.mode != MODE_TWO_STOP:
            self.engine.close_runs(proc.pid, 0, time.monotonic_ns())
        proc.forget_pages(self.engine)
        self.engine.remove_process(proc.pid)
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
        records, seen, stops, notifications, lost, _exits = self.engine.take()
        proc = self._proc
        base = proc.t0 if proc is not None else self._last_base
        vcpus = self._seen + [VcpuSeen(*seen) for seen in vcpu_records(seen, base)]
        lost += self._lost
        stops += self._stops
        if records or vcpus or lost or stops or notifications:
            self.out.put(ExitBatch(records, base, tuple(vcpus), lost, stops))
            self._seen = []
            self._lost = 0
            self._stops = 0

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

    def _set_flags(self, proc: TracedProcess) -> None:
        """Tell the engine how to treat the process's stops now."""
        flags = 0
        if proc.stats_job is not None:
            flags |= P_HANDBACK | P_SYSCALLS
        if proc.detaching is not None:
            flags |= P_HANDBACK | P_NO_RESUME
        self.engine.set_process(proc.pid, proc.mode, flags)

    # --- KVM's own counters (kvmtop.inject) -------------------------------------------------------

    def _start_stats(self, future: Future[StatsFds]) -> None:
        proc = self._proc
        if proc is None or proc.detaching is not None:
            raise KvmtopError("not attached")
        if proc.stats_job is not None:
            raise KvmtopError("KVM's counters are being fetched already")
        tids = self.engine.threads_of(proc.pid)
        proc.stats_job = plan_job(future, proc.pid, tids, proc.mode != MODE_TWO_STOP)
        self._set_flags(proc)

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

    def _interrupt(self, proc: TracedProcess) -> None:
        for tid in self.engine.threads_of(proc.pid):
            try:
                pt.ptrace(pt.PTRACE_INTERRUPT, tid, 0, 0)
            except pt.PtraceError as exc:
                if exc.errno != errno_module.ESRCH:
                    raise

    def _inject(self, proc: TracedProcess, tid: int, resume: int, info: memoryview) -> bool:
        """Go on with the stats job on ``tid``, at a syscall entry (``info``: its
        PTRACE_GET_SYSCALL_INFO). False: nothing was done, the stop is handled as usual; True:
        handled (the stop that followed was dispatched)."""
        job = proc.stats_job
        assert job is not None
        if proc.detaching is not None:
            return False
        run = None
        run_fd = kvm_run_fd(info)
        if run_fd is not None:
            self._ensure_page(proc, tid, run_fd)
            page = self.engine.page(proc.pid, run_fd)
            run = (page[0], run_fd) if page is not None else None
        try:
            status = run_job(job, tid, proc.pidfd, resume, run)
        except pt.PtraceError as exc:
            if exc.errno != errno_module.ESRCH:
                raise
            return True  # killed meanwhile: its exit status follows
        if job.finished:
            proc.stats_job = None
            self._set_flags(proc)
            job.settle()
        if status is None:
            return False
        self._dispatch(tid, status, time.monotonic_ns())
        return True

    # --- attach, launch, detach ---------------------------------------------------------------------

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
        if proc.mode != MODE_TWO_STOP:
            # Its filtered ioctls need kvmtop (ENOSYS without it): ending the trace ends the
            # command, gracefully; its exit is reported as usual.
            os.kill(proc.pid, signal.SIGTERM)
            return
        if proc.detaching is not None:
            return  # already under way
        proc.detaching = why
        self._set_flags(proc)
        self._interrupt(proc)
        if not self.engine.threads_of(proc.pid):
            self._finish(proc, why, None)

    def _begin(self, proc: TracedProcess) -> None:
        if self._proc is not None:
            raise KvmtopError(f"already attached to pid {self._proc.pid}; detach first")
        self._flush()  # what is left of an earlier session goes out with its own base
        self._proc = proc
        self._last_base = proc.t0
        self.engine.set_base(proc.t0)

    def _attach(self, pid: int) -> Attached:
        if self._proc is not None:
            raise KvmtopError(f"already attached to pid {self._proc.pid}; detach first")
        proc = seize_process(pid, self.engine, self._begin, self._begin_detach)
        self._seen += proc.open_known_vcpus(self.engine)
        attached = Attached(pid, proc.argv, proc.t0, launched=False)
        self._flush()
        self.out.put(attached)
        return attached

    def _launch(self, argv: list[str], seccomp: str = "") -> Attached:
        """Start ``argv`` traced from its first instruction: seized while it is stopped, then
        continued, it execs the command."""
        if self._proc is not None:
            raise KvmtopError(f"already attached to pid {self._proc.pid}; detach first")
        proc = launch_process(
            argv, seccomp, self.engine, self.child_stdio, self.child_stdout_to_stderr
        )
        self._begin(proc)
        if proc.mode == MODE_NOTIFY:
            proc.start_notifier(self.engine, self._kick, self._notify_failed)
        os.kill(proc.pid, signal.SIGCONT)  # the launcher runs on, traced, and execs the command
        attached = Attached(
            proc.pid, tuple(argv), proc.t0, launched=True,
            one_stop=proc.mode in (MODE_ONE_STOP, MODE_NOTIFY),
            notify=proc.mode == MODE_NOTIFY, filter_note=proc.filter_note,
        )  # fmt: skip
        self.out.put(attached)
        return attached

    def _notify_failed(self, message: str) -> None:
        self.out.put(TracerFailed(message, kind="KvmtopError"))
