"""What kvmtop's threads hand each other: the tracer's messages on ``Tracer.out`` (exits in
batches, attach, detach, failure, its end), the lookup of a batch stream's vCPU keys, and the
stats fds the tracer answers a request for KVM's counters with.

Everything here is a frozen value (the fds are the receiver's to close): the tracer thread
builds it, any thread may read it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from kvmtop.model.events import ExitEvent, ProcessSeen, VcpuSeen
from kvmtop.model.records import exit_count, iter_events, last_t_exit, pack_events
from kvmtop.model.vcpu_keys import VcpuKey


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
    dropped: tuple[tuple[int, int], ...] = ()  # (CPU, events the kernel could not write) since
    # the last batch: the tracepoint engine's rings overflowed, exits may be missing

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
        return cls(pack_events(events, base_ns), base_ns, tuple(vcpus), lost, stops)

    @property
    def events(self) -> tuple[ExitEvent, ...]:
        """The exits decoded, afresh on every access."""
        return tuple(iter_events(self.records, self.base_ns))

    @property
    def exits(self) -> int:
        return exit_count(self.records)

    @property
    def last_exit_ns(self) -> int | None:
        """The exit time of the last exit (None: the batch has none)."""
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
    engine_note: str = ""  # how exits are seen where not by ptrace ("kernel tracepoints: ...")


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
class TracerNote:
    """Something the user should know while tracing goes on (a vCPU that gets no guest RIP,
    and why)."""

    message: str


@dataclass(frozen=True, slots=True)
class TracerEnded:
    """The tracer's thread has ended: no message follows."""


TracerMessage = ExitBatch | Attached | Detached | TracerFailed | TracerNote | TracerEnded


class VcpuKeys:
    """Which process, VM and vCPU id each vCPU number of a stream stands for."""

    def __init__(self) -> None:
        self._keys: dict[int, VcpuKey] = {}

    def see(self, batch: ExitBatch) -> None:
        for seen in batch.vcpus:
            if seen.key is not None:
                self._keys[seen.vcpu] = seen.key

    def of(self, vcpu: int) -> VcpuKey | None:
        return self._keys.get(vcpu)


@dataclass(frozen=True, slots=True)
class StatsFds:
    """kvmtop's own stats fds: ``vcpus`` {vCPU id: fd} and ``vm`` (or None); ``made_by``: which
    VMM thread made each (vCPU id, or VM: tid); ``kicks``: {vCPU id: how many of its KVM_RUNs
    kvmtop's own interrupts ended}, each a ``signal_exits`` KVM counted (the tracer's, kept up
    to date until it has detached)."""

    vcpus: dict[int, int]
    vm: int | None
    made_by: dict[int, int]
    kicks: dict[int, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in [self.vm, *self.vcpus.values()]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def close_when_answered(future: Future[StatsFds]) -> None:
    """For an answer nobody waits for any more: its fds are closed when it comes (at once if it
    has come)."""

    def close(done: Future[StatsFds]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    future.add_done_callback(close)
