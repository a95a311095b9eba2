"""One run, alternating: the same QEMU guest untraced, under strace, and under `kvmtop record`
in launch and in attach mode. Prints medians, ratios, kvmtop's peak RSS and bytes per exit.

    python benchmarks/bench_compare.py [--exits 20000] [--rounds 3]

Traced rows measure the exit phase only, from the tracer's own clock: the first to the last port
IO exit in kvmtop's recording, and in `strace -ttt`'s output (so neither counts QEMU's slower
start-up under tracing). Untraced: wall time minus that of a guest making no exits.
In attach mode the guest first spins (no exits) while kvmtop attaches. Peak RSS: kvmtop's own,
from attach mode (there QEMU is not kvmtop's child, so it is not counted in).

The cost of the recording file: the same launch, traced by a TraceSession with and without a
recording (rates from the aggregate's first and last exit, in both rows alike), two pairs a
round. Single runs here vary by +-30%: the medians of many pairs are what to compare.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from guests.qemu_bios import build_bios, qemu_command  # noqa: E402
from helpers import wait_for_vcpus  # noqa: E402

from kvmtop.formats.recording import open_recording  # noqa: E402

KVMTOP = [sys.executable, "-m", "kvmtop"]
STRACE = ["strace", "-f", "-qq", "-ttt", "-e", "trace=ioctl", "--kvm=vcpu", "-o"]


def wall(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.monotonic() - started


def strace_rate(argv: list[str], log: str) -> float:
    wall(STRACE + [log] + argv)
    with open(log) as f:
        stamps = [float(line.split()[1]) for line in f if "(KVM_EXIT_IO)" in line]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def recording_rate(out: str) -> float:
    """Port-IO exits per second between the first and the last of them in a recording."""
    stamps = [
        e.exit_ns
        for batch in open_recording(out).batches()
        for e in batch.events
        if e.errno == 0 and e.reason == 2
    ]
    return (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1e9)


SESSION = """
import sys
from kvmtop.sources.session import TraceSession
out = sys.argv[1] or None
session = TraceSession(record_path=out)
session.launch(sys.argv[2:], one_stop=True)
session.wait_attached()
session.ended.wait()
stats = session.stats
session.close()
print((stats.total - 1) / ((stats.last_ns - stats.first_ns) / 1e9))
"""


def session_rate(argv: list[str], out: str | None) -> float:
    """Exits/s of a launch traced by a TraceSession that records to ``out`` (None: no file)."""
    done = subprocess.run([sys.executable, "-c", SESSION, out or "", *argv], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    return float(done.stdout)


def attach_run(bios: str, out: str) -> tuple[float, int, int]:
    """(exits/s, exits, kvmtop's peak RSS in KiB) for kvmtop attached to a running QEMU."""
    vmm = subprocess.Popen(qemu_command(bios), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_vcpus(vmm.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([*KVMTOP, "record", "-p", str(vmm.pid), "-o", out],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    finally:
        vmm.kill()
        vmm.wait()
    return recording_rate(out), 0, max(peak, before)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.exits
    keys = ("untraced", "strace", "launch", "attach", "no file", "file")
    runs: dict[str, list[float]] = {k: [] for k in keys}
    rss: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        busy, empty, spin = (os.path.join(tmp, f) for f in ("busy.bin", "empty.bin", "spin.bin"))
        for path, image in (
            (busy, build_bios(outs=n, mmio_writes=0)),
            (empty, build_bios(outs=0, mmio_writes=0)),
            (spin, build_bios(outs=n, mmio_writes=0, spin_iterations=3_000_000)),
        ):
            with open(path, "wb") as f:
                f.write(image)
        out = os.path.join(tmp, "r.kvmtop")
        for _ in range(args.rounds):  # alternate, so drift hits every column alike
            boot = wall(qemu_command(empty))
            runs["untraced"].append(n / max(1e-6, wall(qemu_command(busy)) - boot))
            runs["strace"].append(strace_rate(qemu_command(busy), os.path.join(tmp, "strace.txt")))
            wall([*KVMTOP, "record", "-o", out, "--", *qemu_command(busy)])
            runs["launch"].append(recording_rate(out))
            rate, _exits, peak = attach_run(spin, out)
            runs["attach"].append(rate)
            rss.append(peak)
            for _ in range(2):  # a small difference in a noisy rate: twice the samples
                runs["no file"].append(session_rate(qemu_command(busy), None))
                runs["file"].append(session_rate(qemu_command(busy), os.path.join(tmp, "s.kvmtop")))
        bytes_per_exit = (os.path.getsize(out) - os.path.getsize(out) % 32) / (n + 1)

    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"QEMU guest, {n} `out 0x80` exits, {args.rounds} alternating rounds, medians\n")
    print("| run | exits/s | vs strace | vs untraced |")
    print("|---|---:|---:|---:|")
    names = {"untraced": "untraced", "strace": "strace -f --kvm=vcpu", "launch": "kvmtop record -- (launch)",
             "attach": "kvmtop record -p (attach)"}  # fmt: skip
    for key, name in names.items():
        print(f"| {name} | {med[key]:,.0f} | {med[key] / med['strace']:.2f}x | "
              f"{med[key] / med['untraced']:.3f}x |")  # fmt: skip
    cost = 1 - med["file"] / med["no file"]
    print(f"\nlaunch, aggregate only: {med['no file']:,.0f} exits/s; with the recording file: "
          f"{med['file']:,.0f} exits/s (the file costs {cost:.1%})")  # fmt: skip
    print(
        f"\nkvmtop peak RSS (attach mode): {max(rss) / 1024:.1f} MiB; recording: "
        f"{bytes_per_exit:.1f} bytes per exit (header included)"
    )


if __name__ == "__main__":
    main()
