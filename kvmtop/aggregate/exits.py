"""The aggregate: counts, rates, latency histograms, top IO ports/MMIO addresses, recent exits.

Fed with ExitBatch objects (from the tracer, or from a recording), read through immutable
snapshots. A batch's records are grouped in one pass (:mod:`kvmtop.aggregate.batch_summary`, in C when
``kvmtop.native._summary`` is built) and merged here at a cost per key, never per exit; the recent exits
are kept as records and decoded only for a snapshot. Memory is bounded however long a session runs. The TUI, ``report`` and ``replay`` all
read this same aggregate, so they never disagree. Never does I/O; never touches a tracee.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvmtop import native
from kvmtop.abi.mmio_names import MmioNames, from_argv
from kvmtop.abi.record_layout import (
    C_KERNEL,
    C_PIO,
    C_UNREADABLE,
    C_WRAP,
    COALESCED,
    EXIT,
    F_CYCLE,
    F_FAILED,
    HARDWARE,
    KIND_COALESCED,
    KIND_EXIT,
    KIND_HARDWARE,
)
from kvmtop.aggregate import batch_summary
from kvmtop.aggregate.batch_summary import BatchSummary, named_in
from kvmtop.aggregate.guest_code import GuestCode, GuestCodeCounts, RipCount
from kvmtop.aggregate.top_counter import TopCounter
from kvmtop.decoder import exit_label
from kvmtop.model.events import ExitEvent, ProcessSeen, VcpuSeen
from kvmtop.model.messages import ExitBatch
from kvmtop.model.records import cut_after, exit_count, iter_events
from kvmtop.model.vcpu_keys import VcpuKey
from kvmtop.units import duration_span
from kvmtop.xlat_exit import ExitReason, hardware_exit_name

TIMELINE_SECONDS = 60
NS = 1_000_000_000
IO_LABEL = exit_label(ExitReason.IO, 0)
MOMENTS = 4  # moments counted to at once (note_moment): the counters' last samples
RECENT_BATCHES = 64  # batches kept to count back from (a moment noted just after their exits)
# a histogram bucket's power of two (its low's bit_length - 1; 0 for 0), for log2 views
OCTAVE_OF = tuple(max(0, batch_summary.bucket_bounds(b)[0].bit_length() - 1)
                  for b in range(batch_summary.BUCKETS))  # fmt: skip


@dataclass(frozen=True, slots=True)
class LatencyHistogram:
    count: int
    total_ns: int
    min_ns: int  # 0 when count == 0
    max_ns: int
    buckets: tuple[
        int, ...
    ]  # batch_summary.BUCKETS counts (batch_summary.bucket_of: 8 per power of two)

    def percentile(self, q: float) -> int:
        """Quantile q (0..1), interpolated inside its bucket and clamped to [min, max]: exact to
        within that bucket's width, an eighth of its value at most."""
        if self.count == 0:
            return 0
        rank = max(1.0, min(float(self.count), q * self.count))
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                low, high = batch_summary.bucket_bounds(i)
                value = low + (high - low) * (rank - seen) / n  # linear within the bucket
                return max(self.min_ns, min(self.max_ns, int(value)))
            seen += n
        return self.max_ns

    def octaves(self) -> list[int]:
        """The counts per power of two: index i holds [2**i, 2**(i+1)) ns (0 and 1 in 0)."""
        counts = [0] * batch_summary.OCTAVES
        for i, n in enumerate(self.buckets):
            if n:
                counts[OCTAVE_OF[i]] += n
        return counts

    @property
    def median(self) -> int:
        return self.percentile(0.5)

    @property
    def p99(self) -> int:
        return self.percentile(0.99)

    @property
    def mean(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


EMPTY_HISTOGRAM = LatencyHistogram(0, 0, 0, 0, (0,) * batch_summary.BUCKETS)


@dataclass(frozen=True, slots=True)
class ReasonStats:
    label: (
        str  # decoder.exit_label(): "KVM_EXIT_IO", "KVM_EXIT_INTR", "KVM_RUN_EFAULT", "KVM_EXIT_44"
    )
    count: int
    rate: float  # exits/s over the last whole second
    guest: LatencyHistogram  # time inside KVM_RUN for runs that ended with this label
    handling: LatencyHistogram  # VMM time after such an exit, until that vCPU's next KVM_RUN
    # ...less the time kvmtop's ptrace stops held the thread in it (two stops: docs/engine.md);
    # empty where not measured
    handling_net: LatencyHistogram = EMPTY_HISTOGRAM
    # the same exits' handling less the most and the least the stops can have held it on average
    net_low_total: int = 0
    net_high_total: int = 0

    @property
    def net_mean_bound(self) -> MeanBound | None:
        """Where the mean net handling lies (None: not measured)."""
        return mean_bound(self.handling_net.count, self.net_low_total, self.net_high_total)

    @property
    def net_known(self) -> bool:
        """The net mean is known (MeanBound.known): only then do the views show the net times
        per exit, estimates floored at 0 whose spread says nothing where the mean cannot."""
        bound = self.net_mean_bound
        return bound is not None and bound.known

    @property
    def net_cut_share(self) -> float:
        """The share of exits whose net estimate was cut at 0 (0..1; 0 without net times)."""
        h = self.handling_net
        return h.buckets[0] / h.count if h.count else 0.0

    @property
    def net_median_known(self) -> bool:
        """The net median says something: the mean is known and fewer than half the exits'
        estimates were cut at 0 (else the median is that cut, not the VMM's time)."""
        return self.net_known and self.net_cut_share < 0.5


@dataclass(frozen=True, slots=True)
class MeanBound:
    """Where a mean of times lies: low_ns <= mean <= high_ns."""

    low_ns: float
    high_ns: float

    @property
    def known(self) -> bool:
        """Narrower than its own low end: the mean is known within a factor of two. A wider
        bound is still true, but says less than it seems to: views show it as unknown."""
        return 0 < self.high_ns - self.low_ns < self.low_ns


def bound_text(bound: MeanBound | None, sep: str = "") -> str:
    """Where a mean lies (97.5µs–161.2µs), or "unknown" (none, or not known: MeanBound.known)."""
    if bound is None or not bound.known:
        return "unknown"
    return duration_span(bound.low_ns, bound.high_ns, sep)


def mean_bound(count: int, low_total: int, high_total: int) -> MeanBound | None:
    """The bound of a mean over ``count`` values from the totals of their least and most (None:
    no values). A mean of times is at least 0."""
    if not count:
        return None
    high = max(0.0, high_total / count)
    return MeanBound(min(high, max(0.0, low_total / count)), high)


# the orders a view may list reasons in (`o` steps through them; a snapshot is by count)
REASON_ORDERS: dict[str, Callable[[ReasonStats], tuple[float, str]]] = {
    "count": lambda r: (-r.count, r.label),
    "rate": lambda r: (-r.rate, r.label),
    "VMM p50": lambda r: (-r.handling.median, r.label),  # the slowest to handle first
    "VMM total": lambda r: (-r.handling.total_ns, r.label),  # what takes the VMM most time
}


def reasons_by(reasons: tuple[ReasonStats, ...], order: str) -> tuple[ReasonStats, ...]:
    """``reasons`` in one of :data:`REASON_ORDERS`, ties by label."""
    return tuple(sorted(reasons, key=REASON_ORDERS[order]))


@dataclass(frozen=True, slots=True)
class PortCount:
    port: int
    direction: str  # "in" | "out"
    size: int
    count: int
    error: int = 0  # the count may be this much too high (a bounded table's): 0 is exact


@dataclass(frozen=True, slots=True)
class MmioCount:
    address: int
    length: int
    write: bool
    count: int
    name: str = ""  # mmio_names: "LAPIC EOI", "virtio-mmio 0 QueueNotify"; "" when unknown
    error: int = 0  # the count may be this much too high (a bounded table's): 0 is exact


@dataclass(frozen=True, slots=True)
class VcpuSnapshot:
    vcpu: int  # the number its exits carry (:mod:`kvmtop.model.vcpu_keys`)
    label: str  # how to name it: the vCPU id, or PID:VM:VCPU when the session has several VMs
    key: VcpuKey | None  # its process, VM and id (None: a recording from before they were told)
    process: str  # the program of its process ("" when not known)
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
    coalesced: tuple[CoalescedCount, ...] = ()  # writes KVM queued without an exit
    rips: tuple[RipCount, ...] = ()  # --rip: guest code by exits, count descending
    rips_by_time: tuple[RipCount, ...] = ()  # ...by the VMM's time handling its exits

    @property
    def name(self) -> str:
        """How to name it: `vCPU 0`, or `vCPU 0 of VM 5 in pid 1234 (qemu)` among several VMs."""
        key = self.key
        if key is None or self.label == str(key.vcpu):
            return f"vCPU {self.label}"
        program = f" ({self.process})" if self.process else ""
        return f"vCPU {key.vcpu} of VM {key.vm} in pid {key.pid}{program}"


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
    vcpus: tuple[VcpuSnapshot, ...]  # by vCPU number: the first VM's by id, then the others
    many_vms: bool  # the vCPUs are of more than one VM: labels say PID:VM:VCPU
    io: tuple[PortCount, ...]  # whole VM
    mmio: tuple[MmioCount, ...]
    top_exact: bool  # False when a count shown may be too high (a bounded table evicted keys)
    coalesced: CoalescedSnapshot = field(default_factory=lambda: EMPTY_COALESCED)
    mmio_names: MmioNames = field(default_factory=MmioNames)  # the ranges the VMMs' argv told
    dropped: tuple[tuple[int, int], ...] = ()  # (CPU, events the kernel dropped): exits missing
    # the guest's hardware exits (kvm_exit), KVM's own and the VMM's: (name, count), whole
    # session, and per vCPU number
    hardware: tuple[tuple[str, int], ...] = ()
    hardware_by_vcpu: tuple[tuple[int, tuple[tuple[str, int], ...]], ...] = ()
    rips: tuple[RipCount, ...] = ()  # --rip: the VM's guest code by exits, count descending
    rips_by_time: tuple[RipCount, ...] = ()  # ...by the VMM's time handling its exits
    rip_seen: bool = False  # some exit carried a guest RIP


@dataclass(frozen=True, slots=True)
class CoalescedCount:
    """Writes to one address or port that KVM queued in the coalesced MMIO ring: no exit."""

    pio: bool
    address: int
    length: int
    count: int


@dataclass(frozen=True, slots=True)
class CoalescedSnapshot:
    total: int  # coalesced writes counted
    wraps: int  # looks at which a whole turn of the ring may have gone unseen
    unreadable: tuple[int, ...]  # vCPUs whose ring could not be read (nothing counted for them)
    top: tuple[CoalescedCount, ...]  # count descending
    read: bool  # a ring was read (False: nothing could be counted, or nothing to count)
    kernel: bool = False  # from KVM's tracepoints: every write KVM handled with no exit


EMPTY_COALESCED = CoalescedSnapshot(0, 0, (), (), False)


class _Histogram:
    """A latency histogram being filled (batch_summary.bucket_of: 8 buckets per power of two)."""

    __slots__ = ("count", "total", "low", "high", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.low = 0
        self.high = 0
        self.buckets = [0] * batch_summary.BUCKETS

    def add(self, ns: int) -> None:
        if ns < 0:
            ns = 0
        if self.count == 0 or ns < self.low:
            self.low = ns
        if ns > self.high:
            self.high = ns
        self.count += 1
        self.total += ns
        self.buckets[batch_summary.bucket_of(ns)] += 1

    def merge(self, count: int, total: int, low: int, high: int, pairs: tuple[int, ...]) -> None:
        """Add a histogram of ``count`` values (as :mod:`kvmtop.aggregate.batch_summary` gives it: its buckets
        as (bucket, count) pairs, flat)."""
        if not count:
            return
        if self.count == 0 or low < self.low:
            self.low = low
        if high > self.high:
            self.high = high
        self.count += count
        self.total += total
        buckets = self.buckets
        for k in range(0, len(pairs), 2):
            buckets[pairs[k]] += pairs[k + 1]

    def frozen(self) -> LatencyHistogram:
        return LatencyHistogram(self.count, self.total, self.low, self.high, tuple(self.buckets))


class _Reason:
    __slots__ = ("count", "guest", "handling", "handling_net", "net_low", "net_high")

    def __init__(self) -> None:
        self.count = 0
        self.guest = _Histogram()
        self.handling = _Histogram()
        self.handling_net = _Histogram()
        self.net_low = self.net_high = 0  # summary's net_low_total, net_high_total


class _Seconds:
    """Per-second counts per label for the last TIMELINE_SECONDS, in a fixed ring."""

    __slots__ = ("stamp", "counts")

    def __init__(self) -> None:
        self.stamp = [-1] * TIMELINE_SECONDS
        self.counts: list[dict[str, int]] = [{} for _ in range(TIMELINE_SECONDS)]

    def add(self, second: int, label: str, n: int = 1) -> None:
        i = second % TIMELINE_SECONDS
        if self.stamp[i] != second:
            self.stamp[i] = second
            self.counts[i] = {}
        bucket = self.counts[i]
        bucket[label] = bucket.get(label, 0) + n

    def at(self, second: int) -> dict[str, int]:
        i = second % TIMELINE_SECONDS
        return self.counts[i] if self.stamp[i] == second else {}


class _Vcpu:
    __slots__ = ("vcpu", "key", "tid", "total", "reasons", "seconds", "io", "mmio", "recent",
                 "recent_exits", "recent_capacity", "last", "coalesced")  # fmt: skip

    def __init__(self, vcpu: int, top_capacity: int, recent_capacity: int) -> None:
        self.vcpu = vcpu
        self.key: VcpuKey | None = None
        self.tid: int | None = None
        self.total = 0
        self.reasons: dict[str, _Reason] = {}
        self.seconds = _Seconds()
        self.io = TopCounter(top_capacity)
        self.mmio = TopCounter(top_capacity)
        self.recent: deque[tuple[bytes, int, int]] = deque()  # (records, base_ns, exits)
        self.recent_exits = 0
        self.recent_capacity = recent_capacity
        self.last: tuple[int, str] | None = None  # (exit_ns, label) of the previous exit
        self.coalesced = TopCounter(top_capacity)  # (pio, address, length) -> writes, no exit

    def keep_recent(self, records: bytes, base_ns: int, exits: int) -> None:
        """Keep the records of its latest exits: at least ``recent_capacity`` of them, at most
        one chunk more."""
        self.recent.append((records, base_ns, exits))
        self.recent_exits += exits
        while self.recent and self.recent_exits - self.recent[0][2] >= self.recent_capacity:
            self.recent_exits -= self.recent.popleft()[2]

    def recent_events(self) -> tuple[ExitEvent, ...]:
        events = [e for records, base, _ in self.recent for e in iter_events(records, base)]
        return tuple(events[max(0, len(events) - self.recent_capacity) :])


def _reason(table: dict[str, _Reason], label: str) -> _Reason:
    found = table.get(label)
    if found is None:
        found = table[label] = _Reason()
    return found


def _ports(counter: TopCounter, n: int | None) -> tuple[PortCount, ...]:
    error = counter.errors.get
    return tuple(PortCount(p, "out" if w else "in", s, c, error((p, w, s), 0))
                 for (p, w, s), c in counter.top(n))  # fmt: skip


def _mmios(counter: TopCounter, n: int | None, names: MmioNames) -> tuple[MmioCount, ...]:
    error = counter.errors.get
    return tuple(MmioCount(a, ln, w, c, names.name(a), error((a, ln, w), 0))
                 for (a, ln, w), c in counter.top(n))  # fmt: skip


def top_error(*tables: Iterable[PortCount | MmioCount]) -> int:
    """The most any count shown may be too high by (0: every one is exact)."""
    return max((row.error for rows in tables for row in rows), default=0)


def _coalesced(counter: TopCounter, n: int | None) -> tuple[CoalescedCount, ...]:
    return tuple(CoalescedCount(bool(p), a, ln, c) for (p, a, ln), c in counter.top(n))


class CoalescedCounts:
    """The writes that never exited (:mod:`kvmtop.model.coalesced`), whole session; per vCPU in each
    vCPU's own counter. Bounded as the top tables are."""

    def __init__(self, top_capacity: int) -> None:
        self.top = TopCounter(top_capacity)
        self.total = 0
        self.wraps = 0
        self.unreadable: dict[int, None] = {}
        self.read = False
        self.kernel = False

    def add(self, records: bytes, vcpu_of: Callable[[int], _Vcpu]) -> None:
        """Cost: one step per COALESCED record (one per address and look), never per write."""
        for kind, flags, vcpu, length, _t, count, _pad, address in COALESCED.iter_unpack(records):
            if kind != KIND_COALESCED:
                continue
            if flags & C_UNREADABLE:
                if len(self.unreadable) < 4096:
                    self.unreadable[vcpu] = None
                continue
            self.read = True
            self.kernel = self.kernel or bool(flags & C_KERNEL)
            key = (flags & C_PIO, address, length)
            self.top.add(key, count)
            vcpu_of(vcpu).coalesced.add(key, count)
            self.total += count
            if flags & C_WRAP:
                self.wraps += 1

    def snapshot(self, top: int | None) -> CoalescedSnapshot:
        return CoalescedSnapshot(self.total, self.wraps, tuple(self.unreadable),
                                 _coalesced(self.top, top), self.read, self.kernel)  # fmt: skip


class HardwareCounts:
    """The guest's hardware exits by reason, from HARDWARE records (KVM's kvm_exit tracepoint,
    where it fires): a handful of reasons, counted whole and per vCPU."""

    def __init__(self) -> None:
        self.per_vcpu: dict[int, dict[str, int]] = {}

    def add(self, records: bytes) -> None:
        for kind, isa, vcpu, reason, _t, count, _pad, _rip in HARDWARE.iter_unpack(records):
            if kind == KIND_HARDWARE:
                counts = self.per_vcpu.setdefault(vcpu, {})
                name = hardware_exit_name(isa, reason)
                counts[name] = counts.get(name, 0) + count

    def snapshot(
        self,
    ) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[int, tuple[tuple[str, int], ...]], ...]]:
        whole: dict[str, int] = {}
        for counts in self.per_vcpu.values():
            for name, n in counts.items():
                whole[name] = whole.get(name, 0) + n
        return _by_count(whole), tuple(
            (vcpu, _by_count(counts)) for vcpu, counts in sorted(self.per_vcpu.items())
        )


