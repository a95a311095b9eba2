"""A watch that always gives the same snapshot: 4 vCPUs, sampled 1000 times a second for one
second, with KVM's counters, for pictures of the watch view that never vary. The snapshot is
computed by kvmtop.sampling.shares from a hand-made tally, as the watcher's are."""

from __future__ import annotations

from collections import deque

from kvmtop.model.vcpu_keys import VcpuKey
from kvmtop.sampling.entry_cost import EntryCost
from kvmtop.sampling.shares import Tally, WatchedVcpu, WatchSnapshot, estimate

PID = 4242
IO, HLT, MMIO = 2, 5, 6
OUT = 1 << 16  # an IO key's direction bit

# per vCPU: (samples, in KVM_RUN, [(reason, port or address, looks)])
LOOKS = [
    (1000, 540, [(IO, 0x80 | OUT, 300), (IO, 0x3F8 | OUT, 90), (MMIO, 0xFEE00300, 50),
                 (HLT, 0, 20)]),
    (1000, 910, [(IO, 0xCF8 | OUT, 40), (IO, 0xCFC, 30), (MMIO, 0xFEBD1000, 20)]),
    (1000, 980, [(HLT, 0, 15), (IO, 0x70 | OUT, 5)]),
    (1000, 120, [(MMIO, 0xFEBD1000, 700), (MMIO, 0xFEBD1004, 150), (IO, 0x80 | OUT, 30)]),
]  # fmt: skip
RATES = [
    {"exits": 12_400, "io_exits": 8_100, "mmio_exits": 1_900, "halt_exits": 40},
    {"exits": 3_050, "io_exits": 700, "mmio_exits": 310, "halt_exits": 900},
    {"exits": 410, "io_exits": 12, "mmio_exits": 0, "halt_exits": 380},
    {"exits": 45_000, "io_exits": 600, "mmio_exits": 44_000, "halt_exits": 0},
]
ENTRY = EntryCost(8_600.0, 500.0, 3000)  # KVM's part of each exit, as timed on a host


def history(i: int) -> deque[float]:
    """60 s of vCPU ``i``'s VMM share: a slow wave, different on each vCPU."""
    mean = 1 - LOOKS[i][1] / LOOKS[i][0]
    return deque((min(1.0, mean * (0.6 + 0.4 * ((s * (i + 1)) % 17) / 8)) for s in range(60)),
                 maxlen=60)  # fmt: skip


def fixed_snapshot() -> WatchSnapshot:
    tally = Tally(len(LOOKS))
    tally.add(
        (
            1_000_000_000,
            1000,
            [(n, in_run, list(keys), 0, None, []) for n, in_run, keys in LOOKS],
            0,
        )
    )
    vcpus = tuple(WatchedVcpu(str(i), VcpuKey(PID, 3, i), i) for i in range(len(LOOKS)))
    whole = {name: float(sum(r[name] for r in RATES)) for name in RATES[0]}
    return estimate(PID, 1000.0, tally, vcpus, {i: dict(r) for i, r in enumerate(RATES)}, whole,
                    {i: history(i) for i in range(len(LOOKS))}, counters=True,
                    entry=ENTRY)  # fmt: skip


class FixedWatcher:
    """What the watch view needs of a :class:`kvmtop.sampling.watcher.Watcher`."""

    alive = True

    def __init__(self, pid: int, rate_hz: float) -> None:
        self.pid = pid

    def snapshot(self) -> WatchSnapshot:
        return fixed_snapshot()

    def close(self) -> None:
        pass
