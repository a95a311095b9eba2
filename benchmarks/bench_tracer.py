"""How much tracing costs: a real QEMU guest making N port-IO exits, untraced, under kvmtop's
engine, and under `strace -f --kvm=vcpu`; plus attach and detach latency on an idle guest.

    python benchmarks/bench_tracer.py [--exits 20000] [--repeat 3]

Prints a Markdown table (the README's numbers come from it). Needs /dev/kvm and QEMU.
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

from guests.qemu_bios import build_bios, qemu_command  # noqa: E402

from kvmtop.model.messages import Detached, ExitBatch  # noqa: E402
from kvmtop.tracer_thread import Tracer  # noqa: E402


def wall(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.monotonic() - started


def python_start() -> float:
    """What `python -m kvmtop --version` costs, to leave out of the record row."""
    return statistics.median(wall([sys.executable, "-m", "kvmtop", "--version"]) for _ in range(3))


def traced(argv: list[str]) -> tuple[float, int, int]:
    tracer = Tracer()
    tracer.start()
    started = time.monotonic()
    tracer.launch(argv).result(10)
    exits = stops = 0
    while True:
        message = tracer.out.get(timeout=120)
        if isinstance(message, ExitBatch):
            exits += len(message.events)
            stops += message.stops
        elif isinstance(message, Detached):
            break
    elapsed = time.monotonic() - started
    tracer.stop()
    return elapsed, exits, stops


def latencies(idle_argv: list[str], rounds: int) -> tuple[list[float], list[float]]:
    vmm = subprocess.Popen(idle_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    attach, detach = [], []
    try:
        time.sleep(0.5)
        tracer = Tracer()
        tracer.start()
        for _ in range(rounds):
            t0 = time.monotonic()
            tracer.attach(vmm.pid).result(5)
            attach.append(time.monotonic() - t0)
            time.sleep(0.05)
            t0 = time.monotonic()
            tracer.detach().result(5)
            detach.append(time.monotonic() - t0)
        tracer.stop()
    finally:
        vmm.kill()
        vmm.wait()
    return attach, detach


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        busy, empty, idle = (os.path.join(tmp, n) for n in ("busy.bin", "empty.bin", "idle.bin"))
        with open(busy, "wb") as f:
            f.write(build_bios(outs=args.exits, mmio_writes=0))
        with open(empty, "wb") as f:
            f.write(build_bios(outs=0, mmio_writes=0))
        with open(idle, "wb") as f:  # spins ~forever without exits: an idle-looking VMM
            f.write(build_bios(outs=0, mmio_writes=0, spin_iterations=2_000_000_000))
        busy_q, empty_q = qemu_command(busy), qemu_command(empty)

        boot = statistics.median(wall(empty_q) for _ in range(args.repeat))
        plain = statistics.median(wall(busy_q) for _ in range(args.repeat)) - boot
        runs = [traced(busy_q) for _ in range(args.repeat)]
        kvmtop = statistics.median(r[0] for r in runs) - boot
        exits, stops = runs[0][1], runs[0][2]
        record = (
            statistics.median(
                wall(
                    [
                        sys.executable,
                        "-m",
                        "kvmtop",
                        "record",
                        "-o",
                        os.path.join(tmp, "r.kvmtop"),
                        "--",
                        *busy_q,
                    ]
                )
                for _ in range(args.repeat)
            )
            - boot
            - python_start()
        )
        strace_argv = ["strace", "-f", "-o", os.devnull, "--kvm=vcpu", "-e", "trace=ioctl"]
        strace = statistics.median(wall(strace_argv + busy_q) for _ in range(args.repeat)) - boot
        attach, detach = latencies(qemu_command(idle), 10)

    n = args.exits
    print(f"QEMU guest, {n} `out 0x80` exits, median of {args.repeat} (boot time subtracted)\n")
    print("| run | seconds | µs per exit | exits/s |")
    print("|---|---:|---:|---:|")
    for name, secs in (
        ("untraced", plain),
        ("kvmtop engine (tracer thread alone)", kvmtop),
        ("`kvmtop record` (engine + aggregate + file)", record),
        ("strace -f --kvm=vcpu", strace),
    ):
        print(f"| {name} | {secs:.2f} | {secs / n * 1e6:.1f} | {n / secs:,.0f} |")
    print(
        f"\nkvmtop saw {exits} exits with {stops} ptrace stops ({stops / max(exits, 1):.2f} per exit, "
        "QEMU's start-up included)"
    )
    print(
        f"attach: median {statistics.median(attach) * 1e3:.2f} ms, max {max(attach) * 1e3:.2f} ms; "
        f"detach (idle guest): median {statistics.median(detach) * 1e3:.2f} ms, "
        f"max {max(detach) * 1e3:.2f} ms (10 rounds)"
    )


if __name__ == "__main__":
    main()
