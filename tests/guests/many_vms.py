"""A batch of exits from three VMs, each with a vCPU 0: two in one process, one in another."""

from __future__ import annotations

from kvmtop.model.events import ExitEvent, ProcessSeen, VcpuSeen
from kvmtop.model.messages import ExitBatch
from kvmtop.model.vcpu_keys import OTHER_VMS_FROM, VcpuKey

START = 5_000_000_000


def many_vms_batch(start: int = START) -> ExitBatch:
    """Two processes; the first with two VMs, each with a vCPU 0; the second with vCPU 0."""
    keys = [VcpuKey(100, 4, 0), VcpuKey(100, 7, 0), VcpuKey(200, 5, 0)]
    slots = [0, OTHER_VMS_FROM, OTHER_VMS_FROM + 1]
    events = [ExitEvent(slot, 2, 0, start + 10 * i, start + 10 * i + 5, 0x80, 1, 1)
              for i, slot in enumerate(slots * 3)]  # fmt: skip
    processes = (
        ProcessSeen(100, 1, ("vmm-a", "--two"), start),
        ProcessSeen(200, 100, ("vmm-b",), start),
    )
    seen = tuple(VcpuSeen(s, 1000 + s, start, k) for s, k in zip(slots, keys, strict=True))
    batch = ExitBatch.of(events, start, seen)
    return ExitBatch(batch.records, start, seen, processes=processes)
