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
from kvmtop.abi.kvm import (
    COALESCED_ENTRY,
    COALESCED_ENTRY_SIZE,
    COALESCED_RING_HEAD,
    coalesced_mmio_max,
)
from kvmtop.abi.record_layout import C_PIO, C_UNREADABLE, C_WRAP, COALESCED, KIND_COALESCED

# the ring's entries in one page: KVM_COALESCED_MMIO_MAX, 170
RING_MAX = coalesced_mmio_max(HOST.PAGE_SIZE)


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
        self.first, self.last = COALESCED_RING_HEAD.unpack_from(
            ring
        )  # nothing before attach is counted

    def look(self, ring: bytes | memoryview, vcpu: int, t_rel: int, out: bytearray) -> None:
        """Append to ``out`` a COALESCED record per (address, pio, len) of the entries appended
        since the previous look. The common case (nothing new) reads two words."""
        first, last = COALESCED_RING_HEAD.unpack_from(ring)
        if last == self.last or last >= RING_MAX or first >= RING_MAX:
            self.first = first if first < RING_MAX else self.first
            return
        unseen_before = (self.last - self.first) % RING_MAX  # not yet consumed at the last look
        consumed = (first - self.first) % RING_MAX
        wrap = C_WRAP if consumed > unseen_before else 0
        groups: dict[tuple[int, int, int], int] = {}
        i = self.last
        while i != last:
            address, length, pio = COALESCED_ENTRY.unpack_from(
                ring, COALESCED_RING_HEAD.size + i * COALESCED_ENTRY_SIZE
            )
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
