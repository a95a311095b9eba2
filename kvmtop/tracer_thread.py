"""The tracing engine: the one thread that owns ptrace, and decides.

The kernel wants every ptrace request for a tracee to come from the thread that attached it, so
everything ptrace happens on :class:`Tracer`'s own thread. Other threads talk to it through a
command queue (attach, launch, detach, quit) and receive :mod:`kvmtop.model.events` messages in batches
on ``Tracer.out``.

How a KVM exit is seen: every thread of the VMM is seized (PTRACE_SEIZE, never SIGSTOP) and
resumed with PTRACE_SYSCALL. At the syscall-entry stop of ``ioctl(vcpu_fd, KVM_RUN)`` the time is
taken; at its syscall-exit stop the exit is read from kvmtop's own read-only mapping of that
vCPU's ``struct kvm_run``. Threads that never touch KVM are resumed with PTRACE_CONT once they
have used up a small syscall budget, so they cost no stops. A launched command runs under a
seccomp filter instead: with user notification, its KVM_RUNs go to a listener thread
(:mod:`kvmtop.trace.notify_listener`) and cost no ptrace stop at all; with SECCOMP_RET_TRACE, one stop
each. Either way an exit is read at the vCPU's next KVM_RUN entry.

The per-stop work is the engine's (:mod:`kvmtop.trace.py_engine`, in C when built): it handles the
common stops itself and hands every other one back to this thread, which decides what happens
(new threads, exec, exits, signals, detach, KVM's counters) and tells the engine.

kvmtop never writes the tracee's memory (registers only for KVM's counters, on request), passes
every signal through unchanged, and when it detaches (or its thread dies, which makes the kernel
detach) the VMM runs on as if never traced.

Waking the thread: it sleeps in waitpid(), which no queue can interrupt, so it keeps a tiny
child of its own (:mod:`kvmtop.trace.kicker`); stopping that child with SIGSTOP makes waitpid return.
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

from kvmtop.abi import ptrace_abi as pt
from kvmtop.errors import KvmtopError
from kvmtop.host.procfs import tgid_of
from kvmtop.model.events import VcpuSeen
from kvmtop.model.messages import (
    Attached,
    Detached,
    ExitBatch,
    StatsFds,
    TracerEnded,
    TracerFailed,
    TracerMessage,
    TracerNote,
    close_when_answered,
)
from kvmtop.trace.commanded import Commanded
from kvmtop.trace.engine import (
    ENGINE_ENV,
    ENGINES,
    MODE_NOTIFY,
    MODE_ONE_STOP,
    MODE_TWO_STOP,
    P_HANDBACK,
    P_NO_RESUME,
    P_SYSCALLS,
    PtraceEngine,
    vcpu_records,
)
from kvmtop.trace.followed_processes import OPTIONS, Followed, launch_process, seize_process
from kvmtop.trace.inject import (
    CheckJob,
    own_filter,
    own_filter_message,
    plan_job,
    run_job,
    vm_fds,
)
from kvmtop.trace.kicker import Kicker
from kvmtop.trace.native_engine import make_engine
from kvmtop.trace.stop_wait import poll_max_ns_from_env
from kvmtop.trace.sync_regs import NOT_ASKED
from kvmtop.trace.traced_process import (
    TracedProcess,
    exit_status_of,
    interrupted_run_fd,
    kvm_run_fd,
)

WAIT_FLAGS = pt.WALL | pt.WNOTHREAD | os.WUNTRACED
GROUP_STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
BATCH_BYTES = 4096 * 32  # records the engine gathers before a flush
FLUSH_INTERVAL_S = 0.1
FLUSH_INTERVAL_NS = int(FLUSH_INTERVAL_S * 1e9)

__all__ = ["OPTIONS", "Tracer"]


class Tracer(Commanded):
    """Owns the tracing thread. One session at a time (:class:`kvmtop.trace.followed_processes.Followed`: the
    VMMs attached to, or a launched command and every process it starts); attach again after a
    detach."""

    def __init__(
        self,
        with_data: bool = False,
        child_stdio: str | None = None,
        child_stdout_to_stderr: bool = False,
        child_stderr: str | None = None,
        rip: bool = False,
    ) -> None:
        self.out: queue.SimpleQueue[TracerMessage] = queue.SimpleQueue()
        self.with_data = with_data
        self.rip = rip  # every exit's guest RIP (kvmtop.trace.sync_regs), where it is safe
        self.child_stdio = child_stdio  # launched commands' stdio goes here (TUI: /dev/null)
        self.child_stdout_to_stderr = child_stdout_to_stderr  # kvmtop's stdout is a stream
        self.child_stderr = child_stderr  # ...and their stderr here (TUI: a file, to show it)
        self.engine: PtraceEngine = make_engine(0, with_data, poll_max_ns_from_env(), WAIT_FLAGS)
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="kvmtop-tracer", daemon=True)
        self._ready = threading.Event()
        self._kicker = Kicker()
        self._quit = False
        self._quit_after_detach = False
        self._group: Followed | None = None
        self._last_group: Followed | None = None  # for what is left of the last session
        self._stats_proc: TracedProcess | None = None  # the process a stats job is for
        self._asking = False  # a caller's KVM_CAP_SYNC_REGS check is under way (nudged as stats)
        self._kicked: set[int] = set()  # threads kvmtop interrupted, before their next stop
        self._detached_children: set[int] = set()  # launched, detached, not yet reaped
        self._seen: list[VcpuSeen] = []
        self._lost = 0
        self._stops = 0  # the stops this thread handled itself
        self._info = pt.SyscallInfo()
        self._ticker = threading.Thread(target=self._tick, name="kvmtop-tick", daemon=True)
        self._rip_decided = threading.Condition()  # notified when a VMM answered (--rip)
        self._rip_waiting: set[int] = set()  # vCPU threads whose first run waits for that

    # --- the API other threads call --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        self._ticker.start()

    def attach(self, *pids: int) -> Future[Attached]:
        """Trace the VMMs ``pids`` (their children are not followed)."""
        return self._send("attach", pids)

    def launch(self, argv: list[str], seccomp: str = "") -> Future[Attached]:
        """Start ``argv`` traced, with every process it starts. ``seccomp``: "notify" (seccomp
        user notification, no ptrace stop per exit; else as "trace"), "trace"
        (SECCOMP_RET_TRACE, one stop per exit) or "" (two stops). Under a filter the command's
        life is tied to kvmtop's (ending the trace ends it), since its filtered ioctls need
        kvmtop."""
        return self._send("launch", (list(argv), seccomp))

    def detach(self) -> Future[Detached]:
        return self._send("detach", None)

    def stats_fds(self) -> Future[StatsFds]:
        """KVM's binary stats fds of the traced VM and its vCPUs, made by one of its threads
        (see :mod:`kvmtop.trace.inject`); the caller owns the fds. Fails with OSError if the kernel
        has no binary stats."""
        return self._send("stats", None)

    def sync_regs_allowed(self) -> Future[dict[int, int]]:
        """What KVM allows the traced VMM's VMs in kvm_valid_regs: ``{VM fd: the bits, or
        -errno}``, asked by one of its threads (KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS), see
        :mod:`kvmtop.trace.inject`); nothing is set here. Fails with KvmtopError where the VMM
        runs under a seccomp filter of its own (it is not asked) or goes away first."""
        return self._send("check", None)

    def want_rip(self) -> Future[None]:
        """From now on, every exit's guest RIP where it is safe (see
        :mod:`kvmtop.trace.sync_regs`; what is not is said in TracerNote messages)."""
        return self._send("rip", None)

    def _wake(self) -> None:
        self._kicker.kick()

    def _tick(self) -> None:
        """Makes sure exits reach ``out`` within FLUSH_INTERVAL_S even when the guest goes quiet."""
        while self._thread.is_alive():
            time.sleep(FLUSH_INTERVAL_S)
            if self.engine.pending() or self._stats_proc is not None or self.rip or self._asking:
                self._kicker.kick()

    # --- the tracing thread ------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._kicker.start()
            self._ready.set()
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - report, then let the kernel detach
            self.out.put(TracerFailed(f"tracer failed: {exc!r}", kind="KvmtopError"))
            # Returning ends this thread; the kernel then detaches every tracee (no EXITKILL).
        finally:
            self._ready.set()
            group = self._group
            for proc in group.procs.values() if group is not None else ():
                proc.restore_rips()  # the kernel detaches the VMM; the field goes back too
            if group is not None and group.notifier is not None:
                group.notifier.stop()
            self._kicker.close()
            self.out.put(TracerEnded())

    def _loop(self) -> None:
        run = self.engine.run
        monotonic_ns = time.monotonic_ns
        while not self._quit:
            got = run(monotonic_ns() + FLUSH_INTERVAL_NS, BATCH_BYTES)
            if got is None:  # a deadline or a full batch
                self._flush()
            else:
                self._dispatch(got.tid, got.status, got.now_ns)

    def _dispatch(self, tid: int, status: int, now: int) -> None:
        """A stop or exit the engine handed back."""
        group = self._group
        proc = group.proc_of(self.engine, tid) if group is not None else None
        if proc is not None and (status & 0xFF) == 0x7F:  # WIFSTOPPED
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
        elif tid == self._kicker.pid:
            self._on_kicker(status)
        else:
            self._on_exit_or_stranger(tid, status, proc)

    def _syscall_stop(self, proc: TracedProcess, tid: int, status: int, now: int) -> None:
        info = self._info.fetch(tid)
        op = info[0]
        if op == pt.PTRACE_SYSCALL_INFO_ENTRY:
            fd = kvm_run_fd(info)
            if fd is not None and proc.mode == MODE_TWO_STOP:
                self._ensure_page(proc, tid, fd)  # (with --rip: asked for below, before its run)
                if self._detaching and tid in self._kicked:
                    # kvmtop's interrupt is pending: detached here, the KVM_RUN would end with
                    # EINTR unseen (a signal exit KVM counts). Run it to that end, seen, first.
                    self.engine.handle(tid, status, now)
                    pt.ptrace_unless_gone(pt.PTRACE_SYSCALL, tid)
                    return
            if self._has_job(proc) and self._inject(proc, tid, pt.PTRACE_SYSCALL, info):
                return
        elif op == pt.PTRACE_SYSCALL_INFO_EXIT:
            state = self.engine.thread(tid)
            if tid in self._kicked and state is not None and state.in_run:  # its KVM_RUN returns
                self._kicked.discard(tid)
                if pt.SYSCALL_INFO_EXIT.unpack_from(info)[0] == -errno_module.EINTR:
                    # kvmtop's own PTRACE_INTERRUPT (a detach, KVM's counters) ended the run:
                    # no exit of the guest's, but a signal exit KVM counted
                    self._count_kick(proc, tid)
                    self.engine.set_thread(tid, True, False)
                    self._resume(proc, tid, 0)
                    return
            if state is not None and state.creating and not state.in_run:  # a vCPU created
                rval = pt.SYSCALL_INFO_EXIT.unpack_from(info)[0]
                if rval >= 0:
                    proc.forget_page(self.engine, rval)  # a new vCPU can reuse a closed fd
                    proc.open_page(self.engine, tid, rval, at_run=False)
                    self._rip_check(proc)  # asked at its next syscall: before its first run
                self.engine.set_thread(tid, True, False)
                self._resume(proc, tid, 0)
                return
        self._handle_or_resume(proc, tid, status, now)

    def _handle_or_resume(self, proc: TracedProcess, tid: int, status: int, now: int) -> None:
        """The engine's bookkeeping for a syscall or seccomp stop, then the resume."""
        if not self.engine.handle(tid, status, now):
            self._resume(proc, tid, 0)
        elif self._detaching:
            self._resume(proc, tid, 0)  # handled without a resume (P_NO_RESUME): detach it

    def _ensure_page(self, proc: TracedProcess, tid: int, fd: int) -> None:
        if self.engine.page(proc.pid, fd) is None:
            proc.open_page(self.engine, tid, fd)
            self._rip_check(proc)

    def _other_stop(self, proc: TracedProcess, tid: int, status: int, now: int) -> None:
        sig = (status >> 8) & 0xFF
        event = status >> 16
        if event == pt.PTRACE_EVENT_SECCOMP:
            info = self._info.fetch(tid)
            fd = kvm_run_fd(info)
            if fd is not None:
                self._ensure_page(proc, tid, fd)
            if self._has_job(proc) and self._inject(proc, tid, pt.PTRACE_CONT, info):
                return
            self._handle_or_resume(proc, tid, status, now)
        elif event == 0:
            self._resume(proc, tid, sig)  # signal-delivery-stop: pass the signal on, unchanged
        elif event == pt.PTRACE_EVENT_STOP:
            if tid in self._kicked and sig == signal.SIGTRAP:  # kvmtop's PTRACE_INTERRUPT
                self._count_kick(proc, tid)  # ...unless counted at its KVM_RUN's return
            self._kicked.discard(tid)  # the interrupt's own stop: what follows is not kvmtop's
            if sig in GROUP_STOP_SIGNALS and not self._detaching:
                # group-stop: stay stopped (until SIGCONT) but keep reporting to us
                pt.ptrace_unless_gone(pt.PTRACE_LISTEN, tid)
            else:
                self._resume(proc, tid, 0)  # PTRACE_INTERRUPT, or the end of a group-stop
        elif event in (pt.PTRACE_EVENT_CLONE, pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK):
            child = pt.ptrace_geteventmsg(tid)
            assert self._group is not None
            if child in self._group.early:
                self._group.early.discard(child)  # taken in at its own first stop already
            elif event == pt.PTRACE_EVENT_CLONE and tgid_of(child) in (proc.pid, -1):
                self.engine.add_thread(child, proc.pid)  # a thread (CLONE_THREAD)
            else:
                self._follow(child, proc.pid)
            self._resume(proc, tid, 0)
        elif event == pt.PTRACE_EVENT_EXEC:
            # A new program image: the old threads and vCPU fds are gone; the exec'ing thread
            # now has the leader's tid.
            for other in self.engine.threads_of(proc.pid):
                self.engine.remove_thread(other)
            proc.forget_pages(self.engine)
            self.engine.add_thread(proc.pid, proc.pid)
            assert self._group is not None
            self._group.execed(proc)
            self._resume(proc, proc.pid, 0)
        else:
            self._resume(proc, tid, 0)

    def _count_kick(self, proc: TracedProcess, tid: int) -> None:
        """At the first stop after kvmtop's own interrupt: if it ended the thread's KVM_RUN (the
        ioctl returned EINTR, as for a signal), KVM counted a signal exit for that vCPU that the
        VMM did not cause."""
        try:
            fd = interrupted_run_fd(pt.ptrace_getregs(tid))
        except pt.PtraceError:
            return
        if fd is not None:
            proc.count_kick(fd)

    def _follow(self, pid: int, ppid: int) -> TracedProcess | None:
        """A process a followed one started: traced like its parent from its first
        instruction (it starts stopped); one that never touches KVM costs no stops."""
        group = self._group
        if group is None or self.engine.thread(pid) is not None:
            return None  # taken in already: its first stop came before its parent's event
        proc = group.adopt(pid, ppid)
        if proc is not None:
            self.engine.add_process(pid, proc.mode)
            self._set_flags(proc)
            self.engine.add_thread(pid, pid)
        return proc

    @property
    def _detaching(self) -> bool:
        return self._group is not None and self._group.detaching is not None

    def _resume(self, proc: TracedProcess, tid: int, sig: int) -> None:
        if self._detaching:
            pt.ptrace_unless_gone(pt.PTRACE_DETACH, tid, sig)
            self.engine.remove_thread(tid)
            self._kicked.discard(tid)
            if not self.engine.threads_of(proc.pid):
                self._proc_ended(proc, None)
            return
        try:
            self.engine.resume(tid, sig)
        except OSError as exc:
            if exc.errno != errno_module.ESRCH:
                raise

    def _on_exit_or_stranger(self, tid: int, status: int, proc: TracedProcess | None) -> None:
        group = self._group
        if (status & 0xFF) == 0x7F:
            if tid in self._detached_children:
                return  # a launched command we no longer trace was stopped: not ours to handle
            # A new thread or process reporting before its parent's clone or fork event: only
            # kvmtop's tracees report to it, so it is one of the session's.
            owner = None
            if group is not None:
                tgid = tgid_of(tid)
                owner = group.procs.get(tgid)
                if owner is None and tgid == tid and group.launched:
                    owner = self._follow(tid, 0)
                elif owner is not None:
                    self.engine.add_thread(tid, owner.pid)
            if owner is not None:
                assert group is not None
                group.early.add(tid)
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
        self._kicked.discard(tid)
        if proc.mode != MODE_TWO_STOP:
            self.engine.close_runs(proc.pid, tid, time.monotonic_ns())
        if tid == proc.pid:  # the leader reports last: the whole process has ended
            self._proc_ended(proc, exit_status)
        elif self._detaching and not self.engine.threads_of(proc.pid):
            self._proc_ended(proc, None)

    def _proc_ended(self, proc: TracedProcess, exit_status: int | None) -> None:
        """``proc`` exited (``exit_status``) or is detached (None); the session ends with the
        last of its processes."""
        group = self._group
        if group is None or group.procs.get(proc.pid) is not proc:
            return
        if proc.check_job is not None:
            proc.check_job.settle("the VMM has gone, or the trace ended, before it answered")
            proc.check_job = None
            self._asking = False
        if proc.stats_job is not None:
            proc.stats_job.error = "no KVM counters: the VMM has gone"
            proc.stats_job.settle()
            proc.stats_job = None
            self._stats_proc = None
        if proc.mode != MODE_TWO_STOP:
            self.engine.close_runs(proc.pid, 0, time.monotonic_ns())
        self._flush()  # its exits, under its pages' numbers
        group.ended(proc, self.engine, exit_status)
        if not group.procs:
            self._finish(group)

    def _finish(self, group: Followed) -> None:
        if group.notifier is not None:
            # Every process under the filter has gone; the listener sees the hang-up and ends
            # by itself.
            group.notifier.wait(1.0)
        self._flush()
        why = group.detaching or "exited"
        root_gone = group.root_status is not None
        exit_status = group.root_status if group.detaching is None or root_gone else None
        detached = Detached(group.roots[0], why, time.monotonic_ns(), exit_status)
        if group.launched and not root_gone:
            self._detached_children.add(group.roots[0])
        self._group = None
        self.out.put(detached)
        for waiter in group.detach_waiters:
            if not waiter.done():
                waiter.set_result(detached)
        if self._quit_after_detach:
            self._quit = True

    def _flush(self) -> None:
        taken = self.engine.take()
        coalesced = self.engine.take_coalesced()
        group = self._group or self._last_group
        base = group.t0 if group is not None else 0
        key = group.slots.key if group is not None else (lambda _slot: None)
        vcpus = self._seen + [
            VcpuSeen(seen.vcpu, seen.tid, seen.t_ns, key(seen.vcpu))
            for seen in vcpu_records(taken.seen, base)
        ]
        if self.rip and self._group is not None:
            self._rip_sweep(self._group)
        processes = group.take_news() if group is not None else ()
        lost = taken.lost + self._lost
        stops = taken.stops + self._stops
        records = taken.records
        if records or vcpus or lost or stops or taken.notifications or processes or coalesced:
            self.out.put(ExitBatch(records, base, tuple(vcpus), lost, stops, processes, coalesced))
            self._seen = []
            self._lost = 0
            self._stops = 0

    # --- commands ------------------------------------------------------------------------------

    def _on_kicker(self, status: int) -> None:
        self._kicker.reported(status)
        self._flush()
        self._nudge_stats()
        for command, arg, future in self._pending_commands():
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
                elif command == "check":
                    self._start_check(future)
                elif command == "rip":
                    self.rip = True
                    future.set_result(None)
            except KvmtopError as exc:
                if command not in ("stats", "check"):  # the tracing goes on; only the asker
                    # needs to know
                    self.out.put(TracerFailed(str(exc), kind=type(exc).__name__))
                future.set_exception(exc)

    def _set_flags(self, proc: TracedProcess) -> None:
        """Tell the engine how to treat the process's stops now."""
        flags = 0
        if self._has_job(proc):
            flags |= P_HANDBACK | P_SYSCALLS
        if self._detaching:
            flags |= P_HANDBACK | P_NO_RESUME
        self.engine.set_process(proc.pid, proc.mode, flags)

    # --- KVM's own counters (kvmtop.trace.inject) -------------------------------------------------------

    def _first_proc(self) -> TracedProcess:
        """The session's first VMM (whose vCPU numbers are KVM's ids)."""
        group = self._group
        if group is None or group.detaching is not None:
            raise KvmtopError("not attached")
        proc = group.procs.get(group.slots.first_pid or group.roots[0])
        if proc is None:
            raise KvmtopError("the VM's process has gone")
        return proc

    def _start_stats(self, future: Future[StatsFds]) -> None:
        if self._stats_proc is not None:
            raise KvmtopError("KVM's counters are being fetched already")
        proc = self._first_proc()
        tids = self.engine.threads_of(proc.pid)
        proc.stats_job = plan_job(future, proc.pid, tids, proc.mode != MODE_TWO_STOP, proc.kicks)
        self._stats_proc = proc
        self._set_flags(proc)

    def _start_check(self, future: Future[dict[int, int]]) -> None:
        """KVM_CAP_SYNC_REGS asked on every VM fd of the session's first VMM, for the caller."""
        proc = self._first_proc()
        if proc.check_job is not None:
            raise KvmtopError("KVM_CAP_SYNC_REGS is being asked already")
        tid = own_filter(proc.pid, self.engine.threads_of(proc.pid), proc.mode != MODE_TWO_STOP)
        if tid is not None:
            raise KvmtopError(own_filter_message(proc.pid, tid, "it is not asked"))
        vms = vm_fds(proc.pid)
        if not vms:
            raise KvmtopError(f"pid {proc.pid} holds no VM fd")
        proc.check_job = CheckJob(vms, future=future)
        self._asking = True
        self._set_flags(proc)

    @staticmethod
    def _has_job(proc: TracedProcess) -> bool:
        return proc.stats_job is not None or proc.check_job is not None

    # --- guest RIPs (kvmtop.trace.sync_regs) ------------------------------------------------------

    def _rip_sweep(self, group: Followed) -> None:
        """With ``rip``, every FLUSH_INTERVAL_S: vCPUs new to kvmtop (also those the listener's
        thread found) get their kvm_valid_regs set once their VMM has said what KVM allows for
        their VM, which it is asked (KVM_CHECK_EXTENSION, kvmtop.trace.inject) where not yet."""
        for proc in list(group.procs.values()):
            self._rip_check(proc)

    def _rip_check(self, proc: TracedProcess) -> None:
        """``proc``'s vCPUs new to kvmtop: see :meth:`_rip_sweep`."""
        if not self.rip or self._detaching:
            return
        for note in proc.enable_rips(self.engine):
            self.out.put(TracerNote(note))
        if self._has_job(proc):
            return
        vms = proc.vms_to_check()
        if not vms:
            return
        tid = own_filter(proc.pid, self.engine.threads_of(proc.pid), proc.mode != MODE_TWO_STOP)
        if tid is not None:
            for vm in vms:
                proc.sync_allowed[vm] = NOT_ASKED
            self.out.put(TracerNote(own_filter_message(
                proc.pid, tid, "it is not asked KVM_CHECK_EXTENSION: no guest RIP")))  # fmt: skip
            return
        proc.check_job = CheckJob(vms)
        self._set_flags(proc)
        if proc.mode != MODE_TWO_STOP:
            # its threads may not stop by themselves for a long time (with user notification:
            # never), and a vCPU's first run may be waiting for the answer (_rip_wait)
            proc.check_job.nudged = True
            self._interrupt_for_job(proc)

    def _interrupt_for_job(self, proc: TracedProcess) -> None:
        """Interrupt the threads of ``proc`` that run no vCPU, so that one of them asks KVM
        at its next syscall entry; only where it has none, the vCPU threads too. A vCPU thread
        interrupted just as its KVM_RUN notification is answered would enter the run with the
        interrupt pending: a run that ends at once, with no exit of the guest's."""
        tids = self.engine.threads_of(proc.pid)
        runners = set(self._rip_waiting)
        for fd in list(proc.pages):
            owner = self.engine.page(proc.pid, fd)
            if owner is not None:
                runners.add(owner.tid)
        for tid in [t for t in tids if t not in runners] or tids:
            pt.ptrace_unless_gone(pt.PTRACE_INTERRUPT, tid)
            self._kicked.add(tid)

    def _rip_wait(self, proc: TracedProcess, tid: int) -> None:
        """The listener's thread has found a vCPU whose first KVM_RUN waits for its answer: with
        ``rip``, have its VMM asked now, and let the run go once it has answered (at most 1 s),
        so that the vCPU's first exit carries its RIP too."""
        if not self.rip:
            return
        self._rip_waiting.add(tid)
        try:
            self._kicker.kick()
            deadline = time.monotonic() + 1.0
            with self._rip_decided:
                while proc.vms_to_check() and time.monotonic() < deadline and self.alive:
                    self._rip_decided.wait(0.05)
        finally:
            self._rip_waiting.discard(tid)

    def _check_done(self, proc: TracedProcess, job: CheckJob) -> None:
        proc.check_job = None
        self._set_flags(proc)
        job.settle()
        if job.future is not None:
            self._asking = False
            return  # the caller's: nothing set here
        proc.sync_allowed.update(job.answers)
        for vm in job.todo:  # given up
            proc.sync_allowed[vm] = -errno_module.EINTR
        for note in proc.enable_rips(self.engine):
            self.out.put(TracerNote(note))
        with self._rip_decided:
            self._rip_decided.notify_all()

    def _nudge_stats(self) -> None:
        """A busy vCPU's next KVM_RUN entry comes at once, and so does some thread's syscall.
        If the job is not done after 0.2 s, the threads are interrupted: a blocking syscall
        restarts (its entry comes again); a KVM_RUN returns EINTR, as for any signal, which
        VMMs handle by running it again (an idle vCPU may not leave KVM_RUN for seconds)."""
        group = self._group
        for proc in list(group.procs.values()) if group is not None else ():
            job = proc.stats_job or proc.check_job
            if job is not None and not job.nudged and time.monotonic_ns() - job.asked_ns > 2e8:
                job.nudged = True
                self._interrupt(proc)

    def _interrupt(self, proc: TracedProcess) -> None:
        for tid in self.engine.threads_of(proc.pid):
            pt.ptrace_unless_gone(pt.PTRACE_INTERRUPT, tid)
            self._kicked.add(tid)

    def _inject(self, proc: TracedProcess, tid: int, resume: int, info: memoryview) -> bool:
        """Go on with the stats job on ``tid``, at a syscall entry (``info``: its
        PTRACE_GET_SYSCALL_INFO). False: nothing was done, the stop is handled as usual; True:
        handled (the stop that followed was dispatched)."""
        if self._detaching:
            return False
        run = None
        run_fd = kvm_run_fd(info)
        if run_fd is not None:
            self._ensure_page(proc, tid, run_fd)
            page = self.engine.page(proc.pid, run_fd)
            run = (page.vcpu, run_fd) if page is not None else None
        for job in (proc.stats_job, proc.check_job):  # a stats job waiting for a vCPU's run
            if job is None:  # does not hold up a check any thread can make
                continue
            try:
                status = run_job(job, tid, proc.pidfd, resume, run)
            except pt.PtraceError as exc:
                if exc.errno != errno_module.ESRCH:
                    raise
                return True  # killed meanwhile: its exit status follows
            if job.finished and isinstance(job, CheckJob):
                self._check_done(proc, job)
            elif job.finished:
                proc.stats_job = None
                self._stats_proc = None
                self._set_flags(proc)
                job.settle()
            if status is not None:
                self._dispatch(tid, status, time.monotonic_ns())
                return True
        return False

    # --- attach, launch, detach ---------------------------------------------------------------------

    def _quit_when_detached(self, future: Future[Any]) -> None:
        future.set_result(None)
        if self._group is None:
            self._quit = True
        else:
            self._quit_after_detach = True
            self._begin_detach("detached", None)

    def _begin_detach(self, why: str, future: Future[Detached] | None) -> None:
        group = self._group
        if group is None:
            if future is not None:
                future.set_exception(KvmtopError("not attached"))
            return
        if future is not None:
            group.detach_waiters.append(future)
        if group.mode != MODE_TWO_STOP:
            # Their filtered ioctls need kvmtop (ENOSYS without it): ending the trace ends the
            # command and what it started, gracefully; their exits are reported as usual.
            for pid in list(group.procs):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            return
        if group.detaching is not None:
            return  # already under way
        group.detaching = why
        for proc in list(group.procs.values()):
            self._set_flags(proc)
            self._interrupt(proc)
        for proc in list(group.procs.values()):
            if not self.engine.threads_of(proc.pid):
                self._proc_ended(proc, None)

    def _begin(self, group: Followed) -> None:
        self._flush()  # what is left of an earlier session goes out with its own base
        self._group = self._last_group = group
        self.engine.set_base(group.t0)

    def _check_idle(self) -> None:
        if self._group is not None:
            raise KvmtopError(f"already attached to pid {self._group.roots[0]}; detach first")

    def _attach(self, pids: tuple[int, ...]) -> Attached:
        self._check_idle()
        group = Followed(time.monotonic_ns(), launched=False, mode=MODE_TWO_STOP)
        self._begin(group)
        try:
            for pid in pids:
                group.roots.append(pid)
                proc = seize_process(pid, self.engine, group)
                self._kicked.update(self.engine.threads_of(pid))  # each was interrupted once
                self._seen += proc.open_known_vcpus(self.engine)
                self._rip_check(proc)
        except BaseException:
            group.roots = [root for root in group.roots if root in group.procs]
            if group.procs:  # let go of what was seized
                self._begin_detach("attach failed", None)
            else:
                self._group = None
            raise
        root = group.procs[pids[0]]
        attached = Attached(pids[0], root.argv, group.t0, launched=False, pids=tuple(pids))
        self.out.put(attached)
        self._flush()  # after: the session starts afresh at Attached, then gets its processes
        return attached

    def _launch(self, argv: list[str], seccomp: str = "") -> Attached:
        """Start ``argv`` traced from its first instruction: seized while it is stopped, then
        continued, it execs the command."""
        self._check_idle()
        group = launch_process(
            argv, seccomp, self.engine, self.child_stdio, self.child_stdout_to_stderr,
            self.child_stderr,
        )  # fmt: skip
        self._begin(group)
        if group.mode == MODE_NOTIFY:
            group.on_vcpu_found = self._rip_wait
            group.start_notifier(self.engine, self._kicker.kick, self._notify_failed)
        root = group.roots[0]
        os.kill(root, signal.SIGCONT)  # the launcher runs on, traced, and execs the command
        attached = Attached(
            root, tuple(argv), group.t0, launched=True,
            one_stop=group.mode in (MODE_ONE_STOP, MODE_NOTIFY),
            notify=group.mode == MODE_NOTIFY, filter_note=group.filter_note, pids=(root,),
        )  # fmt: skip
        self.out.put(attached)
        return attached

    def _notify_failed(self, message: str) -> None:
        self.out.put(TracerFailed(message, kind="KvmtopError"))


