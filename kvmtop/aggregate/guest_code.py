"""Which guest code makes the exits (``--rip``): per vCPU and for the VM, each exit reason's
guest RIPs by exits and by the VMM's time handling them, in bounded tables (Space-Saving beyond
``capacity`` keys, as the IO ports are). Fed with a batch's records; costs a pass over a batch
only when it holds RIP records. Pure: no I/O, no names (symbols are the views' business).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from kvmtop.abi.record_layout import (
    EXIT,
    F_CYCLE,
    F_FAILED,
    KIND_EXIT,
    KIND_LONG,
    KIND_RIP,
    LONG,
    R_SEGMENTS,
    RECORD_SIZE,
    RIP,
    RUN_UNSEEN,
)
from kvmtop.aggregate.top_counter import TopCounter

_KIND_RIP = bytes([KIND_RIP])
_GUEST = struct.Struct("<I")  # an EXIT record's guest_ns, at byte 16


@dataclass(frozen=True, slots=True)
class RipCount:
    """One guest code address of one exit reason: its exits and the VMM's time handling them
    (-1: not known: one-stop tracing, or the time's table dropped it)."""

    label: str  # decoder.exit_label()
    rip: int
    linear: int  # cs.base + rip outside 64-bit code
    cpl: int  # -1: not known
    count: int
    vmm_ns: int
    error: int = 0  # the count may be this much too high (a bounded table's): 0 is exact


class GuestCode:
    """The RIP tables of one vCPU or of the VM."""

    __slots__ = ("exits", "times")

    def __init__(self, capacity: int) -> None:
        self.exits = TopCounter(capacity)  # (label, rip, linear, cpl) -> exits
        self.times = TopCounter(capacity)  # ...-> the VMM's ns handling them

    def top(self, n: int | None, by_time: bool = False) -> tuple[RipCount, ...]:
        """The heaviest ``n`` (None: all), by exits or by the VMM's time."""
        exits, times = self.exits.counts, self.times.counts
        ranked = (self.times if by_time else self.exits).top(n)
        return tuple(
            RipCount(*key, exits.get(key, 0), times.get(key, -1), self.exits.errors.get(key, 0))
            for key, _ in ranked
        )


class GuestCodeCounts:
    """Every vCPU's tables and the VM's; the exit whose handling is still open, per vCPU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.vm = GuestCode(capacity)
        self.vcpus: dict[int, GuestCode] = {}
        self._open: dict[int, tuple[tuple[str, int, int, int], int]] = {}  # vcpu -> (key, exit)
        self.seen = False  # some exit carried a RIP

    def of(self, vcpu: int) -> GuestCode:
        found = self.vcpus.get(vcpu)
        if found is None:
            found = self.vcpus[vcpu] = GuestCode(self.capacity)
        return found

    def add(self, records: bytes | bytearray | memoryview, base_ns: int, label_of: Any) -> None:
        """A batch's records (time order per vCPU); ``label_of(reason, errno)`` names a reason."""
        view = memoryview(records)
        kinds = bytes(view[0::RECORD_SIZE])
        if _KIND_RIP not in kinds:
            return
        self.seen = True
        exit_at = rip_at = -1
        guest = 0
        for i, kind in enumerate(kinds):
            if kind == KIND_EXIT:
                if exit_at >= 0:
                    self._count(view, exit_at, guest, rip_at, base_ns, label_of)
                exit_at, rip_at = i, -1
                guest = _GUEST.unpack_from(view, i * RECORD_SIZE + 16)[0]
            elif kind == KIND_LONG:
                guest = LONG.unpack_from(view, i * RECORD_SIZE)[1]
            elif kind == KIND_RIP:
                rip_at = i
        if exit_at >= 0:
            self._count(view, exit_at, guest, rip_at, base_ns, label_of)

    def _count(self, view: memoryview, at: int, guest: int, rip_at: int, base_ns: int,
               label_of: Any) -> None:  # fmt: skip
        """One exit (its RIP record at ``rip_at``, -1: none): counted, and the end of its
        vCPU's previous exit's handling."""
        _kind, flags, vcpu, reason, t_exit, _g, b, _a = EXIT.unpack_from(view, at * RECORD_SIZE)
        exit_ns = base_ns + t_exit
        last = self._open.pop(vcpu, None)
        tables = (self.of(vcpu), self.vm)
        if last is not None and not flags & F_CYCLE:  # the previous exit's handling ends here
            handling = max(0, exit_ns - guest - last[1])
            for table in tables:
                table.times.add(last[0], handling)
        if rip_at < 0:
            return
        _k, rflags, cpl, rip, linear = RIP.unpack_from(view, rip_at * RECORD_SIZE)
        errno = b if flags & F_FAILED else (RUN_UNSEEN if flags & F_CYCLE and reason == 0 else 0)
        key = (label_of(reason, errno), rip, linear, cpl if rflags & R_SEGMENTS else -1)
        for table in tables:
            table.exits.add(key, 1)
        self._open[vcpu] = (key, exit_ns)

    def reset(self) -> None:
        self.vm = GuestCode(self.capacity)
        self.vcpus = {}
        self._open = {}
