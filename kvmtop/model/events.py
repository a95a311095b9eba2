"""What the tracer reports: exits, in batches, and the few things that happen around them.

Everything here is a frozen value: the tracer thread builds it, any thread may read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kvmtop.model.vcpu_keys import VcpuKey

# ExitEvent.flags
EXIT_WRITE = 0x01  # IO out, MMIO write, WRMSR, TPR write: the guest gave the VMM a value
EXIT_PRIVATE = 0x02  # MEMORY_FAULT on private (guest_memfd) memory
EXIT_CYCLE = 0x04  # one-stop tracing: entry_ns..exit_ns span the run and the VMM's handling


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


@dataclass(frozen=True, slots=True)
class ExitBatch:
    """Exits in the order the tracer saw them (per vCPU, in time order), as packed records.

    ``records`` holds EXIT records, each followed by its LONG and DATA records
    (:mod:`kvmtop.model.records`, the recording's layout), with t_exit relative to ``base_ns`` (a
    monotonic ns: the attach time, which is also the recording's ``start_ns``). The aggregate
    and the recording read them in bulk; :attr:`events` decodes them, for the slow paths.
    """

    records: bytes
    base_ns: int
    vcpus: tuple[VcpuSeen, ...] = ()
    lost: int = 0  # exits seen but not decoded (kvm_run unreadable); must stay 0
    stops: int = 0  # ptrace stops handled since the previous batch
    processes: tuple[ProcessSeen, ...] = ()  # before this batch's exits
    coalesced: bytes = b""  # COALESCED records (kvmtop.model.coalesced): writes that never exited

    # kvmtop.model.records imports this module, so its functions are imported where they are used
    @classmethod
    def of(
        cls,
        events: Iterable[ExitEvent],
        base_ns: int = 0,
        vcpus: Iterable[VcpuSeen] = (),
        lost: int = 0,
        stops: int = 0,
    ) -> ExitBatch:
        """A batch of ``events``, packed (tests and slow paths)."""
        from kvmtop.model.records import pack_events

        return cls(pack_events(events, base_ns), base_ns, tuple(vcpus), lost, stops)

    @property
    def events(self) -> tuple[ExitEvent, ...]:
        """The exits decoded, afresh on every access."""
        from kvmtop.model.records import iter_events

        return tuple(iter_events(self.records, self.base_ns))

    @property
    def exits(self) -> int:
        from kvmtop.model.records import exit_count

        return exit_count(self.records)

    @property
    def last_exit_ns(self) -> int | None:
        """The exit time of the last exit (None: the batch has none)."""
        from kvmtop.model.records import last_t_exit

        t = last_t_exit(self.records)
        return None if t is None else self.base_ns + t


@dataclass(frozen=True, slots=True)
class Attached:
    pid: int
    argv: tuple[str, ...]
    t_ns: int
    launched: bool = False  # started by kvmtop (record -- CMD) rather than attached to
    one_stop: bool = False  # under kvmtop's seccomp filter: exits read at the next KVM_RUN entry,
    # the command's life tied to kvmtop's
    notify: bool = False  # ...and the filter notifies a listener: no ptrace stop per exit
    filter_note: str = ""  # why a cheaper way of stopping could not be had
    pids: tuple[int, ...] = ()  # every VMM attached to (``pid`` is the first)


@dataclass(frozen=True, slots=True)
class Detached:
    """Tracing ended: ``why`` says how; ``exit_status`` is set when the VMM itself ended."""

    pid: int
    why: str
    t_ns: int
    exit_status: int | None = None


@dataclass(frozen=True, slots=True)
class TracerFailed:
    """A command failed; ``message`` is written for the user."""

    message: str
    kind: str = "error"  # the KvmtopError subclass name, so the CLI can pick an exit code
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TracerEnded:
    """The tracer's thread has ended: no message follows."""


TracerMessage = ExitBatch | Attached | Detached | TracerFailed | TracerEnded
