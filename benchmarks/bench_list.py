"""How long one listing of the KVM processes takes (the process list refreshes every 2 s).

    python benchmarks/bench_list.py [--rounds 20]

Each round lists every process on the host (psutil, and /proc/PID/fd for each: anon-inode fds
are not in psutil's open_files()); the first listing warms psutil's caches and is not counted.
The target: a listing well under the refresh period (0.25 s), whatever the host runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil

from kvmtop.host.discovery import list_kvm_processes

TARGET_S = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    found = list_kvm_processes()
    times = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        list_kvm_processes()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    print(f"{len(psutil.pids())} processes, {len(found)} KVM processes, {args.rounds} listings")
    print(f"median {median * 1e3:.1f} ms, worst {max(times) * 1e3:.1f} ms "
          f"(target < {TARGET_S * 1e3:.0f} ms: {'met' if max(times) < TARGET_S else 'MISSED'})")  # fmt: skip


if __name__ == "__main__":
    main()
