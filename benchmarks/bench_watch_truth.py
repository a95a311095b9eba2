"""How close do the watch's samples, and the tracer, come to a VMM's own clock? A C VMM
(benchmarks/guests/timed_vmm.c, built here with cc) loops one vCPU on `out 0x80`, on an MMIO
write, or on both in turn (the MMIO exits of the mix handled in half the time), each exit
handled by spinning a fixed time, and times every KVM_RUN call itself. Per loop and handler time,
for each exit reason:

- watched (never traced) at 4 kHz: the VMM's sampled share of each cycle, as a time per exit
  (raw), and the watch's 95% bound of it net of KVM's own part of each exit (anything from
  nothing to its most, from the timing on kvmtop's own VM), and whether the VMM's clock lies in
  it;
- traced (`kvmtop record -p`, two stops per exit): the mean VMM handling time, raw and net of
  the time kvmtop's stops held the thread.

    python benchmarks/bench_watch_truth.py [--rounds 3] [--seconds 2] [--busy]

Each round runs every case watched, then traced; the table gives medians over rounds, and in how
many rounds the VMM's clock lay inside the bound. --busy runs `stress-ng --cpu 2` beside it all
(started here, stopped by its pid).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from attached import (
    attached_report,
    build_timed_vmm,
    held_timed_vmm,
    let_go,
    mean,
    own_clock,
    wait_for_vcpus,
)

from kvmtop.sampling.entry_cost import EntryCost
from kvmtop.sampling.shares import vmm_own_bound
from kvmtop.sampling.watcher import Watcher

CASES = (("io", 0), ("io", 20), ("io", 100), ("io", 500), ("mmio", 20), ("mmio", 100),
         ("mix", 100))  # fmt: skip
REASONS = {"io": "KVM_EXIT_IO", "mmio": "KVM_EXIT_MMIO"}


def exits_for(handler_us: float, seconds: float) -> int:
    return int(seconds * 1e6 / (handler_us + 9))  # ~9 µs a cycle here with no handling


def watched(binary: str, mode: str, handler_us: float, seconds: float
            ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per reason: the VMM's own time per exit, and the sampled one, raw and net."""
    vmm = held_timed_vmm(binary, str(exits_for(handler_us, seconds)), str(handler_us), mode)
    wait_for_vcpus(vmm.pid)
    with Watcher(vmm.pid, rate_hz=4000, counters=False) as watcher:
        time.sleep(0.2)
        watcher.snapshot()  # from here on: the loop, steady
        own = own_clock(vmm, timeout=600)
        vcpu = watcher.snapshot().vcpus[0]  # the VMM held: its wait for a CPU read too
        by_reason = vcpu.by_reason
        entry = watcher.entry
    let_go(vmm)
    total = own["in_run_ns"] + own["out_ns"]
    kvm = entry.ns if isinstance(entry, EntryCost) else float("nan")
    out = {}
    for key, label in REASONS.items():
        n, ns = own[key]
        if n and label in by_reason:
            share = by_reason[label]
            per_exit = total / n  # of the VMM's whole time, this reason's share is per its exits
            bound = vmm_own_bound(share, total, n, entry, vcpu.stretch(label))
            low, high = (bound.low / n, bound.high / n) if bound else (float("nan"),) * 2
            out[label] = {"own": ns / n, "raw": share.value * per_exit, "low": low,
                          "high": high, "inside": float(low <= ns / n <= high),
                          "kvm": kvm}  # fmt: skip
    return out


def traced(binary: str, mode: str, handler_us: float, seconds: float, directory: str
           ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per reason: the mean VMM handling time, raw and net of kvmtop's stops."""
    argv = [binary, str(exits_for(handler_us, seconds) * 10), str(handler_us), mode]
    report = attached_report(argv, seconds, directory)
    return {label: {"raw": mean(r["handling"]), "net": mean(r["handling_net"])}
            for label, r in report["reasons"].items() if label in REASONS.values()}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--busy", action="store_true", help="stress-ng --cpu 2 beside it all")
    args = parser.parse_args()
    stress = None
    if args.busy:
        if shutil.which("stress-ng") is None:
            parser.error("--busy needs stress-ng")
        stress = subprocess.Popen(["stress-ng", "--cpu", "2", "--quiet"], stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # its workers running
    try:
        return run(args)
    finally:
        if stress is not None:  # by its pid: stress-ng ends its workers on SIGTERM
            stress.send_signal(signal.SIGTERM)
            stress.wait(30)


def run(args: argparse.Namespace) -> int:
    Rounds = list[tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]]
    results: dict[tuple[str, int], Rounds] = {}
    with tempfile.TemporaryDirectory() as directory:
        binary = build_timed_vmm(directory)
        for _ in range(args.rounds):
            for mode, handler in CASES:
                pair = (watched(binary, mode, handler, args.seconds),
                        traced(binary, mode, handler, args.seconds, directory))  # fmt: skip
                results.setdefault((mode, handler), []).append(pair)

    def med(case: tuple[str, int], side: int, label: str, key: str) -> float:
        return statistics.median(p[side][label][key] for p in results[case]) / 1e3

    kvm = statistics.median(r["kvm"] for rounds in results.values() for p in rounds
                            for r in p[0].values())  # fmt: skip
    regime = "beside stress-ng --cpu 2" if args.busy else "quiet"
    print(
        f"{datetime.date.today()}, {regime}, {args.rounds} rounds of {args.seconds:g} s; "
        f"KVM's own part of each exit, as the watch timed it: {kvm / 1e3:.1f} µs (median)\n"
    )
    print("| loop | handler | exit | VMM's own clock | sampled | bound, net of KVM's part | "
          "clock inside | traced | traced, net of its stops |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for case in CASES:
        for label in sorted(results[case][0][0]):
            inside = sum(p[0][label]["inside"] for p in results[case])
            print(f"| {case[0]} | {case[1]} µs | {label.removeprefix('KVM_EXIT_')} | "
                  f"{med(case, 0, label, 'own'):.1f} µs | {med(case, 0, label, 'raw'):.1f} µs | "
                  f"{med(case, 0, label, 'low'):.1f}-{med(case, 0, label, 'high'):.1f} µs | "
                  f"{inside:.0f}/{len(results[case])} | "
                  f"{med(case, 1, label, 'raw'):.1f} µs | {med(case, 1, label, 'net'):.1f} µs |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
