"""Recording file speed and size: write and read N exits, and fold them into the aggregate.

python benchmarks/bench_recording.py [--exits 1000000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from kvmtop.aggregate.exits import ExitStats
from kvmtop.formats.recording import RecordingMeta, RecordingWriter, open_recording
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import ExitBatch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=1_000_000)
    n = parser.parse_args().exits
    start = 10**12
    events = [
        ExitEvent(i % 4, 2 if i % 3 else 6, 0, start + i * 1000, start + i * 1000 + 700,
                  0x80 if i % 3 else 0xC0000, 257 if i % 3 else 1, 1)
        for i in range(n)
    ]  # fmt: skip
    batches = [ExitBatch.of(events[i : i + 1000], start, stops=2000) for i in range(0, n, 1000)]
    meta = RecordingMeta(pid=1, argv=("bench",), launched=False, start_ns=start,
                         start_wall=time.time(), with_data=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.kvmtop")
        t0 = time.perf_counter()
        writer = RecordingWriter.create(path, meta, False)
        for batch in batches:
            writer.write_batch(batch)
        writer.close()
        write_s = time.perf_counter() - t0
        size = os.path.getsize(path)
        t0 = time.perf_counter()
        read = sum(b.exits for b in open_recording(path).batches())
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = sum(len(b.events) for b in open_recording(path).batches())
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats = ExitStats()
        for batch in open_recording(path).batches():
            stats.add_batch(batch)
        report_s = time.perf_counter() - t0
    assert read == decoded == n == stats.snapshot().total
    print(f"{n:,} exits, 4 vCPUs, IO and MMIO\n")
    print("| step | seconds | exits/s |")
    print("|---|---:|---:|")
    for name, secs in (
        ("write", write_s),
        ("read", read_s),
        ("read + one ExitEvent per exit (export)", decode_s),
        ("read + aggregate (report)", report_s),
    ):
        print(f"| {name} | {secs:.2f} | {n / secs:,.0f} |")
    print(f"\n{size:,} bytes: {size / n:.1f} bytes per exit")


if __name__ == "__main__":
    main()
