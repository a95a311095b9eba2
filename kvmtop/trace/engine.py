"""The engine interface: what the tracer thread asks of an engine, and what it gets back.

An engine holds the hot state of tracing and does the per-exit work: it sees exits, reads each
one's ``struct kvm_run`` and appends packed records in the recording's layout
(:mod:`kvmtop.abi.record_layout`), which the tracer takes in batches. Where its exits come from
is the engine's business, so the interface comes in parts, as kvm_stat's providers do:

- :class:`Engine`, what every engine gives: the records and counters out (:meth:`~Engine.take`),
  and the processes and vCPUs it watches, told and forgotten by the tracer (a vCPU is a
  process's fd and the mapping of its ``kvm_run``). An engine fed by KVM's tracepoints (ring
  buffers, no ptrace, no stops) would be an :class:`Engine` and nothing more; a per-exit guest
  RIP would be one more record part in :attr:`Taken.records`, not a new method.
- :class:`StopEngine`, an engine fed by ptrace stops: it waits for them, handles the common
  ones, resumes, and hands every other stop back (:class:`Stop`); it keeps the traced threads.
- :class:`NotifyEngine`, an engine fed by seccomp user notifications (a launched command's
  KVM_RUNs), from the listener's own thread.

:class:`PtraceEngine` is all three: the C engine (``kvmtop.native._hotloop``, named at the
boundary by :mod:`kvmtop.trace.native_engine`) and its pure-Python reference
(:class:`kvmtop.trace.py_engine.PyEngine`); :func:`kvmtop.trace.native_engine.make_engine`
picks one. Only the tracer thread calls the stop methods; the listener's thread only the
notification methods.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from kvmtop.abi.record_layout import RECORD_SIZE, VCPU_HEAD

MODE_TWO_STOP = 0  # PTRACE_SYSCALL: KVM_RUN's entry and exit stops
MODE_ONE_STOP = 1  # seccomp RET_TRACE on KVM_RUN: one stop, at its entry
MODE_NOTIFY = 2  # seccomp user notification: no ptrace stop per exit
# Process flags (set_process)
P_HANDBACK = 1  # run() hands every stop of the process to the tracer
P_SYSCALLS = 2  # resume its threads with PTRACE_SYSCALL (every syscall entry stops)
P_NO_RESUME = 4  # handle() records but does not resume: the tracer does (a detach)
ENGINES = ("auto", "tracepoints", "ptrace")  # --engine
ENGINE_ENV = "KVMTOP_ENGINE"  # the default of --engine (else auto)
SYSCALL_BUDGET = 256  # non-KVM syscalls a thread may make before it is resumed with PTRACE_CONT


class Taken(NamedTuple):
    """What :meth:`Engine.take` hands over (and forgets) since the last take."""

    records: bytes  # EXIT records, each with its LONG, DATA and HELD parts
    seen: bytes  # VCPU records (VCPU_HEAD): a vCPU seen running on a thread new to it
    stops: int  # ptrace stops handled
    notifications: int  # seccomp notifications answered
    lost: int  # exits seen but not decoded (kvm_run unreadable); must stay 0
    exits: int  # EXIT records in ``records``


class PageOwner(NamedTuple):
    """A vCPU page the engine knows (:meth:`Engine.page`)."""

    vcpu: int  # the number its records carry (-1: a vCPU whose kvm_run cannot be read)
    tid: int  # the thread last seen running it (0: none yet)


class Stop(NamedTuple):
    """A stop (or exit) the engine hands back to the tracer (:meth:`StopEngine.run`)."""

    tid: int
    status: int  # as waitpid() gives it
    now_ns: int  # when it was seen (time.monotonic_ns())


class ThreadState(NamedTuple):
    """A traced thread as the engine keeps it (:meth:`StopEngine.thread`)."""

    pid: int  # its process
    runner: bool  # has run KVM_RUN or created a vCPU: always syscall-traced
    budget: int  # non-KVM syscalls left before it is resumed with PTRACE_CONT
    creating: bool  # in KVM_CREATE_VCPU: its return gives the new fd
    in_run: bool  # inside KVM_RUN


class Notified(NamedTuple):
    """Why :meth:`NotifyEngine.notify_run` returned: ``"wake"`` (the wake fd), ``"hangup"`` (the
    listener has gone), ``"full"`` (records to take), or ``"unknown"``: a notification of a
    thread or vCPU fd the engine does not know, held until :meth:`~NotifyEngine.notify_continue`
    (``tid``, ``fd`` and ``is_run``: whether it is a KVM_RUN)."""

    why: str
    tid: int = 0
    fd: int = 0
    is_run: bool = False


class VcpuThread(NamedTuple):
    """A VCPU record of :attr:`Taken.seen`: vCPU ``vcpu`` ran on thread ``tid`` at ``t_ns``."""

    vcpu: int
    tid: int
    t_ns: int  # absolute (monotonic ns)


class Engine(Protocol):
    """What every engine gives: records and counters out, and the processes and vCPUs it
    watches (told by the tracer, which decides)."""

    native: bool  # the C engine (else a Python one)

    def take(self) -> Taken: ...
    def take_coalesced(self) -> bytes:
        """COALESCED records (:mod:`kvmtop.model.coalesced`) since the last take."""
        ...

    def pending(self) -> int:
        """Non-zero when there is anything to take."""
        ...

    def set_base(self, base_ns: int) -> None: ...
    def add_process(self, pid: int, mode: int) -> None: ...
    def set_process(self, pid: int, mode: int, flags: int) -> None: ...
    def remove_process(self, pid: int) -> None: ...
    def add_page(
        self, pid: int, fd: int, vcpu: int, tid: int, mapping: Any, remote_address: int
    ) -> None:
        """vCPU fd ``fd`` of ``pid`` is vCPU ``vcpu`` (its records' number): its ``kvm_run`` is
        ``mapping`` (a buffer), else read at ``remote_address`` in the VMM, else (0) unreadable."""
        ...

    def remove_page(self, pid: int, fd: int) -> bool: ...
    def page(self, pid: int, fd: int) -> PageOwner | None: ...
    def add_ring(self, pid: int, fd: int, vm: int, mapping: Any) -> None:
        """The coalesced MMIO ring of VM ``vm``, mapped through vCPU ``fd`` (None: unreadable)."""
        ...

    def close_runs(self, pid: int, tid: int, now: int) -> None:
        """Thread ``tid`` (0: every thread of ``pid``) has ended: its last run's exit is final."""
        ...


class StopEngine(Engine, Protocol):
    """An engine fed by ptrace stops. Only the tracer thread calls these."""

    def run(self, deadline_ns: int, max_bytes: int) -> Stop | None:
        """Wait for stops and handle the common ones until one must be handed back (a
        :class:`Stop`), or until the deadline or ``max_bytes`` of records (None)."""
        ...

    def handle(self, tid: int, status: int, now: int) -> bool:
        """The engine's part of a stop handed back: False if it is not one of its own."""
        ...

    def resume(self, tid: int, sig: int) -> None: ...
    def add_thread(self, tid: int, pid: int) -> bool: ...
    def remove_thread(self, tid: int) -> bool: ...
    def thread(self, tid: int) -> ThreadState | None: ...
    def set_thread(self, tid: int, runner: bool, creating: bool) -> bool: ...
    def threads_of(self, pid: int) -> list[int]: ...


class NotifyEngine(Engine, Protocol):
    """An engine fed by seccomp user notifications. Only the listener's thread calls these."""

    def notify_run(self, listener: int, wake: int, max_bytes: int) -> Notified: ...
    def notify_continue(self, listener: int) -> None:
        """Answer the notification :meth:`notify_run` held (``"unknown"``), now that the
        tracer has told the engine of its thread or vCPU."""
        ...


class PtraceEngine(StopEngine, NotifyEngine, Protocol):
    """The engine of a ptrace session: the C engine, or its Python reference."""

    def set_rip(self, pid: int, fd: int, on: bool) -> bool:
        """The tracer has set the vCPU's ``kvm_valid_regs`` (``on``): the exits of its runs
        begun from now on carry a RIP part (:data:`kvmtop.abi.record_layout.RIP`), or it is
        about to restore the field: none from now. False: no such vCPU."""
        ...


def vcpu_records(seen: bytes, base_ns: int) -> list[VcpuThread]:
    """The VCPU records of :attr:`Taken.seen`, with absolute times."""
    out = []
    for i in range(0, len(seen), RECORD_SIZE):
        _kind, vcpu, tid, t = VCPU_HEAD.unpack_from(seen, i)
        out.append(VcpuThread(vcpu, tid, base_ns + t))
    return out
