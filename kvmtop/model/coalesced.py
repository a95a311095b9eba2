"""KVM's coalesced MMIO/PIO ring: guest writes that never exit, and the COALESCED records that
count them (docs/recording-format.md, kind 10).

A VMM may register zones (``KVM_REGISTER_COALESCED_MMIO``; port IO with ``KVM_CAP_COALESCED_PIO``,
as QEMU does for the RTC index port 0x70) whose writes KVM queues in a ring instead of exiting;
the VMM drains the ring later. The ring is the VM's: one page, mapped by every vCPU fd at
``KVM_COALESCED_MMIO_PAGE_OFFSET``. KVM appends at ``last``, the VMM consumes from ``first``.
kvmtop tracks ``last`` itself and, at each exit it sees, counts the entries appended since its
previous look at that VM's ring; the entries do not say which vCPU wrote them, so they are
counted for the vCPU whose exit was being looked at (exact for a VM of one vCPU).

Pure: bytes in, values out. :class:`RingLook` is the reference for the C engine's ``ring_look``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from kvmtop.abi.arch import HOST

KIND_COALESCED = 10
# kind, flags, vcpu, len, t (- start_ns), count, pad, address: the EXIT record's shape
COALESCED = struct.Struct("<BBHIqIIQ")
C_PIO = 0x01  # port IO (the entry's pio field), else MMIO
C_WRAP = 0x02  # the VMM drained entries appended since kvmtop's previous look: a whole turn
# of the ring (RING_MAX more entries) between the two looks cannot be ruled out (set on the
# first record of such a look)
C_UNREADABLE = 0x04  # this vCPU's ring cannot be read (no mapping of it): nothing is counted

# include/uapi/linux/kvm.h: struct kvm_coalesced_mmio_ring {__u32 first, last; entries[]},
# struct kvm_coalesced_mmio {__u64 phys_addr; __u32 len; __u32 pio (was pad); __u8 data[8]}
RING_HEAD = struct.Struct("<II")
ENTRY = struct.Struct("<QII")  # phys_addr, len, pio (data[8] follows)
ENTRY_SIZE = 24
RING_MAX = (HOST.PAGE_SIZE - RING_HEAD.size) // ENTRY_SIZE  # KVM_COALESCED_MMIO_MAX: 170

assert COALESCED.size == 32


@dataclass(frozen=True, slots=True)
class CoalescedWrites:
    """Writes to one address (or port) that KVM queued without an exit, seen at one look."""

    vcpu: int
    pio: bool
    address: int
    length: int
    count: int
    t_ns: int  # the look: the exit (two stops) or next entry (one stop) they were seen at
    wrap: bool = False  # a whole turn of the ring may have gone unseen before this look
    unreadable: bool = False  # no ring to read for this vCPU: count is 0


class RingLook:
    """One VM's ring as kvmtop last looked at it (its vCPUs share it)."""

    __slots__ = ("first", "last")

    def __init__(self, ring: bytes | memoryview) -> None:
        self.first, self.last = RING_HEAD.unpack_from(ring)  # nothing before attach is counted

    def look(self, ring: bytes | memoryview, vcpu: int, t_rel: int, out: bytearray) -> None:
        """Append to ``out`` a COALESCED record per (address, pio, len) of the entries appended
        since the previous look. The common case (nothing new) reads two words."""
        first, last = RING_HEAD.unpack_from(ring)
        if last == self.last or last >= RING_MAX or first >= RING_MAX:
            self.first = first if first < RING_MAX else self.first
            return
        unseen_before = (self.last - self.first) % RING_MAX  # not yet consumed at the last look
        consumed = (first - self.first) % RING_MAX
        wrap = C_WRAP if consumed > unseen_before else 0
        groups: dict[tuple[int, int, int], int] = {}
        i = self.last
        while i != last:
            address, length, pio = ENTRY.unpack_from(ring, RING_HEAD.size + i * ENTRY_SIZE)
            key = (address, 1 if pio else 0, length)
            groups[key] = groups.get(key, 0) + 1
            i = (i + 1) % RING_MAX
        for (address, pio, length), n in groups.items():
            flags = (C_PIO if pio else 0) | wrap
            out += COALESCED.pack(KIND_COALESCED, flags, vcpu, length, t_rel, n, 0, address)
            wrap = 0  # flagged once a look, on its first record
        self.first, self.last = first, last


def unreadable_record(vcpu: int, t_rel: int) -> bytes:
    return COALESCED.pack(KIND_COALESCED, C_UNREADABLE, vcpu, 0, t_rel, 0, 0, 0)


def iter_coalesced(
    records: bytes | bytearray | memoryview, base_ns: int
) -> Iterator[CoalescedWrites]:
    """The COALESCED records among ``records`` (others are passed over), times absolute."""
    for kind, flags, vcpu, length, t, count, _pad, address in COALESCED.iter_unpack(records):
        if kind == KIND_COALESCED:
            yield CoalescedWrites(vcpu, bool(flags & C_PIO), address, length, count, base_ns + t,
                                  bool(flags & C_WRAP), bool(flags & C_UNREADABLE))  # fmt: skip


def split_coalesced(records: bytes, t_rel: int) -> tuple[bytes, bytes]:
    """COALESCED records (in time order) up to ``t_rel``, and those after."""
    for i in range(0, len(records), COALESCED.size):
        if struct.unpack_from("<q", records, i + 8)[0] > t_rel:
            return records[:i], records[i:]
    return records, b""


def rebase_coalesced(records: bytes, shift: int) -> bytes:
    """The same COALESCED records with ``shift`` ns added to their times."""
    if not shift:
        return records
    out = bytearray(records)
    for i in range(0, len(out), COALESCED.size):
        t = struct.unpack_from("<q", out, i + 8)[0]
        struct.pack_into("<q", out, i + 8, t + shift)
    return bytes(out)
