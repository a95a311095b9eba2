"""The aggregate: counts, rates, latency histograms, top IO ports/MMIO addresses, recent exits.

Fed with ExitBatch objects (from the tracer, or from a recording), read through immutable
snapshots. Memory is bounded however long a session runs. The TUI, ``report`` and ``replay`` all
read this same aggregate, so they never disagree. Never does I/O; never touches a tracee.

(Interface below; implementation fills in ExitStats.)
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmtop.events import ExitEvent

LOG2_BUCKETS = 40  # bucket 0: 0-1 ns; bucket i (i >= 1): [2**i, 2**(i+1)) ns; the last is open


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    count: int
    total_ns: int
    min_ns: int  # 0 when count == 0
    max_ns: int
    buckets: tuple[int, ...]  # LOG2_BUCKETS counts

    def percentile(self, q: float) -> int:
        """Upper bound of the log2 bucket holding quantile q (0..1), clamped to [min, max]."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class ReasonStats:
    label: (
        str  # decoder.exit_label(): "KVM_EXIT_IO", "KVM_EXIT_INTR", "KVM_RUN_EFAULT", "KVM_EXIT_44"
    )
    count: int
    rate: float  # exits/s over the last whole second
    guest: LatencyHistogram  # time inside KVM_RUN for runs that ended with this label
    handling: LatencyHistogram  # VMM time after such an exit, until that vCPU's next KVM_RUN


@dataclass(frozen=True, slots=True)
class PortCount:
    port: int
    direction: str  # "in" | "out"
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class MmioCount:
    address: int
    length: int
    write: bool
    count: int


@dataclass(frozen=True, slots=True)
class VcpuSnapshot:
    vcpu: int
    tid: int | None
    total: int
    rate: float  # exits/s over the last whole second
    reasons: tuple[ReasonStats, ...]  # count descending
    timeline: tuple[int, ...]  # exits per second, the last TIMELINE_SECONDS, oldest first
    timeline_dominant: tuple[str | None, ...]  # the label with most exits in that second
    timeline_by_reason: dict[str, tuple[int, ...]]
    io: tuple[PortCount, ...]  # count descending
    mmio: tuple[MmioCount, ...]
    recent: tuple[ExitEvent, ...]  # the latest exits, oldest first


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    now_ns: int  # the time the rates and timelines are relative to
    first_ns: int | None  # first exit seen
    last_ns: int | None  # last exit seen
    total: int
    lost: int
    stops: int  # ptrace stops reported by the tracer
    stops_per_s: float
    reasons: tuple[ReasonStats, ...]  # whole VM, count descending
    vcpus: tuple[VcpuSnapshot, ...]  # by vCPU id
    io: tuple[PortCount, ...]  # whole VM
    mmio: tuple[MmioCount, ...]
    top_exact: bool  # False once a top table evicted keys (its counts are then upper bounds)
