"""How close do the watch's samples, and the tracer, come to a VMM's own clock? A C VMM
(benchmarks/guests/timed_vmm.c, built here with cc) loops one vCPU on `out 0x80`, each exit
handled by spinning a fixed time, and times every KVM_RUN call itself. Per handler time:

- watched (never traced) at 4 kHz: the VMM's sampled share of each cycle, as a time per exit
  (raw), and net of KVM's own part of each exit as the watch timed it on its own VM;
- traced (`kvmtop record -p`, two stops per exit): the VMM handling p50, raw and net of the
  time kvmtop's stops held the thread.

    python benchmarks/bench_watch_truth.py [--rounds 3] [--seconds 2]

Each round runs every handler time watched, then traced; the table gives medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from conftest import wait_for_vcpus  # noqa: E402

from kvmtop.entry_cost import EntryCost  # noqa: E402
from kvmtop.watcher import Watcher  # noqa: E402

HANDLERS_US = (0, 20, 100, 500)
SOURCE = os.path.join(os.path.dirname(__file__), "guests", "timed_vmm.c")


def build(directory: str) -> str:
    binary = os.path.join(directory, "timed_vmm")
    subprocess.run(["cc", "-O2", "-o", binary, SOURCE], check=True)
    return binary


def exits_for(handler_us: float, seconds: float) -> int:
    return int(seconds * 1e6 / (handler_us + 9))  # ~9 µs a cycle here with no handling


def watched(binary: str, handler_us: float, seconds: float) -> dict[str, float]:
    vmm = subprocess.Popen([binary, str(exits_for(handler_us, seconds)), str(handler_us)],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_vcpus(vmm.pid)
    with Watcher(vmm.pid, rate_hz=4000, counters=False) as watcher:
        time.sleep(0.2)
        watcher.snapshot()  # from here on: the loop, steady
        own = json.loads(vmm.communicate(timeout=600)[0])
        share = watcher.snapshot().vcpus[0].vmm
        entry = watcher.entry
    cycle = (own["in_run_ns"] + own["out_ns"]) / own["exits"]
    kvm = entry.ns if isinstance(entry, EntryCost) else float("nan")
    return {"own": own["out_ns"] / own["exits"], "raw": share.value * cycle,
            "net": share.value * cycle - kvm, "half": share.half_width * cycle, "kvm": kvm}  # fmt: skip


def traced(binary: str, handler_us: float, seconds: float, directory: str) -> dict[str, float]:
    vmm = subprocess.Popen([binary, str(exits_for(handler_us, seconds) * 10), str(handler_us)],
                           stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_vcpus(vmm.pid)
        out = os.path.join(directory, f"traced-{handler_us}.kvmtop")
        subprocess.run([sys.executable, "-m", "kvmtop", "record", "-o", out, "-p", str(vmm.pid),
                        "--duration", str(seconds)], check=True, capture_output=True)  # fmt: skip
    finally:
        vmm.kill()
        vmm.wait()
    report = json.loads(subprocess.run([sys.executable, "-m", "kvmtop", "report", out, "--json"],
                                       check=True, capture_output=True, text=True).stdout)  # fmt: skip
    io = report["reasons"]["KVM_EXIT_IO"]
    return {"raw": io["handling"]["p50_ns"], "net": io["handling_net"]["p50_ns"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    results: dict[float, list[tuple[dict[str, float], dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        binary = build(directory)
        for _ in range(args.rounds):
            for handler in HANDLERS_US:
                pair = (watched(binary, handler, args.seconds),
                        traced(binary, handler, args.seconds, directory))  # fmt: skip
                results.setdefault(handler, []).append(pair)

    def med(handler: float, side: int, key: str) -> float:
        return statistics.median(pair[side][key] for pair in results[handler]) / 1e3

    kvm = statistics.median(p[0]["kvm"] for rows in results.values() for p in rows) / 1e3
    print(f"KVM's own part of each exit, as the watch timed it: {kvm:.1f} µs (median)\n")
    print("| handler | VMM's own clock | sampled | sampled, net of KVM's part | traced | "
          "traced, net of its stops |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for h in HANDLERS_US:
        print(f"| {h} µs | {med(h, 0, 'own'):.1f} µs | {med(h, 0, 'raw'):.1f} µs | "
              f"{med(h, 0, 'net'):.1f} ±{med(h, 0, 'half'):.1f} µs | {med(h, 1, 'raw'):.1f} µs | "
              f"{med(h, 1, 'net'):.1f} µs |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
