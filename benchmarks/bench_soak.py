"""kvmtop's memory after minutes at the highest exit rate, with the TUI open.

    python benchmarks/bench_soak.py [--minutes 10] [--every 60]

A QEMU guest makes port-IO exits as fast as it can, without end; the TUI (headless, through
Textual's test driver, which still composes every frame) attaches to it and shows the attached
view, with a vCPU's drill-down opened and closed every few seconds. kvmtop's RSS (this process:
the TUI, the tracer and the aggregate) is sampled as it goes. The aggregate is bounded by design
(60 s rings, fixed histograms, capped top tables): RSS must level off, not grow with the exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from guests.qemu_bios import qemu_command, write_bios  # noqa: E402
from helpers import wait_for_vcpus  # noqa: E402

from kvmtop.app import KvmtopApp  # noqa: E402
from kvmtop.sources.session import SessionState  # noqa: E402

ENDLESS = 2**32 - 1  # `out 0x80` exits: about 40 hours at the traced rate


async def soak(pid: int, minutes: float, every: float) -> list[tuple[float, int, float]]:
    """(seconds, exits so far, RSS in MiB) samples."""
    me = psutil.Process()
    samples = []
    app = KvmtopApp(pid=pid)
    async with app.run_test(size=(140, 42)) as pilot:
        while app.session is None or app.session.state is not SessionState.ATTACHED:
            await asyncio.sleep(0.1)
        started = time.monotonic()
        next_sample = 0.0
        while (elapsed := time.monotonic() - started) < minutes * 60:
            if elapsed >= next_sample:
                rss = me.memory_info().rss / 2**20
                samples.append((elapsed, app.session.stats.total, rss))
                print(f"{elapsed:6.0f} s  {app.session.stats.total:>12,} exits  {rss:7.1f} MiB",
                      flush=True)  # fmt: skip
                next_sample += every
            await pilot.press("enter")  # the vCPU's drill-down, with its live exit log
            await asyncio.sleep(2)
            await pilot.press("escape")
            await asyncio.sleep(2)
        await pilot.press("q")
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--every", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bios = write_bios(os.path.join(tmp, "endless.bin"), outs=ENDLESS)
        vmm = subprocess.Popen(qemu_command(bios), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for_vcpus(vmm.pid)
            samples = asyncio.run(soak(vmm.pid, args.minutes, args.every))
        finally:
            vmm.kill()
            vmm.wait()
    (t0, n0, _), (t1, n1, rss_end) = samples[0], samples[-1]
    peak = max(rss for _, _, rss in samples)
    print(f"\n{n1:,} exits in {t1:.0f} s ({(n1 - n0) / max(1e-9, t1 - t0):,.0f}/s); "
          f"RSS at the end {rss_end:.1f} MiB, peak {peak:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
