"""Does holding a VM's KVM stats fds slow its guest? The same QEMU guest, alternating: untraced,
and with `kvmtop stats` having taken the fds (a brief attach while the guest spins) and reading
them every 0.1 s while the guest makes its exits.

    python benchmarks/bench_stats.py [--exits 20000] [--rounds 5]

Each run's time is QEMU's wall time, start to exit; the guest spins ~1 s first, then makes N
port-IO exits; the rate is N over the time beyond a guest that only spins.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from guests.qemu_bios import qemu_command, write_bios  # noqa: E402
from helpers import wait_for_vcpus  # noqa: E402

from kvmtop.counters.taking import take_stats  # noqa: E402

SPIN = 2_000_000


def run(bios: str, with_stats: bool) -> tuple[float, int]:
    """(QEMU's wall time, KVM's exits counter at the end, or 0 untraced)."""
    started = time.monotonic()
    vmm = subprocess.Popen(qemu_command(bios), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    if not with_stats:
        vmm.wait()
        return time.monotonic() - started, 0
    wait_for_vcpus(vmm.pid)
    stats = take_stats(vmm.pid)
    done = threading.Event()

    def reader() -> None:
        while not done.wait(0.1):
            stats.sample()

    thread = threading.Thread(target=reader)
    thread.start()
    vmm.wait()
    elapsed = time.monotonic() - started
    done.set()
    thread.join()
    exits = stats.sample().vcpus[0]["exits"]
    stats.close()
    return elapsed, int(exits)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"untraced": [], "fds held": [], "spin only": []}
    with tempfile.TemporaryDirectory() as tmp:
        busy = write_bios(os.path.join(tmp, "busy.bin"), args.exits, spin_iterations=SPIN)
        spin = write_bios(os.path.join(tmp, "spin.bin"), 0, spin_iterations=SPIN)
        for _ in range(args.rounds):  # alternate, so drift hits every column alike
            times["spin only"].append(run(spin, False)[0])
            times["untraced"].append(run(busy, False)[0])
            elapsed, exits = run(busy, True)
            times["fds held"].append(elapsed)
    base = statistics.median(times["spin only"])
    print(f"QEMU guest, {args.exits} port-IO exits after a spin, {args.rounds} alternating rounds,"
          f" medians\n")  # fmt: skip
    print("| run | wall s | exits/s |\n|---|---:|---:|")
    for key in ("untraced", "fds held"):
        t = statistics.median(times[key])
        print(f"| {key} | {t:.3f} | {args.exits / max(1e-6, t - base):,.0f} |")
    print(f"\nKVM's `exits` counter at the end of the last run: {exits:,}")


if __name__ == "__main__":
    main()
