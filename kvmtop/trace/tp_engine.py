"""The tracepoint engine: every exit of the traced processes from KVM's own tracepoints, read
through perf_event_open (``kvmtop.native._tracepoints``), with no ptrace and no stop.

Per exit the kernel writes three events into a ring buffer of the CPU it ran on: the ioctl
syscall's entry (filtered in the kernel on ``cmd == KVM_RUN``), ``kvm:kvm_userspace_exit``
(reason, errno) as KVM_RUN returns, and the exit's details from ``kvm:kvm_pio`` or
``kvm:kvm_mmio`` (``kvm:kvm_hypercall``). The native engine reads the rings, puts their events in
time order and makes the records the ptrace engines make: the guest time of each run is
exit less entry, the VMM's handling the next entry less the exit, both exact and with no
tracing cost in them. An IN exit's port comes with its completion at the next entry (KVM
traces it there, with the value the VMM gave), as does a read's value. The events are system
wide (one set per CPU), so every VM's exits reach kvmtop's rings; the engine keeps those of
the processes it follows. They die with kvmtop's fds: nothing in tracefs is changed.

Where the kernel lets kvmtop load BPF programs (root, or CAP_BPF and CAP_PERFMON), each event
has one instead of perf samples: it copies the event's fields into one BPF ring buffer that all
CPUs share (the kernel formats no perf sample: its part of an exit's cost halves), and returns 1, so
any other tool's perf events on the same tracepoint get their samples as before. The CPUs'
perf rings then carry only the forks, exits and execs. The records, and so everything after
the reader, are the same either way.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from kvmtop import native
from kvmtop.abi.kvm import KVM_CREATE_VCPU, KVM_RUN
from kvmtop.errors import KvmtopError
from kvmtop.host.tracefs import event_format, tracefs_root, why_not

RING_PAGES = 512  # 2 MiB a CPU: ~60 ms of events at 100k exits/s before the reader must run
# role, event, fields in the engine's order, kernel filter
EventSpec = tuple[str, str, tuple[str, ...], str | None]
EVENTS: tuple[EventSpec, ...] = (
    ("R_UEXIT", "kvm/kvm_userspace_exit", ("reason", "errno"), None),
    (
        "R_RUN",
        "syscalls/sys_enter_ioctl",
        ("fd", "cmd", "arg"),
        f"cmd == {KVM_RUN:#x} || cmd == {KVM_CREATE_VCPU:#x}",
    ),
    # a vCPU's fd: KVM_CREATE_VCPU's return (> 0, as few other ioctls' are)
    ("R_SYSEXIT", "syscalls/sys_exit_ioctl", ("ret",), "ret > 0"),
    ("R_PIO", "kvm/kvm_pio", ("rw", "port", "size", "count", "val"), None),
    ("R_MMIO", "kvm/kvm_mmio", ("type", "len", "gpa", "val"), None),
    ("R_HYPERCALL", "kvm/kvm_hypercall", ("nr",), None),
    # every hardware exit, by reason (counted per vCPU); the guest ran on after a write before
    # it, so that write did not exit (KVM handled it in the kernel); fires
    # on VMX and SVM hosts, not where KVM emulates without it (kvm_emulate_insn would tell
    # too, but fires for every emulated instruction: a real-mode guest runs 2x slower)
    ("R_KEXIT", "kvm/kvm_exit", ("exit_reason", "isa", "guest_rip"), None),
)
# with --rip: each instruction KVM emulates (this host emulates the instruction of every exit to
# the VMM; a real-mode guest has every instruction emulated, so this costs it most); kvm_exit's
# guest_rip gives the others (VMX, SVM)
RIP_EVENTS: tuple[EventSpec, ...] = (
    ("R_EMUL", "kvm/kvm_emulate_insn", ("rip", "csbase", "len", "flags", "failed"), None),
)
# how the events reach kvmtop: "bpf" (a program per event writes it into one BPF ring buffer:
# the kernel formats no perf sample, half its part of the cost), "perf" (perf samples in a ring
# per CPU), or unset: BPF where the kernel lets kvmtop load programs (root, or CAP_BPF with
# CAP_PERFMON), else perf
DELIVERY_ENV = "KVMTOP_TP_DELIVERY"
DELIVERIES = {"bpf": "BPF", "perf": "perf samples"}
REQUIRED = ("kvm/kvm_userspace_exit", "syscalls/sys_enter_ioctl", "syscalls/sys_exit_ioctl")
ENGINE_NOTE = "kernel tracepoints ({}): no stop per exit"


class TaskNews(NamedTuple):
    """A process the engine follows forked (``what`` "fork": ``pid`` is the child), ran a new
    program ("exec": ``comm`` is its name), or one of its threads ended ("exit")."""

    what: str
    pid: int
    ppid: int
    tid: int
    t_ns: int
    comm: str


class TpTaken(NamedTuple):
    """What :meth:`TracepointEngine.take` hands over since the last take."""

    records: bytes  # EXIT records and their parts, as the ptrace engines make them
    seen: bytes  # VCPU records: a vCPU seen running on a thread new to it
    exits: int
    lost: int  # exits of a vCPU that could not be named
    news: tuple[TaskNews, ...]
    no_exit: bytes  # COALESCED records (C_KERNEL) and HARDWARE records


class UnknownVcpu(NamedTuple):
    """A KVM_RUN on a (process, fd) the engine cannot number yet: ``vm`` and ``vcpu`` from its
    KVM_CREATE_VCPU where the engine saw it, else -1."""

    pid: int
    tid: int
    fd: int
    vm: int
    vcpu: int


class TracepointEngine:
    """The native reader (``kvmtop.native._tracepoints.Rings``) with named types at its
    boundary. Only the tracer's thread calls it."""

    def __init__(self, rings: Any, delivery: str = "perf") -> None:
        self._rings = rings
        self.note = ENGINE_NOTE.format(DELIVERIES[delivery])  # delivery: "bpf" or "perf"

        self.follow, self.unfollow = rings.follow, rings.unfollow
        self.follow_all, self.follow_children = rings.follow_all, rings.follow_children
        self.set_vcpu, self.forget_pid, self.set_base = (
            rings.set_vcpu,
            rings.forget_pid,
            rings.set_base,
        )
        self.lost_events, self.close = rings.lost_events, rings.close

    def run(self, deadline_ns: int, max_bytes: int, wake_fd: int) -> UnknownVcpu | None:
        """Read the rings until the deadline, ``max_bytes`` of records, ``wake_fd`` readable,
        or a vCPU to name (None: one of the others)."""
        got = self._rings.run(deadline_ns, max_bytes, wake_fd)
        return None if got is None else UnknownVcpu(*got[1:])

    def flush(self) -> UnknownVcpu | None:
        """Every event read, whatever its time (the session ends)."""
        got = self._rings.flush()
        return None if got is None else UnknownVcpu(*got[1:])

    def want_rip(self) -> None:
        """Every exit's guest RIP from now on, where the kernel tells it (:data:`RIP_EVENTS`)."""
        module = native.built("_tracepoints")
        assert module is not None
        try:
            self._rings.add_events(opened_events(module, RIP_EVENTS), True)
        except OSError as exc:
            raise _open_failed(exc) from None

    def take(self) -> TpTaken:
        records, seen, exits, lost, news, no_exit = self._rings.take()
        return TpTaken(records, seen, exits, lost, tuple(TaskNews(*n) for n in news), no_exit)