# --- choosing the engine ----------------------------------------------------------------------


ASKED_PTRACE = "ptrace was asked for (--engine ptrace or KVMTOP_ENGINE)"


def choose_engine(engine: str = "") -> tuple[str, str]:
    """("tracepoints" or "ptrace", why) for ``engine`` ("": ``$KVMTOP_ENGINE`` or auto):
    auto takes KVM's tracepoints where this process may open them. Raises the tracepoint
    engine's error when it is asked for by name and cannot run."""
    from kvmtop.trace.tp_engine import TracepointsUnavailable, unavailable_reason

    engine = engine or os.environ.get(ENGINE_ENV, "") or "auto"
    if engine not in ENGINES:
        raise KvmtopError(f"no such engine: {engine} (one of {', '.join(ENGINES)})")
    if engine == "ptrace":
        return "ptrace", ASKED_PTRACE
    why = unavailable_reason()
    if not why:
        return "tracepoints", ""
    if engine == "tracepoints":
        raise TracepointsUnavailable(f"kernel tracepoints unavailable: {why}")
    return "ptrace", why


def open_tracer(
    engine: str = "",
    with_data: bool = False,
    child_stdio: str | None = None,
    child_stdout_to_stderr: bool = False,
    child_stderr: str | None = None,
    rip: bool = False,
) -> tuple[Any, str, str]:
    """(a tracer, not started; how its exits are seen where not by ptrace; why not where
    auto fell back to ptrace). ``rip``: every exit's guest RIP."""
    from kvmtop.trace.tp_tracer import TracepointTracer

    chosen, why = choose_engine(engine)
    if chosen == "tracepoints":
        tracer = TracepointTracer(with_data, child_stdio, child_stdout_to_stderr, child_stderr,
                                  stats_taker=stats_once, rip=rip)  # fmt: skip
        return tracer, tracer.engine_note, ""
    tracer = Tracer(with_data, child_stdio, child_stdout_to_stderr, child_stderr, rip)
    return tracer, "", (f"ptrace, not kernel tracepoints: {why}" if why != ASKED_PTRACE else "")


def stats_once(pid: int) -> Future[StatsFds]:
    """KVM's stats fds of ``pid``, made by a ptrace tracer of its own that attaches for the
    moment it takes (the tracepoint engine has no ptrace to make them with)."""
    future: Future[StatsFds] = Future()

    def take() -> None:
        tracer = Tracer()
        tracer.start()
        try:
            tracer.attach(pid).result(10)
            asked = tracer.stats_fds()
            try:
                future.set_result(asked.result(10))
            except TimeoutError:
                close_when_answered(asked)
                raise
        except BaseException as exc:  # noqa: BLE001 - the asker gets it
            future.set_exception(exc)
        finally:
            try:
                tracer.detach().result(5)
            except BaseException:  # noqa: BLE001 - gone, or never attached
                pass
            tracer.stop()

    threading.Thread(target=take, name="kvmtop-stats-once", daemon=True).start()
    return future
