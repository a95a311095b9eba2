"""How honest is the traced VMM handling time, raw and net of kvmtop's stops? A C VMM
(benchmarks/guests/timed_vmm.c, built here with cc) loops one vCPU on `out 0x80`, handles each
exit by making SYSCALLS getppid calls (2 more stops each, traced) and then spinning HANDLER µs,
and times its handling itself. Per case, alternating: the VMM's own time per exit untraced (the
truth), then attached (`kvmtop record -p`, two stops per exit) the mean VMM handling time, raw
and net, and the stops per exit.

    python benchmarks/bench_net_vmm_time.py [--rounds 3] [--seconds 1.5] [--pure]

The table gives medians over rounds; `net − truth` is what the net figure still errs by.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from attached import attached_report, build_timed_vmm, mean

CASES = ((0, 0), (20, 0), (100, 0), (500, 0), (0, 5), (20, 5), (100, 20), (500, 20))


def command(binary: str, exits: int, handler_us: float, syscalls: int) -> list[str]:
    return [binary, str(exits), str(handler_us), "io", str(syscalls)]


def untraced(binary: str, handler_us: float, syscalls: int, seconds: float) -> float:
    """The VMM's own handling time per exit (ns), nothing tracing it."""
    exits = int(seconds * 1e6 / (handler_us + 9 + syscalls * 0.3))
    own = json.loads(subprocess.run(command(binary, exits, handler_us, syscalls), check=True,
                                    capture_output=True, text=True).stdout)  # fmt: skip
    return own["out_ns"] / own["exits"]


def attached(binary: str, handler_us: float, syscalls: int, seconds: float, directory: str
             ) -> tuple[float, float, float]:  # fmt: skip
    """Mean raw and net VMM handling time (ns) and stops per exit, attached for ``seconds``."""
    report = attached_report(command(binary, 10**9, handler_us, syscalls), seconds, directory)
    io = report["reasons"]["KVM_EXIT_IO"]
    return mean(io["handling"]), mean(io["handling_net"]), report["stops_per_exit"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--pure", action="store_true", help="trace with the pure-Python engine")
    args = parser.parse_args()
    if args.pure:
        os.environ["KVMTOP_PURE"] = "1"
    rows: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as directory:
        binary = build_timed_vmm(directory)
        for _ in range(args.rounds):
            for handler, syscalls in CASES:
                truth = untraced(binary, handler, syscalls, args.seconds)
                raw, net, stops = attached(binary, handler, syscalls, args.seconds, directory)
                rows.setdefault((handler, syscalls), []).append((truth, raw, net, stops))
    print(f"engine: {'pure Python' if args.pure else 'C'}; {args.rounds} rounds, medians\n")
    print("| handler | syscalls | stops/exit | untraced (truth) | VMM, raw | NET | NET − truth |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for (handler, syscalls), got in rows.items():
        truth, raw, net, stops = (statistics.median(r[i] for r in got) for i in range(4))
        error = statistics.median(r[2] - r[0] for r in got)
        print(
            f"| {handler} µs | {syscalls} | {stops:.1f} | {truth / 1e3:.1f} µs | "
            f"{raw / 1e3:.1f} µs | {net / 1e3:.1f} µs | {error / 1e3:+.1f} µs |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