class TracepointsUnavailable(KvmtopError):
    """The tracepoint engine was asked for and this host or process cannot give it."""


def online_cpus() -> list[int]:
    """The CPUs the kernel may run a vCPU thread on (each has its own ring)."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return sorted(os.sched_getaffinity(0))
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def unavailable_reason() -> str:
    """Why the tracepoint engine cannot run here ("": it can)."""
    if native.built("_tracepoints") is None:
        return "kvmtop.native._tracepoints is not built"
    why = why_not()
    if why:
        return why
    root = tracefs_root()
    assert root is not None
    for event in REQUIRED:
        if event_format(root, event) is None:
            return f"this kernel has no {event} tracepoint"
    return ""


def hardware_note() -> str:
    """Said once where kvm:kvm_exit does not fire ("": where it does, with VMX or SVM)."""
    modules = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm_"))
    if {"kvm_intel", "kvm_amd"} & set(modules):
        return ""
    which = ", ".join(modules) or "no vendor module"
    return f"kvm:kvm_exit does not fire with {which}: KVM's own exits are in its counters (k)"


def open_engine(with_data: bool, pages: int = RING_PAGES, rip: bool = False) -> TracepointEngine:
    """The rings of every online CPU, each with the events above that this kernel has (and
    those of ``rip``: :data:`RIP_EVENTS`)."""
    why = unavailable_reason()
    if why:
        raise TracepointsUnavailable(f"kernel tracepoints unavailable: {why}")
    module = native.built("_tracepoints")
    assert module is not None
    events = opened_events(module, EVENTS + (RIP_EVENTS if rip else ()))
    cpus = online_cpus()
    delivery = os.environ.get(DELIVERY_ENV, "")
    if delivery not in ("", "bpf", "perf"):
        raise TracepointsUnavailable(f"{DELIVERY_ENV} is bpf or perf, not {delivery!r}")
    if delivery != "perf":
        try:
            return TracepointEngine(
                module.Rings(cpus, events, pages, with_data, rip, bpf=True), "bpf"
            )
        except OSError as exc:
            if delivery == "bpf":
                raise TracepointsUnavailable(
                    f"kernel tracepoints through BPF unavailable: {exc}"
                ) from None
    try:
        return TracepointEngine(module.Rings(cpus, events, pages, with_data, rip))
    except OSError as exc:
        raise _open_failed(exc) from None


def opened_events(
    module: Any, wanted_events: tuple[EventSpec, ...]
) -> list[tuple[int, int, str | None, tuple[tuple[int, int, bool], ...]]]:
    """The Rings' events: (role, the kernel's id, filter, field layout) of each event this
    kernel has."""
    root = tracefs_root()
    assert root is not None
    events = []
    for role, name, wanted, kernel_filter in wanted_events:
        found = event_format(root, name)
        if found is None:
            continue
        event_id, fields = found
        if any(field not in fields for field in wanted):
            raise TracepointsUnavailable(f"kernel tracepoints unavailable: {name} has other fields")
        layout = tuple((fields[f].offset, fields[f].size, fields[f].signed) for f in wanted)
        events.append((getattr(module, role), event_id, kernel_filter, layout))
    return events


def _open_failed(exc: OSError) -> TracepointsUnavailable:
    return TracepointsUnavailable(
        f"kernel tracepoints unavailable: perf_event_open: {exc.strerror or exc}"
    )
