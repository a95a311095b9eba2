"""A batch's exit records grouped in one pass, for the aggregate to merge at a cost per key, not
per exit: the pure-Python twin of ``kvmtop/native/summary.c`` (module ``kvmtop.native._summary``),
which must return exactly the same values.

``summarize(records, base_ns, recent_per_vcpu)`` takes EXIT records each followed by its LONG,
DATA and HELD and RIP records (:mod:`kvmtop.model.records`; parts before the first EXIT are passed over),
t_exit relative to ``base_ns`` (an int64 ns), and returns a :class:`BatchSummary` of named
tuples (the C twin builds the same types, handed to it once by :func:`named_in`): every count
is per key, in order of first appearance. A failed run (F_FAILED) has errno = its b and no
details; a one-stop exit with reason 0 has errno RUN_UNSEEN. Handling is the entry time of an
exit minus the previous exit time of the same vCPU in this batch, counted in the previous
exit's group, and not for exits with F_CYCLE; net handling is handling minus the time the exit's
HELD record says the thread was stopped for the tracer (only exits with one). Exits with a RIP
record (``--rip``) are also counted per (group, rip, linear, cpl), with the handling that ends
in this batch (each cut at 0), and each vCPU names the RIP entry of its last exit. Each histogram is
five fields: count, total, min and max (0 when empty) and the buckets, sparse: a flat tuple of
(bucket, count) pairs in bucket order for the buckets not empty, the bucket of ns being
:func:`bucket_of` (negative ns counted as 0).

A record of another kind raises ValueError, as does a length that is not a whole number of
records. Pure; no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from types import ModuleType
from typing import Any, NamedTuple

from kvmtop.abi.record_layout import (
    EXIT,
    F_CYCLE,
    F_FAILED,
    F_WRITE,
    HELD,
    KIND_DATA,
    KIND_EXIT,
    KIND_HELD,
    KIND_LONG,
    KIND_RIP,
    LONG,
    R_SEGMENTS,
    RECORD_SIZE,
    RIP,
    RUN_UNSEEN,
)
from kvmtop.xlat_exit import ExitReason

SUB_BITS = 3  # each power of two is cut in 2**SUB_BITS linear buckets: one spans 1/8 of its low
OCTAVES = 40  # ns of 2**40 (18 minutes) and above share the last bucket
BUCKETS = (OCTAVES - SUB_BITS + 1) << SUB_BITS  # 304


def bucket_of(ns: int) -> int:
    """The histogram bucket of ``ns`` (>= 0): ns itself below 16, then 8 per power of two."""
    if ns < 2 << SUB_BITS:
        return ns
    octave = ns.bit_length() - 1
    if octave >= OCTAVES:
        return BUCKETS - 1
    return ((octave - SUB_BITS + 1) << SUB_BITS) + (ns >> (octave - SUB_BITS)) - (1 << SUB_BITS)


def bucket_bounds(bucket: int) -> tuple[int, int]:
    """The lowest and highest ns of a bucket (the last one's highest: 2**40 - 1, a floor)."""
    if bucket < 2 << SUB_BITS:
        return bucket, bucket
    octave = (bucket >> SUB_BITS) + SUB_BITS - 1
    shift = octave - SUB_BITS
    low = ((1 << SUB_BITS) + (bucket & ((1 << SUB_BITS) - 1))) << shift
    return low, low + (1 << shift) - 1


NS = 1_000_000_000


class GroupSummary(NamedTuple):
    """The exits of one (vcpu, reason, errno)."""

    vcpu: int
    reason: int
    errno: int
    count: int
    guest_total: int  # time inside KVM_RUN: a histogram's five fields
    guest_min: int
    guest_max: int
    guest_buckets: tuple[int, ...]
    handling_count: int  # the VMM's handling of these exits (see the module docstring)
    handling_total: int
    handling_min: int
    handling_max: int
    handling_buckets: tuple[int, ...]
    net_count: int  # handling less the time stopped for the tracer (exits with a HELD record)
    net_total: int
    net_min: int
    net_max: int
    net_buckets: tuple[int, ...]
    # Over the same exits: handling less the most and the least that time can have been on
    # average (seen, plus HELD's unseen_high and unseen_low; no most, unseen_high 0: the exit
    # adds 0), not cut at 0: the mean net handling lies between their means (docs/engine.md)
    net_low_total: int
    net_high_total: int


class SecondSummary(NamedTuple):
    group: int  # the index of its GroupSummary
    second: int  # exit_ns // 10**9
    count: int


class IoSummary(NamedTuple):
    """KVM_EXIT_IO exits with errno 0 at one port."""

    vcpu: int
    port: int
    write: bool
    size: int  # b & 0xFF
    count: int


class MmioSummary(NamedTuple):
    """KVM_EXIT_MMIO exits with errno 0 at one address."""

    vcpu: int
    address: int
    length: int
    write: bool
    count: int


class RipSummary(NamedTuple):
    """The exits of one group at one guest code address (those with a RIP record: ``--rip``)."""

    group: int  # the index of its GroupSummary
    rip: int
    linear: int
    cpl: int  # -1: not known (the RIP record's R_SEGMENTS clear)
    count: int
    handling_count: int  # the VMM's handling of these exits that ended in this batch
    handling_total: int  # each handling cut at 0


class VcpuSummary(NamedTuple):
    """One vCPU's exits in the batch: what pairs them with the batches before and after."""

    vcpu: int
    exits: int
    first_entry_ns: int
    first_flags: int  # the record flags of its first exit
    last_exit_ns: int
    last_reason: int
    last_errno: int
    recent: bytes  # the records of its last ``recent_per_vcpu`` exits (with their parts)
    recent_exits: int
    first_held_ns: int  # its first exit's time stopped for the tracer (-1: no HELD record)
    first_held_least_ns: int
    first_held_most_ns: int  # -1: no HELD record, or no most
    last_rip: int  # the RipSummary of its last exit (-1: that exit had no RIP record)


class BatchSummary(NamedTuple):
    exits: int  # EXIT records
    first_exit_ns: int | None  # absolute (None: no exit)
    last_exit_ns: int | None
    groups: list[GroupSummary]
    seconds: list[SecondSummary]
    io: list[IoSummary]
    mmio: list[MmioSummary]
    vcpus: list[VcpuSummary]
    rips: list[RipSummary]


def named_in(module: ModuleType) -> ModuleType:
    """``module`` (``kvmtop.native._summary``), told to build these named tuples."""
    module.name_types(BatchSummary, GroupSummary, SecondSummary, IoSummary, MmioSummary,
                      VcpuSummary, RipSummary)  # fmt: skip
    return module


def check_records(records: bytes | bytearray | memoryview) -> None:
    if len(records) % RECORD_SIZE:
        raise ValueError(f"{len(records)} bytes are not a whole number of records")


NOT_HELD = (-1, -1, -1)


def held_times(seen: int, unseen: int, unseen_low: int, unseen_high: int) -> tuple[int, int, int]:
    """A HELD record's time stopped for the tracer: (estimated, least, most; -1: no most)."""
    return seen + unseen, seen + unseen_low, seen + unseen_high if unseen_high else -1


def _exits(
    records: bytes | bytearray | memoryview,
) -> Iterator[tuple[int, int, Any, int, tuple[int, int, int], Any]]:
    """(first record, record after its last, EXIT fields, guest ns, held_times or NOT_HELD, RIP
    fields or None) per exit."""
    check_records(records)
    pending: Any = None
    rip: Any = None
    start = guest = 0
    held = NOT_HELD
    for i, fields in enumerate(EXIT.iter_unpack(records)):
        kind = fields[0]
        if kind == KIND_EXIT:
            if pending is not None:
                yield start, i, pending, guest, held, rip
            pending, start, guest, held, rip = fields, i, fields[5], NOT_HELD, None
        elif kind == KIND_LONG:
            if pending is not None:
                guest = LONG.unpack(EXIT.pack(*fields))[1]
        elif kind == KIND_HELD:
            if pending is not None:
                _k, _stops, low, seen, unseen, high = HELD.unpack(EXIT.pack(*fields))
                held = held_times(seen, unseen, low, high)
        elif kind == KIND_RIP:
            if pending is not None:
                rip = RIP.unpack(EXIT.pack(*fields))
        elif kind != KIND_DATA:
            raise ValueError(f"record {i} has kind {kind}: not an exit record")
    if pending is not None:
        yield start, len(records) // RECORD_SIZE, pending, guest, held, rip


class _Hist:
    __slots__ = ("count", "total", "low", "high", "buckets")

    def __init__(self) -> None:
        self.count = self.total = self.low = self.high = 0
        self.buckets: dict[int, int] = {}

    def add(self, ns: int) -> None:
        ns = max(0, ns)
        if self.count == 0 or ns < self.low:
            self.low = ns
        self.high = max(self.high, ns)
        self.count += 1
        self.total += ns
        bucket = bucket_of(ns)
        self.buckets[bucket] = self.buckets.get(bucket, 0) + 1

    def fields(self) -> tuple[int, int, int, int, tuple[int, ...]]:
        pairs = tuple(x for bucket in sorted(self.buckets) for x in (bucket, self.buckets[bucket]))
        return self.count, self.total, self.low, self.high, pairs


class _NetBound:
    """Sums of net handling less the most and the least the stops can have cost on average."""

    __slots__ = ("low", "high")

    def __init__(self) -> None:
        self.low = self.high = 0

    def add(self, handling: int, least: int, most: int) -> None:
        self.low += handling - most if most >= 0 else 0  # no most: the net is at least 0
        self.high += handling - least


class _VcpuPass:
    __slots__ = ("exits", "first_entry", "first_flags", "first_held", "last_exit", "last_group",
                 "last_key", "last_rip", "spans")  # fmt: skip

    def __init__(self, entry: int, flags: int, held: tuple[int, int, int], recent: int) -> None:
        self.exits = 0
        self.first_entry = entry
        self.first_flags = flags
        self.first_held = held
        self.last_exit = 0
        self.last_group: tuple[_Hist, _Hist, _Hist, _NetBound] | None = None
        self.last_key = (0, 0)
        self.last_rip: list[int] | None = None  # its last exit's entry in the RIP table
        self.spans: deque[tuple[int, int]] = deque(maxlen=recent)


def summarize(
    records: bytes | bytearray | memoryview, base_ns: int, recent_per_vcpu: int
) -> BatchSummary:
    recent = max(0, recent_per_vcpu)
    kvm_exit_io, kvm_exit_mmio = ExitReason.IO, ExitReason.MMIO
    groups: dict[tuple[int, int, int], tuple[_Hist, _Hist, _Hist, _NetBound, int]] = {}
    seconds: dict[tuple[int, int], int] = {}
    io: dict[tuple[int, int, bool, int], int] = {}
    mmio: dict[tuple[int, int, int, bool], int] = {}
    vcpus: dict[int, _VcpuPass] = {}
    rips: dict[tuple[int, int, int, int], list[int]] = {}  # -> [index, count, handlings, total]
    exits = 0
    first_exit = last_exit = None
    for start, end, fields, guest, held, rip in _exits(records):
        _kind, flags, vcpu, reason, t_exit, _guest, b, a = fields
        errno = 0
        write = bool(flags & F_WRITE)
        if flags & F_FAILED:
            errno, a, b, write = b, 0, 0, False
        elif flags & F_CYCLE and reason == 0:
            errno = RUN_UNSEEN
        exit_ns = base_ns + t_exit
        entry_ns = exit_ns - guest
        group = groups.get((vcpu, reason, errno))
        if group is None:
            group = groups[(vcpu, reason, errno)] = (
                _Hist(), _Hist(), _Hist(), _NetBound(), len(groups)
            )  # fmt: skip
        group[0].add(guest)
        state = vcpus.get(vcpu)
        if state is None:
            state = vcpus[vcpu] = _VcpuPass(entry_ns, flags, held, recent)
        elif not flags & F_CYCLE:
            assert state.last_group is not None
            handling = entry_ns - state.last_exit
            state.last_group[1].add(handling)
            if held[0] >= 0:
                state.last_group[2].add(handling - held[0])
                state.last_group[3].add(handling, held[1], held[2])
            if state.last_rip is not None:
                state.last_rip[2] += 1
                state.last_rip[3] += max(0, handling)
        state.exits += 1
        state.last_exit = exit_ns
        state.last_group = group[:4]
        state.last_key = (reason, errno)
        state.last_rip = None
        if rip is not None:
            _k, rip_flags, cpl, address, linear = rip
            site = (group[4], address, linear, cpl if rip_flags & R_SEGMENTS else -1)
            entry = rips.get(site)
            if entry is None:
                entry = rips[site] = [len(rips), 0, 0, 0]
            entry[1] += 1
            state.last_rip = entry
        if recent:
            state.spans.append((start, end))
        second = (group[4], exit_ns // NS)
        seconds[second] = seconds.get(second, 0) + 1
        if errno == 0:
            if reason == kvm_exit_io:
                port = (vcpu, a, write, b & 0xFF)
                io[port] = io.get(port, 0) + 1
            elif reason == kvm_exit_mmio:
                site = (vcpu, a, b, write)
                mmio[site] = mmio.get(site, 0) + 1
        exits += 1
        if first_exit is None:
            first_exit = exit_ns
        last_exit = exit_ns
    view = memoryview(records)
    return BatchSummary(
        exits,
        first_exit,
        last_exit,
        [
            GroupSummary(
                *key, *guest.fields(), *handling.fields(), *net.fields(), bound.low, bound.high
            )  # fmt: skip
            for key, (guest, handling, net, bound, _) in groups.items()
        ],
        [SecondSummary(g, s, n) for (g, s), n in seconds.items()],
        [IoSummary(*key, n) for key, n in io.items()],
        [MmioSummary(*key, n) for key, n in mmio.items()],
        [
            VcpuSummary(
                vcpu,
                s.exits,
                s.first_entry,
                s.first_flags,
                s.last_exit,
                *s.last_key,
                b"".join(view[a * RECORD_SIZE : z * RECORD_SIZE] for a, z in s.spans),
                len(s.spans),
                *s.first_held,
                -1 if s.last_rip is None else s.last_rip[0],
            )
            for vcpu, s in vcpus.items()
        ],
        [RipSummary(*site, *entry[1:]) for site, entry in rips.items()],
    )
