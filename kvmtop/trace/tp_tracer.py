"""The tracer of the tracepoint engine (:mod:`kvmtop.trace.tp_engine`): the same commands and
messages as the ptrace tracer (:class:`kvmtop.tracer_thread.Tracer`), with no ptrace at all.

Its thread reads the rings and decides: which processes it follows (those attached to; a
launched command and every process it starts, from the kernel's fork records), which vCPU a
(process, fd) is (from the engine's sight of its KVM_CREATE_VCPU, else the process's fd table),
and when the session ends. Nothing is written into any VMM and nothing is left to undo: a detach
stops reading. A launched command is kvmtop's child, so its exit status is kvmtop's to take.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kvmtop.decoder import vcpu_id_of_fd_link
from kvmtop.errors import KvmtopError, NoSuchProcess
from kvmtop.host.procfs import check_attachable, cmdline, fd_table
from kvmtop.host.spawn import spawn_stopped
from kvmtop.host.vcpu_maps import vcpu_fds, vm_of_vcpu_fd
from kvmtop.model.events import ProcessSeen, VcpuSeen
from kvmtop.model.messages import (
    Attached,
    Detached,
    ExitBatch,
    StatsFds,
    TracerEnded,
    TracerFailed,
    TracerMessage,
    TracerNote,
)
from kvmtop.model.vcpu_keys import VcpuKey, VcpuSlots
from kvmtop.trace.commanded import Commanded
from kvmtop.trace.engine import vcpu_records
from kvmtop.trace.tp_engine import (
    TaskNews,
    TracepointsUnavailable,
    UnknownVcpu,
    hardware_note,
    online_cpus,
    open_engine,
)

BATCH_BYTES = 4096 * 32
FLUSH_INTERVAL_NS = 100_000_000
SLOT_UNNAMED = -1

StatsTaker = Callable[[int], "Future[StatsFds]"]


class _Session:
    def __init__(self, t0: int, launched: bool) -> None:
        self.t0 = t0
        self.launched = launched
        self.roots: list[int] = []
        self.procs: dict[int, tuple[str, ...]] = {}  # pid -> argv
        self.pidfds: dict[int, int] = {}  # the processes attached to: their end
        self.slots = VcpuSlots()
        self.news: list[ProcessSeen] = []
        self.root_status: int | None = None


class TracepointTracer(Commanded):
    """Owns the thread that reads KVM's tracepoints. One session at a time; ``all_vms``: every
    VMM on the host at once (``-a``)."""

    def __init__(
        self,
        with_data: bool = False,
        child_stdio: str | None = None,
        child_stdout_to_stderr: bool = False,
        child_stderr: str | None = None,
        stats_taker: StatsTaker | None = None,
        rip: bool = False,
    ) -> None:
        self.out: queue.SimpleQueue[TracerMessage] = queue.SimpleQueue()
        self.with_data = with_data
        self.child_stdio = child_stdio
        self.child_stdout_to_stderr = child_stdout_to_stderr
        self.child_stderr = child_stderr
        self._stats_taker = stats_taker
        self.rip = rip  # every exit's guest RIP, where the kernel tells it (RIP_EVENTS, kvm_exit)
        self._rings = open_engine(with_data, rip=rip)
        self.engine_note = self._rings.note
        self.hardware_note = hardware_note()
        self._cpus = online_cpus()  # the rings' CPUs, in their order
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="kvmtop-tracepoints", daemon=True)
        self._session: _Session | None = None
        self._last: _Session | None = None
        self._seen: list[VcpuSeen] = []
        self._children: set[int] = set()  # launched, no longer followed, not yet reaped
        self._quit = False
        self._dropped: tuple[int, ...] = ()  # the rings' dropped events, per CPU, so far

    # --- the API other threads call ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def attach(self, *pids: int) -> Future[Attached]:
        return self._send("attach", pids)

    def attach_all(self) -> Future[Attached]:
        """Every VMM on the host, those that start later too."""
        return self._send("attach", ())

    def launch(self, argv: list[str], seccomp: str = "") -> Future[Attached]:
        """Start ``argv``, followed with every process it starts (``seccomp`` is for ptrace:
        this engine needs no filter)."""
        return self._send("launch", list(argv))

    def detach(self) -> Future[Detached]:
        return self._send("detach", None)

    def stats_fds(self) -> Future[StatsFds]:
        session = self._session
        if session is None or not session.roots:
            future: Future[StatsFds] = Future()
            future.set_exception(KvmtopError("not attached"))
            return future
        if self._stats_taker is None:
            future = Future()
            future.set_exception(KvmtopError("KVM's counters cannot be taken here"))
            return future
        return self._stats_taker(session.slots.first_pid or session.roots[0])

    def want_rip(self) -> Future[None]:
        """From now on, every exit's guest RIP where the kernel tells it (nothing is written
        into the VMM: the kernel traces the instructions it emulates)."""
        return self._send("rip", None)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # woken already

    # --- the thread ------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - report; the events die with the fds
            self.out.put(TracerFailed(f"tracer failed: {exc!r}", kind="KvmtopError"))
        finally:
            # the kernel takes ~0.25 s to tear the events down: not in the way of the summary
            threading.Thread(target=self._rings.close, name="kvmtop-tp-close", daemon=True).start()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.out.put(TracerEnded())

    def _loop(self) -> None:
        rings = self._rings
        while not self._quit:
            got = rings.run(time.monotonic_ns() + FLUSH_INTERVAL_NS, BATCH_BYTES, self._wake_r)
            if got is not None:
                self._name_vcpu(got)
                continue
            self._commands_waiting()
            self._reap_children()
            self._flush()
            self._check_ended()

    def _commands_waiting(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        for command, arg, future in self._pending_commands():
            try:
                if command == "attach":
                    future.set_result(self._attach(arg))
                elif command == "launch":
                    future.set_result(self._launch(arg))
                elif command == "detach":
                    future.set_result(self._end("detached"))
                elif command == "rip":
                    self._want_rip(future)
                elif command == "quit":
                    future.set_result(None)
                    if self._session is not None:
                        self._end("detached")
                    self._quit = True
            except KvmtopError as exc:
                self.out.put(TracerFailed(str(exc), kind=type(exc).__name__))
                future.set_exception(exc)

    def _want_rip(self, future: Future[None]) -> None:
        """RIPs from now on; where the kernel refuses the event, the tracing goes on without
        them and says why."""
        try:
            if not self.rip:
                self._rings.want_rip()
                self.rip = True
        except TracepointsUnavailable as exc:
            self.out.put(TracerNote(f"no guest RIPs: {exc}"))
            future.set_exception(exc)
            return
        future.set_result(None)

    def _name_vcpu(self, unknown: UnknownVcpu) -> None:
        """A KVM_RUN on fd ``fd`` of ``pid`` the engine could not number: its KVM_CREATE_VCPU
        (``vm``, ``vcpu``; -1 where the engine did not see it) or the fd table names it."""
        pid, fd, vm, vcpu = unknown.pid, unknown.fd, unknown.vm, unknown.vcpu
        session = self._session or self._last
        slot = SLOT_UNNAMED
        if vcpu < 0:
            try:
                table = fd_table(pid)
                found = vcpu_id_of_fd_link(table.get(fd, ""))
            except OSError:
                found = None
            if found is not None:
                vm, vcpu = vm_of_vcpu_fd(table, fd), found
        if vcpu >= 0 and session is not None:
            key = VcpuKey(pid, vm, vcpu)
            slot = session.slots.slot(key)
            self._seen.append(VcpuSeen(slot, 0, time.monotonic_ns(), key))
        self._rings.set_vcpu(pid, fd, slot)

    def _flush(self) -> None:
        taken = self._rings.take()
        records, seen, lost, kernel = taken.records, taken.seen, taken.lost, taken.no_exit
        session = self._session or self._last
        base = session.t0 if session is not None else 0
        key = session.slots.key if session is not None else (lambda _slot: None)
        vcpus = self._seen + [
            VcpuSeen(s.vcpu, s.tid, s.t_ns, key(s.vcpu)) for s in vcpu_records(seen, base)
        ]
        processes: tuple[ProcessSeen, ...] = ()
        if session is not None:
            for news in taken.news:
                self._news(session, news)
            processes, session.news = tuple(session.news), []
        totals = self._rings.lost_events()
        before = self._dropped or (0,) * len(totals)
        dropped = tuple((cpu, n - old) for cpu, n, old in zip(self._cpus, totals, before, strict=True)
                        if n > old)  # fmt: skip
        self._dropped = totals
        if records or vcpus or lost or processes or kernel or dropped:
            self.out.put(ExitBatch(records, base, tuple(vcpus), lost, 0, processes, kernel,
                                   dropped))  # fmt: skip
            self._seen = []

    def _news(self, session: _Session, news: TaskNews) -> None:
        what, pid, ppid, t = news.what, news.pid, news.ppid, news.t_ns
        if what == "fork":
            session.procs[pid] = cmdline(pid) if _alive(pid) else session.procs.get(ppid, ())
            session.news.append(ProcessSeen(pid, ppid, session.procs[pid], t))
        elif what == "exec" and pid in session.procs:
            session.procs[pid] = cmdline(pid) if _alive(pid) else (news.comm,)
            session.news.append(ProcessSeen(pid, 0, session.procs[pid], t))
        elif what == "exit" and news.tid == pid and pid in session.procs:
            status = self._reap(pid) if session.launched and pid == session.roots[0] else None
            if status is not None:
                session.root_status = status
            del session.procs[pid]
            self._rings.forget_pid(pid)
            self._rings.unfollow(pid)
            session.news.append(ProcessSeen(pid, 0, (), t, True, status))

    def _reap(self, pid: int) -> int | None:
        """The exit status of kvmtop's own child ``pid``, which is exiting."""
        for _ in range(2000):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if done:
                return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else (
                    128 + os.WTERMSIG(status))  # fmt: skip
            time.sleep(0.001)
        self._children.add(pid)
        return None

    def _reap_children(self) -> None:
        for pid in list(self._children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self._children.discard(pid)
                continue
            if done:
                self._children.discard(pid)
                code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
                self.out.put(Detached(pid, "exited", time.monotonic_ns(), code))

    def _check_ended(self) -> None:
        """An attached VMM can end with no fork record of ours to say so: its pidfd does."""
        session = self._session
        if session is None:
            return
        gone = [pid for pid in session.pidfds if pid in session.procs and not _alive(pid)]
        if gone:  # its last events may wait in the rings, and its exit record: read them all
            self._read_all()
            self._flush()
        for pid, pidfd in list(session.pidfds.items()):
            if pid in gone and pid in session.procs:  # (no exit record of its leader seen)
                del session.procs[pid]
                self._rings.unfollow(pid)
                session.news.append(ProcessSeen(pid, 0, (), time.monotonic_ns(), True, None))
            if pid not in session.procs:
                os.close(pidfd)
                del session.pidfds[pid]
        if session.roots and not session.procs:
            self._end("exited")

    def _read_all(self) -> None:
        """Every event in the rings, whatever its time, naming the vCPUs first seen in them."""
        got = self._rings.flush()
        while got is not None:
            self._name_vcpu(got)
            got = self._rings.flush()

    # --- commands ----------------------------------------------------------------------------

    def _begin(self, session: _Session) -> None:
        if self._session is not None:
            raise KvmtopError(f"already attached to pid {self._session.roots[0]}; detach first")
        self._flush()
        self._session = self._last = session
        self._rings.set_base(session.t0)

    def _attach(self, pids: tuple[int, ...]) -> Attached:
        argvs = [check_attachable(pid) for pid in pids]
        session = _Session(time.monotonic_ns(), launched=False)
        self._begin(session)
        if not pids:
            self._rings.follow_all(True)
        for pid, argv in zip(pids, argvs, strict=True):
            try:
                session.pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                self._session = None
                raise NoSuchProcess(f"no such process: {pid}") from None
            session.roots.append(pid)
            session.procs[pid] = argv
            self._rings.follow(pid)
            session.news.append(ProcessSeen(pid, 0, argv, session.t0))
            self._name_known_vcpus(pid)
        root = pids[0] if pids else 0
        attached = Attached(root, session.procs.get(root, ("every VMM on the host",)),
                            session.t0, launched=False, pids=tuple(pids),
                            engine_note=self.engine_note)  # fmt: skip
        self.out.put(attached)
        self._flush()
        return attached

    def _name_known_vcpus(self, pid: int) -> None:
        try:
            fds = vcpu_fds(pid)
            table = fd_table(pid)
        except OSError:
            return
        session = self._session
        assert session is not None
        for fd, vcpu in sorted(fds.items()):
            key = VcpuKey(pid, vm_of_vcpu_fd(table, fd), vcpu)
            slot = session.slots.slot(key)
            self._rings.set_vcpu(pid, fd, slot)
            self._seen.append(VcpuSeen(slot, 0, time.monotonic_ns(), key))

    def _launch(self, argv: list[str]) -> Attached:
        if self._session is not None:
            raise KvmtopError(f"already attached to pid {self._session.roots[0]}; detach first")
        spawned = spawn_stopped(argv, "", self.child_stdio, self.child_stdout_to_stderr,
                                self.child_stderr)  # fmt: skip
        session = _Session(time.monotonic_ns(), launched=True)
        self._begin(session)
        root = spawned.pid
        session.roots.append(root)
        session.procs[root] = tuple(argv)
        session.news.append(ProcessSeen(root, os.getpid(), tuple(argv), session.t0))
        self._rings.follow_children(True)
        self._rings.follow(root)
        os.kill(root, signal.SIGCONT)  # the launcher runs on and execs the command
        attached = Attached(root, tuple(argv), session.t0, launched=True, pids=(root,),
                            engine_note=self.engine_note)  # fmt: skip
        self.out.put(attached)
        return attached

    def _end(self, why: str) -> Detached:
        session = self._session
        if session is None:
            raise KvmtopError("not attached")
        self._read_all()
        self._flush()
        for pid in list(session.procs):
            self._rings.unfollow(pid)
            self._rings.forget_pid(pid)
        self._rings.follow_all(False)
        self._rings.follow_children(False)
        for pidfd in session.pidfds.values():
            os.close(pidfd)
        session.pidfds.clear()
        root = session.roots[0] if session.roots else 0
        root_gone = root not in session.procs
        if session.launched and not root_gone:
            self._children.add(root)
        status = session.root_status if why == "exited" or root_gone else None
        self._session = None
        detached = Detached(root, why, time.monotonic_ns(), status)
        self.out.put(detached)
        return detached


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
