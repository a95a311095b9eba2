"""What the aggregate costs per exit: ExitStats.add_batch on 4096-exit batches of packed records,
with the C summary (kvmtop.native._summary) and in pure Python, without and with a RIP record on
every exit (``--rip``: 16 guest code addresses), and RecordingWriter.write_batch.

python benchmarks/bench_aggregate.py [--batches 200]

The mix is a busy guest's: 2 vCPUs, IO on a few ports (in and out), MMIO on two addresses,
EINTR kicks and HLT.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import tempfile
import time

from kvmtop.aggregate import batch_summary as summary
from kvmtop.aggregate.exits import ExitStats
from kvmtop.formats.recording import RecordingMeta, RecordingWriter
from kvmtop.model.events import ExitEvent, GuestRip
from kvmtop.model.messages import ExitBatch
from kvmtop.native import load

BATCH = 4096
START = 10**12


def batches(n: int, rip: bool = False) -> list[ExitBatch]:
    rng = random.Random(1)
    sites = [GuestRip(0x1000 + 7 * i, 0xF1000 + 7 * i, 0) for i in range(16)]
    t = [START, START + 300]
    out = []
    for _ in range(n):
        events = []
        for i in range(BATCH):
            vcpu = i % 2
            guest = rng.randrange(2_000, 40_000)
            entry = t[vcpu] + rng.randrange(1_000, 9_000)
            t[vcpu] = entry + guest
            kind = rng.random()
            if kind < 0.6:
                port = rng.choice((0x3F8, 0x3FD, 0xCF8, 0xCFC, 0x80))
                e = ExitEvent(vcpu, 2, 0, entry, t[vcpu], port, 1 | 1 << 8, int(kind < 0.3))
            elif kind < 0.85:
                address = rng.choice((0xFEE00300, 0xD0010))
                e = ExitEvent(vcpu, 6, 0, entry, t[vcpu], address, 4, int(kind < 0.7))
            elif kind < 0.95:
                e = ExitEvent(vcpu, 10, 4, entry, t[vcpu])  # EINTR
            else:
                e = ExitEvent(vcpu, 5, 0, entry, t[vcpu])  # HLT
            if rip:
                e = dataclasses.replace(e, rip=rng.choice(sites))
            events.append(e)
        out.append(ExitBatch.of(events, START, stops=2 * BATCH))
    return out


def add_batch_us(work: list[ExitBatch]) -> float:
    stats = ExitStats()
    t0 = time.perf_counter()
    for batch in work:
        stats.add_batch(batch)
    seconds = time.perf_counter() - t0
    assert stats.snapshot().total == len(work) * BATCH
    return seconds * 1e6 / (len(work) * BATCH)


def write_batch_us(work: list[ExitBatch]) -> float:
    meta = RecordingMeta(pid=1, argv=("bench",), launched=False, start_ns=START,
                         start_wall=time.time(), with_data=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        writer = RecordingWriter.create(os.path.join(tmp, "r.kvmtop"), meta, False)
        t0 = time.perf_counter()
        for batch in work:
            writer.write_batch(batch)
        seconds = time.perf_counter() - t0
        writer.close()
    return seconds * 1e6 / (len(work) * BATCH)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=200)
    count = parser.parse_args().batches
    work, with_rips = batches(count), batches(count, rip=True)
    print(f"{len(work)} batches of {BATCH} exits, 2 vCPUs, IO/MMIO/INTR/HLT\n")
    print("| step | µs per exit |")
    print("|---|---:|")
    for name, batch_list in (("", work), (", a RIP on every exit", with_rips)):
        if load("_summary") is None:
            print(f"| ExitStats.add_batch{name}, C summary | (kvmtop.native._summary not built) |")
        else:
            print(f"| ExitStats.add_batch{name}, C summary | {add_batch_us(batch_list):.3f} |")
        os.environ["KVMTOP_PURE"] = "1"  # ExitStats picks its summary when it is made
        print(f"| ExitStats.add_batch{name}, pure Python | {add_batch_us(batch_list):.3f} |")
        del os.environ["KVMTOP_PURE"]
    t0 = time.perf_counter()
    for batch in work:
        summary.summarize(batch.records, batch.base_ns, 2000)
    pure_summary = (time.perf_counter() - t0) * 1e6 / (len(work) * BATCH)
    print(f"| summary.summarize alone, pure Python | {pure_summary:.3f} |")
    print(f"| RecordingWriter.write_batch | {write_batch_us(work):.3f} |")


if __name__ == "__main__":
    main()
