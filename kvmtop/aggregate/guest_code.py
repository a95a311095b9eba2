"""Which guest code makes the exits (``--rip``): per vCPU and for the VM, each exit reason's
guest RIPs by exits and by the VMM's time handling them, in bounded tables (Space-Saving beyond
``capacity`` keys, as the IO ports are). Fed with a batch's summary
(:mod:`kvmtop.aggregate.batch_summary`: the exits counted per address in its one pass), at a
cost per address, never per exit. Pure: no I/O, no names (symbols are the views' business).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmtop.abi.record_layout import F_CYCLE
from kvmtop.aggregate.batch_summary import BatchSummary
from kvmtop.aggregate.top_counter import TopCounter


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

    def add(self, summed: BatchSummary, label_of: Any) -> None:
        """A batch's summary (its ``rips``, counted in its one pass); ``label_of(reason, errno)``
        names a reason. Each vCPU's first exit ends the handling its last one left open."""
        if not summed.rips and not self._open:
            return
        self.seen = self.seen or bool(summed.rips)
        keys = []
        for site in summed.rips:
            group = summed.groups[site.group]
            key = (label_of(group.reason, group.errno), site.rip, site.linear, site.cpl)
            keys.append(key)
            for table in (self.of(group.vcpu), self.vm):
                table.exits.add(key, site.count)
                if site.handling_count:
                    table.times.add(key, site.handling_total)
        for vcpu in summed.vcpus:
            last = self._open.pop(vcpu.vcpu, None)
            if last is not None and not vcpu.first_flags & F_CYCLE:
                handling = max(0, vcpu.first_entry_ns - last[1])
                for table in (self.of(vcpu.vcpu), self.vm):
                    table.times.add(last[0], handling)
            if vcpu.last_rip >= 0:
                self._open[vcpu.vcpu] = (keys[vcpu.last_rip], vcpu.last_exit_ns)

    def reset(self) -> None:
        self.vm = GuestCode(self.capacity)
        self.vcpus = {}
        self._open = {}