def _io_exits(records: bytes) -> int:
    """The KVM_EXIT_IO exits (errno 0) among ``records``."""
    return sum(1 for kind, flags, _v, reason, *_rest in EXIT.iter_unpack(records)
               if kind == KIND_EXIT and reason == ExitReason.IO and not flags & F_FAILED)  # fmt: skip


def _by_count(counts: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def summarizer() -> Callable[[bytes, int, int], BatchSummary]:
    """The C ``summarize`` when it is built (and pure Python was not asked for), else its
    Python twin: both return the same named tuples."""
    module = native.load("_summary")
    if module is None:
        return batch_summary.summarize
    return named_in(module).summarize  # type: ignore[no-any-return]


class ExitStats:
    """The bounded aggregate. One thread feeds it (:meth:`add_batch`), any thread reads it
    (:meth:`snapshot`); snapshot cost grows with vCPUs, reasons and keys, never with exits."""

    def __init__(
        self,
        timeline_seconds: int = TIMELINE_SECONDS,
        top_capacity: int = 256,
        recent_capacity: int = 2000,
    ) -> None:
        if timeline_seconds != TIMELINE_SECONDS:
            raise ValueError(f"the timeline holds {TIMELINE_SECONDS} s")
        self.top_capacity = top_capacity
        self.recent_capacity = recent_capacity
        self._lock = threading.Lock()
        self._labels: dict[tuple[int, int], str] = {}
        self._summarize = summarizer()
        self.lost = 0
        self.dropped: dict[int, int] = {}  # CPU: events the kernel could not write
        self._clear()

    def _clear(self) -> None:
        # {moment (ns): [exits, IO exits] up to it}, counted by exit time (note_moment)
        self._moments: dict[int, list[int]] = {}
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=RECENT_BATCHES)  # (base, records)
        self._vcpus: dict[int, _Vcpu] = {}
        self._vms: dict[tuple[int, int], None] = {}  # (pid, VM fd) of vCPUs with keys, in order
        self._programs: dict[int, str] = {}  # pid -> its program, for processes with vCPUs
        self._argv0: dict[int, str] = {}  # pid -> its program, for every process lately seen
        self._mmio_names = MmioNames()  # well-known ranges, and those the VMMs' argv told
        self._reasons: dict[str, _Reason] = {}
        self._io = TopCounter(self.top_capacity)
        self._mmio = TopCounter(self.top_capacity)
        self.coalesced = CoalescedCounts(self.top_capacity)
        self.hardware = HardwareCounts()
        self.guest_code = GuestCodeCounts(self.top_capacity)
        self._stops = _Seconds()
        self.total = 0
        self.stops = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def reset(self) -> None:
        """Forget every count, rate, histogram and recent exit (the TUI's `r`). The vCPUs seen
        and their threads stay; so do the exits lost, which must never be hidden."""
        with self._lock:
            tids = {vcpu.vcpu: vcpu.tid for vcpu in self._vcpus.values()}
            self._clear()
            for n, tid in tids.items():
                self._vcpu(n).tid = tid

    def _vcpu(self, vcpu: int) -> _Vcpu:
        found = self._vcpus.get(vcpu)
        if found is None:
            found = self._vcpus[vcpu] = _Vcpu(vcpu, self.top_capacity, self.recent_capacity)
        return found

    def add_batch(self, batch: ExitBatch) -> None:
        with self._lock:
            for proc in batch.processes:
                self._see_process(proc)
            for seen in batch.vcpus:
                self._see(seen)
            if batch.records:
                summed = self._summarize(batch.records, batch.base_ns, self.recent_capacity)
                self._add(summed, batch.base_ns)
                self._count_to_moments(summed, batch.records, batch.base_ns)
                self.guest_code.add(summed, self._label)
            if batch.coalesced:
                self.coalesced.add(batch.coalesced, self._vcpu)
                self.hardware.add(batch.coalesced)
            self.lost += batch.lost
            for cpu, n in batch.dropped:
                self.dropped[cpu] = self.dropped.get(cpu, 0) + n
            if batch.stops:
                self.stops += batch.stops
                if self.last_ns is not None:  # the batch's last exit, if it had any
                    self._stops.add(self.last_ns // NS, "stops", batch.stops)

    def add_events(self, events: Iterable[ExitEvent]) -> None:
        self.add_batch(ExitBatch.of(events))

    def _see(self, seen: VcpuSeen) -> None:
        vcpu = self._vcpu(seen.vcpu)
        if seen.tid:
            vcpu.tid = seen.tid
        if seen.key is not None:
            vcpu.key = seen.key
            self._vms[(seen.key.pid, seen.key.vm)] = None
            program = self._argv0.get(seen.key.pid)
            if program is not None:
                self._programs[seen.key.pid] = program

    def see_command(self, argv: Sequence[str]) -> None:
        """Name MMIO by what a VMM's command line tells (a recording's argv; live sessions
        learn it from each ProcessSeen)."""
        with self._lock:
            self._mmio_names = self._mmio_names.merged(from_argv(argv))

    def _see_process(self, proc: ProcessSeen) -> None:
        if proc.ended or not proc.argv:
            return
        program = os.path.basename(proc.argv[0])
        self._mmio_names = self._mmio_names.merged(from_argv(proc.argv))
        if len(self._argv0) >= 4096:  # a build forking thousands: keep those that made vCPUs
            self._argv0 = {pid: self._argv0[pid] for pid in self._programs if pid in self._argv0}
        self._argv0[proc.pid] = program
        if proc.pid in self._programs:
            self._programs[proc.pid] = program  # it ran a new program

    def _label(self, reason: int, errno: int) -> str:
        label = self._labels.get((reason, errno))
        if label is None:
            label = exit_label(reason, errno)
            if len(self._labels) < 4096:  # unknown reasons are few; bound the cache anyway
                self._labels[(reason, errno)] = label
        return label

    def _add(self, summed: BatchSummary, base_ns: int) -> None:
        """Merge a batch's summary: the cost is per vCPU, label, second and key."""
        if not summed.exits:
            return
        reasons = self._reasons
        for part in summed.vcpus:
            vcpu = self._vcpu(part.vcpu)
            if vcpu.last is not None and not part.first_flags & F_CYCLE:  # one-stop: no split
                handling = part.first_entry_ns - vcpu.last[0]  # the pair across batches
                held, held_most = part.first_held_ns, part.first_held_most_ns
                for table in (vcpu.reasons, reasons):
                    found = _reason(table, vcpu.last[1])
                    found.handling.add(handling)
                    if held >= 0:
                        found.handling_net.add(handling - held)
                        found.net_low += handling - held_most if held_most >= 0 else 0
                        found.net_high += handling - part.first_held_least_ns
            vcpu.last = (part.last_exit_ns, self._label(part.last_reason, part.last_errno))
            vcpu.total += part.exits
            if part.recent_exits:
                vcpu.keep_recent(part.recent, base_ns, part.recent_exits)
        labels = []
        for g in summed.groups:
            label = self._label(g.reason, g.errno)
            labels.append((self._vcpus[g.vcpu], label))
            for table in (self._vcpus[g.vcpu].reasons, reasons):
                found = _reason(table, label)
                found.count += g.count
                found.guest.merge(g.count, g.guest_total, g.guest_min, g.guest_max,
                                  g.guest_buckets)  # fmt: skip
                found.handling.merge(g.handling_count, g.handling_total, g.handling_min,
                                     g.handling_max, g.handling_buckets)  # fmt: skip
                found.handling_net.merge(g.net_count, g.net_total, g.net_min, g.net_max,
                                         g.net_buckets)  # fmt: skip
                found.net_low += g.net_low_total
                found.net_high += g.net_high_total
        for group, second, n in summed.seconds:
            vcpu, label = labels[group]
            vcpu.seconds.add(second, label, n)
        for vcpu_id, port, write, size, n in summed.io:
            self._vcpus[vcpu_id].io.add((port, write, size), n)
            self._io.add((port, write, size), n)
        for vcpu_id, address, length, write, n in summed.mmio:
            self._vcpus[vcpu_id].mmio.add((address, length, write), n)
            self._mmio.add((address, length, write), n)
        self.total += summed.exits
        if self.first_ns is None:
            self.first_ns = summed.first_exit_ns
        self.last_ns = summed.last_exit_ns

    # --- reading -----------------------------------------------------------------------------

    def snapshot(
        self, now_ns: int | None = None, recent: bool = False, top: int | None = 32
    ) -> StatsSnapshot:
        """Everything, as immutable values. ``recent``: include each vCPU's latest exits;
        ``top``: how many IO ports/MMIO addresses per table (None: all)."""
        with self._lock:
            now = now_ns if now_ns is not None else (self.last_ns or 0)
            now_s = now // NS
            vcpus = tuple(
                self._vcpu_snapshot(v, now_s, recent, top) for _, v in sorted(self._vcpus.items())
            )
            per_label_rate: dict[str, int] = {}
            for v in self._vcpus.values():
                for label, n in v.seconds.at(now_s - 1).items():
                    per_label_rate[label] = per_label_rate.get(label, 0) + n
            reasons = _reason_stats(self._reasons, per_label_rate)
            io, mmio = _ports(self._io, top), _mmios(self._mmio, top, self._mmio_names)
            many_vms = len(self._vms) > 1
            hardware, hardware_by_vcpu = self.hardware.snapshot()
            return StatsSnapshot(
                now_ns=now,
                first_ns=self.first_ns,
                last_ns=self.last_ns,
                total=self.total,
                lost=self.lost,
                stops=self.stops,
                stops_per_s=float(self._stops.at(now_s - 1).get("stops", 0)),
                reasons=reasons,
                vcpus=vcpus,
                many_vms=many_vms,
                io=io,
                mmio=mmio,
                mmio_names=self._mmio_names,
                top_exact=top_error(io, mmio) == 0,
                coalesced=self.coalesced.snapshot(top),
                dropped=tuple(sorted(self.dropped.items())),
                hardware=hardware,
                hardware_by_vcpu=hardware_by_vcpu,
                rips=self.guest_code.vm.top(top),
                rips_by_time=self.guest_code.vm.top(top, by_time=True),
                rip_seen=self.guest_code.seen,
            )

    def note_moment(self, t_ns: int) -> None:
        """Count the exits whose exit time is at most ``t_ns`` (:meth:`exits_until`): those
        received, and those the tracer delivers later (its batches come up to 0.2 s after
        their exits). For rates over the same interval as counters sampled at ``t_ns``."""
        with self._lock:
            found = self._reasons.get(IO_LABEL)
            counts = [self.total, found.count if found is not None else 0]
            for base, records in self._recent:  # received, but after the moment
                later = records[cut_after(records, t_ns - base) :]
                counts[0] -= exit_count(later)
                counts[1] -= _io_exits(later)
            self._moments[t_ns] = counts
            while len(self._moments) > MOMENTS:
                del self._moments[next(iter(self._moments))]

    def exits_until(self, t_ns: int) -> tuple[int, int] | None:
        """(exits, IO exits) with an exit time at most ``t_ns``, a moment noted (None: not)."""
        with self._lock:
            found = self._moments.get(t_ns)
            return (found[0], found[1]) if found is not None else None

    def _count_to_moments(self, summed: BatchSummary, records: bytes, base_ns: int) -> None:
        self._recent.append((base_ns, records))
        first, last = summed.first_exit_ns, summed.last_exit_ns
        if first is None or last is None:
            return
        for t, counts in self._moments.items():
            if last <= t:
                counts[0] += summed.exits
                counts[1] += sum(io.count for io in summed.io)
            elif first <= t:
                before = records[: cut_after(records, t - base_ns)]
                counts[0] += exit_count(before)
                counts[1] += _io_exits(before)

    def count_of(self, label: str) -> int:
        """The exits counted under one reason label (``KVM_EXIT_IO``), without a snapshot."""
        with self._lock:
            found = self._reasons.get(label)
            return found.count if found is not None else 0

    def vcpu_pids(self) -> list[int]:
        """The processes whose vCPUs made exits, in the order their vCPUs were seen."""
        with self._lock:
            return list(dict.fromkeys(pid for pid, _vm in self._vms))

    def vcpu_snapshot(self, vcpu: int, now_ns: int, top: int | None = 32) -> VcpuSnapshot | None:
        """One vCPU, with its recent exits (the drill-down view)."""
        with self._lock:
            found = self._vcpus.get(vcpu)
            return None if found is None else self._vcpu_snapshot(found, now_ns // NS, True, top)

    def _vcpu_snapshot(self, v: _Vcpu, now_s: int, recent: bool, top: int | None) -> VcpuSnapshot:
        seconds = [v.seconds.at(s) for s in range(now_s - TIMELINE_SECONDS + 1, now_s + 1)]
        labels = sorted({label for bucket in seconds for label in bucket})
        key = v.key
        many = len(self._vms) > 1
        code: GuestCode | None = self.guest_code.vcpus.get(v.vcpu)
        return VcpuSnapshot(
            vcpu=v.vcpu,
            label=key.label()
            if key is not None and many
            else str(v.vcpu if key is None else key.vcpu),
            key=key,
            process=self._programs.get(key.pid, "") if key is not None else "",
            tid=v.tid,
            total=v.total,
            rate=float(sum(v.seconds.at(now_s - 1).values())),
            reasons=_reason_stats(v.reasons, v.seconds.at(now_s - 1)),
            timeline=tuple(sum(b.values()) for b in seconds),
            timeline_dominant=tuple(max(b, key=b.__getitem__) if b else None for b in seconds),
            timeline_by_reason={label: tuple(b.get(label, 0) for b in seconds) for label in labels},
            io=_ports(v.io, top),
            mmio=_mmios(v.mmio, top, self._mmio_names),
            recent=v.recent_events() if recent else (),
            coalesced=_coalesced(v.coalesced, top),
            rips=code.top(top) if code is not None else (),
            rips_by_time=code.top(top, by_time=True) if code is not None else (),
        )


def _reason_stats(table: dict[str, _Reason], rates: dict[str, int]) -> tuple[ReasonStats, ...]:
    rows = [
        ReasonStats(
            label,
            r.count,
            float(rates.get(label, 0)),
            r.guest.frozen(),
            r.handling.frozen(),
            r.handling_net.frozen(),
            r.net_low,
            r.net_high,
        )  # fmt: skip
        for label, r in table.items()
    ]
    rows.sort(key=lambda r: (-r.count, r.label))
    return tuple(rows)
