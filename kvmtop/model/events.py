"""What the tracer sees: an exit, a vCPU found, a process followed. ``ExitEvent.flags`` are
:mod:`kvmtop.abi.record_layout`'s ``EXIT_*``. Batches of them, and the tracer's other messages,
are :mod:`kvmtop.model.messages`'.

Everything here is a frozen value: the tracer thread builds it, any thread may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtop.model.vcpu_keys import VcpuKey


@dataclass(frozen=True, slots=True)
class GuestRip:
    """Where the guest was at an exit (``--rip``): its RIP, that RIP's linear address (cs.base
    added outside 64-bit code) and its privilege level (-1: not known, the segment registers
    were not synced)."""

    rip: int
    linear: int
    cpl: int = -1


@dataclass(frozen=True, slots=True)
class ExitEvent:
    """One return of KVM_RUN on one vCPU.

    ``a`` and ``b`` carry the details of the exit's kind, as ``decoder.decode_exit`` lays them
    out (IO: port and size|count<<8; MMIO: address and length; ...). ``errno`` is 0 when KVM_RUN
    returned 0; otherwise the run failed (EINTR: a signal kicked the vCPU) and ``reason`` is what
    kvm_run held then, which is only meaningful for EINTR (KVM_EXIT_INTR).
    """

    vcpu: int
    reason: int
    errno: int
    entry_ns: int  # time.monotonic_ns() when KVM_RUN was entered
    exit_ns: int  # time.monotonic_ns() when it returned
    a: int = 0
    b: int = 0
    flags: int = 0
    data: bytes = b""  # IO/MMIO/MSR data, only when recording with --data
    # Two stops: the ptrace stops between the previous exit of this vCPU and this entry (the
    # VMM's handling of that exit), and the time they held the thread: seen, and the unseen part
    # estimated, with the least and the most it costs on average (0: no basis for the most;
    # docs/engine.md)
    held_stops: int = 0
    held_seen_ns: int = 0
    held_unseen_ns: int = 0
    held_unseen_low_ns: int = 0
    held_unseen_high_ns: int = 0
    rip: GuestRip | None = None  # with --rip, where KVM synced the guest's registers

    @property
    def held_ns(self) -> int:
        return self.held_seen_ns + self.held_unseen_ns

    @property
    def guest_ns(self) -> int:
        """Time spent inside KVM_RUN: in the guest, plus the kernel's own exit handling."""
        return self.exit_ns - self.entry_ns


@dataclass(frozen=True, slots=True)
class VcpuSeen:
    """A vCPU the tracer found (at attach, or by KVM_CREATE_VCPU), and the thread running it.
    ``vcpu`` is the number its exits carry (:mod:`kvmtop.model.vcpu_keys`); ``key`` says which
    process, VM and vCPU id it stands for (None: a recording from before; the id is ``vcpu``)."""

    vcpu: int
    tid: int
    t_ns: int
    key: VcpuKey | None = None


@dataclass(frozen=True, slots=True)
class ProcessSeen:
    """A process the session follows began (forked, or attached to), ran a new program, or
    ended (``ended``; ``exit_status`` when it exited, None when it was detached)."""

    pid: int
    ppid: int
    argv: tuple[str, ...]
    t_ns: int
    ended: bool = False
    exit_status: int | None = None
