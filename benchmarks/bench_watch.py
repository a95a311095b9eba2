"""Does `kvmtop watch` slow its guest, and what does its sampler cost? The same QEMU guest,
alternating: untraced, watched at 1 kHz, watched at 10 kHz (the sampler of kvmtop.watcher, no
attach); then the sampler's CPU time per vCPU on a 4-vCPU QEMU at each rate.

    python benchmarks/bench_watch.py [--exits 200000] [--rounds 3] [--seconds 3]

Each run's time is QEMU's wall time, start to exit; the guest spins ~1 s first (the watch
starts meanwhile), then makes N port-IO exits; the rate is N over the time beyond a guest that
only spins. KVMTOP_PURE=1 measures the Python sampler instead of the C one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from conftest import wait_for_vcpus  # noqa: E402
from guests.qemu_bios import qemu_command, write_bios  # noqa: E402

from kvmtop.watcher import Watcher  # noqa: E402

SPIN = 2_000_000
RATES = (1000, 10_000)


def run(bios: str, rate_hz: int | None) -> float:
    """QEMU's wall time, watched at ``rate_hz`` (None: untraced)."""
    started = time.monotonic()
    vmm = subprocess.Popen(qemu_command(bios), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    if rate_hz is None:
        vmm.wait()
        return time.monotonic() - started
    wait_for_vcpus(vmm.pid)
    with Watcher(vmm.pid, rate_hz, counters=False) as watcher:
        vmm.wait()
        elapsed = time.monotonic() - started
        snap = watcher.snapshot()
    assert snap.looks > 0
    return elapsed


def sampler_cpu(bios: str, rate_hz: int, vcpus: int, seconds: float) -> tuple[float, float]:
    """(CPU seconds per second per vCPU, looks per second) of a watch of an idle guest."""
    vmm = subprocess.Popen(qemu_command(bios, "-smp", str(vcpus)), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_vcpus(vmm.pid, vcpus)
        with Watcher(vmm.pid, rate_hz, counters=False) as watcher:
            cpu, wall = time.process_time(), time.monotonic()
            time.sleep(seconds)
            cpu, wall = time.process_time() - cpu, time.monotonic() - wall
            snap = watcher.snapshot()
        return cpu / wall / vcpus, snap.looks / snap.seconds
    finally:
        vmm.kill()
        vmm.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    columns = ["spin only", "untraced", *(f"watched {r // 1000} kHz" for r in RATES)]
    times: dict[str, list[float]] = {c: [] for c in columns}
    with tempfile.TemporaryDirectory() as tmp:
        busy = write_bios(os.path.join(tmp, "busy.bin"), args.exits, spin_iterations=SPIN)
        spin = write_bios(os.path.join(tmp, "spin.bin"), 0, spin_iterations=SPIN)
        idle = write_bios(os.path.join(tmp, "idle.bin"), 0, spin_iterations=10**9)
        for _ in range(args.rounds):  # alternate, so drift hits every column alike
            times["spin only"].append(run(spin, None))
            times["untraced"].append(run(busy, None))
            for rate, column in zip(RATES, columns[2:], strict=True):
                times[column].append(run(busy, rate))
        cpu = {rate: sampler_cpu(idle, rate, 4, args.seconds) for rate in RATES}
    base = statistics.median(times["spin only"])
    rate_of = {c: args.exits / max(1e-6, statistics.median(times[c]) - base) for c in columns[1:]}
    sampler = "Python" if os.environ.get("KVMTOP_PURE") else "C"
    print(f"QEMU guest, {args.exits} port-IO exits after a spin, {args.rounds} alternating rounds,"
          f" medians; {sampler} sampler\n")  # fmt: skip
    print("| run | wall s | exits/s | vs untraced |\n|---|---:|---:|---:|")
    for c in columns[1:]:
        print(f"| {c} | {statistics.median(times[c]):.3f} | {rate_of[c]:,.0f} |"
              f" {rate_of[c] / rate_of['untraced']:.3f}x |")  # fmt: skip
    print(f"\nSampler CPU, a 4-vCPU QEMU watched {args.seconds:g} s\n")
    print("| rate | looks/s | CPU per vCPU |\n|---|---:|---:|")
    for rate, (per_vcpu, looks) in cpu.items():
        print(f"| {rate // 1000} kHz | {looks:,.0f} | {100 * per_vcpu:.2f}% of a core |")


if __name__ == "__main__":
    main()
