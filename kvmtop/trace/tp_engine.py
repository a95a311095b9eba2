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
"""

from __future__ import annotations

import os
from typing import Any

from kvmtop import native
from kvmtop.abi.kvm import KVM_CREATE_VCPU, KVM_RUN
from kvmtop.errors import KvmtopError
from kvmtop.host.tracefs import event_format, tracefs_root, why_not

RING_PAGES = 512  # 2 MiB a CPU: ~60 ms of events at 100k exits/s before the reader must run
# role, event, fields in the engine's order, kernel filter
EVENTS: tuple[tuple[str, str, tuple[str, ...], str | None], ...] = (
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
REQUIRED = ("kvm/kvm_userspace_exit", "syscalls/sys_enter_ioctl", "syscalls/sys_exit_ioctl")
ENGINE_NOTE = "kernel tracepoints: no stop per exit"


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


def open_rings(with_data: bool, pages: int = RING_PAGES) -> Any:
    """The rings of every online CPU, each with the events above that this kernel has."""
    why = unavailable_reason()
    if why:
        raise TracepointsUnavailable(f"kernel tracepoints unavailable: {why}")
    module = native.built("_tracepoints")
    root = tracefs_root()
    assert module is not None and root is not None
    events = []
    for role, name, wanted, kernel_filter in EVENTS:
        found = event_format(root, name)
        if found is None:
            continue
        event_id, fields = found
        if any(field not in fields for field in wanted):
            raise TracepointsUnavailable(f"kernel tracepoints unavailable: {name} has other fields")
        layout = tuple((fields[f].offset, fields[f].size, fields[f].signed) for f in wanted)
        events.append((getattr(module, role), event_id, kernel_filter, layout))
    try:
        return module.Rings(online_cpus(), events, pages, with_data)  # in this order
    except OSError as exc:
        raise TracepointsUnavailable(
            f"kernel tracepoints unavailable: perf_event_open: {exc.strerror or exc}"
        ) from None
