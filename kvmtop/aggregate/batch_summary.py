"""A batch's exit records grouped in one pass, for the aggregate to merge at a cost per key, not
per exit: the pure-Python twin of ``kvmtop/native/summary.c`` (module ``kvmtop.native._summary``),
which must return exactly the same values.

``summarize(records, base_ns, recent_per_vcpu)`` takes EXIT records each followed by its LONG,
DATA and HELD records (:mod:`kvmtop.model.records`; LONG or DATA before the first EXIT are passed over),
t_exit relative to ``base_ns`` (an int64 ns), and returns a :data:`Summary`:

``(exits, first_exit_ns, last_exit_ns, groups, seconds, io, mmio, vcpus)``

- ``exits``: the number of EXIT records; ``first_exit_ns``/``last_exit_ns``: the absolute exit
  times of the first and last (None when there are none);
- ``groups``: per (vcpu, reason, errno), in order of first appearance,
  ``(vcpu, reason, errno, count, guest_total, guest_min, guest_max, guest_buckets,
  handling_count, handling_total, handling_min, handling_max, handling_buckets, the same five
  of net handling, net_low_total, net_high_total)``; a failed run
  (F_FAILED) has errno = its b and no details; the buckets are sparse, a flat tuple of
  (bucket, count) pairs in bucket order for the buckets not empty, the bucket of ns being
  :func:`bucket_of` (negative ns counted as 0); handling is
  the entry time of an exit minus the previous exit time of the same vCPU in this batch, counted
  in the previous exit's group, and not for exits with F_CYCLE; net handling is handling minus
  the time the exit's HELD record says the thread was stopped for the tracer (only exits with
  one); min and max are 0 when empty; ``net_low_total`` and ``net_high_total`` sum, over the same
  exits, handling less the most and the least that time can have been on average (seen, plus
  HELD's unseen_high and unseen_low; with no most, unseen_high 0, the exit adds 0 to the low
  total), not cut at 0: the mean net handling lies between their means (docs/engine.md);
- ``seconds``: ``(group index, exit_ns // 10**9, count)``, in order of first appearance;
- ``io``: ``(vcpu, port, write, size, count)`` for KVM_EXIT_IO with errno 0 (size = b & 0xFF);
- ``mmio``: ``(vcpu, address, length, write, count)`` for KVM_EXIT_MMIO with errno 0;
- ``vcpus``: in order of first appearance, ``(vcpu, exits, first_entry_ns, first_flags,
  last_exit_ns, last_reason, last_errno, recent, recent_exits, first_held_ns, first_held_least_ns,
  first_held_most_ns)``: the record flags of its first exit and its held ns (-1: no HELD record;
  most -1: no HELD record or no most) for the pair across batches, and
  ``recent``, the records of its last ``recent_per_vcpu`` exits (each with its LONG, DATA and
  HELD records), ``recent_exits`` of them.

A record of another kind raises ValueError, as does a length that is not a whole number of
records. Pure; no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

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
    LONG,
    RECORD_SIZE,
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

Summary = tuple[
    int,
    int | None,
    int | None,
    list[tuple[Any, ...]],
    list[tuple[int, int, int]],
    list[tuple[int, int, bool, int, int]],
    list[tuple[int, int, int, bool, int]],
    list[tuple[Any, ...]],
]


def check_records(records: bytes | bytearray | memoryview) -> None:
    if len(records) % RECORD_SIZE:
        raise ValueError(f"{len(records)} bytes are not a whole number of records")


NOT_HELD = (-1, -1, -1)


def held_times(seen: int, unseen: int, unseen_low: int, unseen_high: int) -> tuple[int, int, int]:
    """A HELD record's time stopped for the tracer: (estimated, least, most; -1: no most)."""
    return seen + unseen, seen + unseen_low, seen + unseen_high if unseen_high else -1


def _exits(
    records: bytes | bytearray | memoryview,
) -> Iterator[tuple[int, int, Any, int, tuple[int, int, int]]]:
    """(first record, record after its last, EXIT fields, guest ns, held_times or NOT_HELD) per
    exit."""
    check_records(records)
    pending: Any = None
    start = guest = 0
    held = NOT_HELD
    for i, fields in enumerate(EXIT.iter_unpack(records)):
        kind = fields[0]
        if kind == KIND_EXIT:
            if pending is not None:
                yield start, i, pending, guest, held
            pending, start, guest, held = fields, i, fields[5], NOT_HELD
        elif kind == KIND_LONG:
            if pending is not None:
                guest = LONG.unpack(EXIT.pack(*fields))[1]
        elif kind == KIND_HELD:
            if pending is not None:
                _k, _stops, low, seen, unseen, high = HELD.unpack(EXIT.pack(*fields))
                held = held_times(seen, unseen, low, high)
        elif kind != KIND_DATA:
            raise ValueError(f"record {i} has kind {kind}: not an exit record")
    if pending is not None:
        yield start, len(records) // RECORD_SIZE, pending, guest, held


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
                 "last_key", "spans")  # fmt: skip

    def __init__(self, entry: int, flags: int, held: tuple[int, int, int], recent: int) -> None:
        self.exits = 0
        self.first_entry = entry
        self.first_flags = flags
        self.first_held = held
        self.last_exit = 0
        self.last_group: tuple[_Hist, _Hist, _Hist, _NetBound] | None = None
        self.last_key = (0, 0)
        self.spans: deque[tuple[int, int]] = deque(maxlen=recent)


def summarize(
    records: bytes | bytearray | memoryview, base_ns: int, recent_per_vcpu: int
) -> Summary:
    recent = max(0, recent_per_vcpu)
    kvm_exit_io, kvm_exit_mmio = ExitReason.IO, ExitReason.MMIO
    groups: dict[tuple[int, int, int], tuple[_Hist, _Hist, _Hist, _NetBound, int]] = {}
    seconds: dict[tuple[int, int], int] = {}
    io: dict[tuple[int, int, bool, int], int] = {}
    mmio: dict[tuple[int, int, int, bool], int] = {}
    vcpus: dict[int, _VcpuPass] = {}
    exits = 0
    first_exit = last_exit = None
    for start, end, fields, guest, held in _exits(records):
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
        state.exits += 1
        state.last_exit = exit_ns
        state.last_group = group[:4]
        state.last_key = (reason, errno)
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
    return (
        exits,
        first_exit,
        last_exit,
        [
            (*key, *guest.fields(), *handling.fields(), *net.fields(), bound.low, bound.high)
            for key, (guest, handling, net, bound, _) in groups.items()
        ],
        [(g, s, n) for (g, s), n in seconds.items()],
        [(*key, n) for key, n in io.items()],
        [(*key, n) for key, n in mmio.items()],
        [
            (
                vcpu,
                s.exits,
                s.first_entry,
                s.first_flags,
                s.last_exit,
                *s.last_key,
                b"".join(view[a * RECORD_SIZE : z * RECORD_SIZE] for a, z in s.spans),
                len(s.spans),
                *s.first_held,
            )
            for vcpu, s in vcpus.items()
        ],
    )
