"""Does `kvmtop watch` slow its guest, and what does its sampler cost? One QEMU guest looping on
`out 0x80`, its exit rate from KVM's counters over short windows, alternating: untraced, watched
at 1 kHz, watched at 10 kHz (the sampler of kvmtop.sampling.watcher); then the sampler's CPU time per
vCPU on a 4-vCPU QEMU at each rate.

    python benchmarks/bench_watch.py [--rounds 10] [--window 1] [--seconds 3]

Windows alternate within each round, so the host's drift (other load) hits every column alike;
the table gives each column's median, and the median over rounds of its ratio to the
round's untraced window. The counters' fds are taken once, before the first
window (a brief attach); the watches take none. KVMTOP_PURE=1 measures the Python sampler.
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

from guests.qemu_bios import qemu_command, write_bios  # noqa: E402
from helpers import wait_for_vcpus  # noqa: E402

from kvmtop.counters.taking import take_stats
from kvmtop.counters.vm_stats import VmStats  # noqa: E402
from kvmtop.sampling.watcher import Watcher  # noqa: E402

RATES = (1000, 10_000)
ENDLESS = 0xFFFFFFFF  # outs: hours at this host's rate


def exits(stats: VmStats) -> int:
    return sum(int(v["exits"]) for v in stats.sample().vcpus.values())  # type: ignore[call-overload]


def window(pid: int, stats: VmStats, rate_hz: int | None, seconds: float) -> float:
    """The guest's exits per second over ``seconds``, watched at ``rate_hz`` (None: not)."""
    if rate_hz is None:
        before, started = exits(stats), time.monotonic()
        time.sleep(seconds)
        return (exits(stats) - before) / (time.monotonic() - started)
    with Watcher(pid, rate_hz, counters=False) as watcher:
        before, started = exits(stats), time.monotonic()
        time.sleep(seconds)
        rate = (exits(stats) - before) / (time.monotonic() - started)
        assert watcher.snapshot().vcpus[0].by_reason.get("KVM_EXIT_IO")
    return rate


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
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--window", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    columns: dict[str, int | None] = {
        "untraced": None,
        **{f"watched {r // 1000} kHz": r for r in RATES},
    }
    rates: dict[str, list[float]] = {c: [] for c in columns}
    with tempfile.TemporaryDirectory() as tmp:
        loop = write_bios(os.path.join(tmp, "loop.bin"), ENDLESS)
        idle = write_bios(os.path.join(tmp, "idle.bin"), 0, spin_iterations=ENDLESS)
        vmm = subprocess.Popen(qemu_command(loop), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            wait_for_vcpus(vmm.pid)
            stats = take_stats(vmm.pid)
            for round_ in range(args.rounds):  # ABC, CBA...: a trend hits every column alike
                order = list(columns.items())
                for column, rate_hz in order if round_ % 2 == 0 else reversed(order):
                    rates[column].append(window(vmm.pid, stats, rate_hz, args.window))
            stats.close()
        finally:
            vmm.kill()
            vmm.wait()
        cpu = {rate: sampler_cpu(idle, rate, 4, args.seconds) for rate in RATES}
    sampler = "Python" if os.environ.get("KVMTOP_PURE") else "C"
    print(f"QEMU guest looping on `out 0x80`, {args.rounds} rounds of alternating {args.window:g} s"
          f" windows; {sampler} sampler\n")  # fmt: skip
    print("| run | exits/s, median (KVM's counter) | vs untraced, median of the rounds' ratios |")
    print("|---|---:|---:|")
    for column in columns:
        ratios = [w / u for w, u in zip(rates[column], rates["untraced"], strict=True)]
        print(f"| {column} | {statistics.median(rates[column]):,.0f} |"
              f" {statistics.median(ratios):.3f}x |")  # fmt: skip
    spread = min(rates["untraced"]), max(rates["untraced"])
    print(
        f"\nUntraced windows ranged {spread[0]:,.0f} to {spread[1]:,.0f} exits/s (the host's load)."
    )
    print(f"\nSampler CPU, a 4-vCPU QEMU watched {args.seconds:g} s\n")
    print("| rate | looks/s | CPU per vCPU |\n|---|---:|---:|")
    for rate, (per_vcpu, looks) in cpu.items():
        print(f"| {rate // 1000} kHz | {looks:,.0f} | {100 * per_vcpu:.2f}% of a core |")


if __name__ == "__main__":
    main()
