"""The tracepoint engine's own costs: how soon an attach records, and what kvmtop takes to run.

    python benchmarks/bench_tracepoints.py [--exits 200000] [--rounds 3] [--busy]

- **attach latency**: a QEMU ``-bios`` guest making port-IO exits at its full rate; kvmtop's
  tracer (``TraceSession``, the tracepoint engine) is asked to attach, and the latency is the
  time from the request to the exit time of the first exit recorded (what the kernel wrote
  first after the events were opened), and to the moment that exit was in kvmtop's aggregate
  (its delivery: batches every 0.1 s at most).
- **kvmtop at full rate**: ``kvmtop record -p PID`` attached to a guest of ``--exits`` exits at
  its full rate, from before its first exit to its end: kvmtop's CPU time (user and system, its
  own: QEMU is not its child) per second of the guest's run and per exit, and its peak RSS.

The host's regime: quiet, or with ``--busy``, ``stress-ng --cpu <CPUs>`` beside the runs.
Medians over rounds; the header gives the date and regime.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from bench_slope import host_regime, kvmtop_command  # noqa: E402
from guests.qemu_bios import qemu_command, write_bios  # noqa: E402

SPIN = 3_000_000  # the guest spins first (~0.8 s): kvmtop attaches before its first exit


def wait_vcpu(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            links = []
        if any(link.startswith("anon_inode:kvm-vcpu:") for link in links):
            return
        time.sleep(0.001)
    raise SystemExit(f"QEMU (pid {pid}) made no vCPU within 10 s")


def attach_latency(bios: str) -> tuple[float, float]:
    """(request to the first recorded exit's time, request to its delivery), in seconds."""
    from kvmtop.sources.session import TraceSession

    vmm = subprocess.Popen(qemu_command(bios), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    session = TraceSession(engine="tracepoints")
    try:
        wait_vcpu(vmm.pid)
        time.sleep(0.2)  # exits flowing at full rate
        asked = time.monotonic_ns()
        session.attach(vmm.pid)
        session.wait_attached()
        while session.stats.total == 0:
            time.sleep(0.0005)
        delivered = time.monotonic_ns()
        first = session.stats.snapshot().first_ns
        assert first is not None
        return (first - asked) / 1e9, (delivered - asked) / 1e9
    finally:
        session.close()
        vmm.kill()
        vmm.wait()


def full_rate(bios: str, kvmtop: list[str]) -> tuple[float, float, float, int]:
    """(kvmtop's CPU s per s of the traced run, its CPU µs per exit, the run's s, its peak RSS
    in KiB), attached to a guest that spins, then makes its exits."""
    vmm = subprocess.Popen(qemu_command(bios), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_vcpu(vmm.pid)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        env = {**os.environ, "KVMTOP_ENGINE": "tracepoints"}
        done = subprocess.run([*kvmtop, "record", "-p", str(vmm.pid), "--json", "-o", os.devnull],
                              capture_output=True, text=True, env=env, check=True)  # fmt: skip
        seconds = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        if vmm.poll() is None:
            vmm.kill()
        vmm.wait()
    exits = sum(json.loads(done.stdout)["exits"].values())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / seconds, cpu / max(1, exits) * 1e6, seconds, after.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="stress-ng --cpu <CPUs> beside")
    args = parser.parse_args()
    kvmtop = kvmtop_command()
    with tempfile.TemporaryDirectory() as tmp, host_regime(args.busy) as regime:
        busy_bios = write_bios(os.path.join(tmp, "busy.bin"), 10**9)  # exits until killed
        spin_bios = write_bios(os.path.join(tmp, "spin.bin"), args.exits, 0, SPIN)
        latencies = [attach_latency(busy_bios) for _ in range(args.rounds)]
        rates = [full_rate(spin_bios, kvmtop) for _ in range(args.rounds)]
    print(f"host: {regime}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"attach to the first recorded exit: {statistics.median(a for a, _ in latencies) * 1e3:.1f} ms "
          f"[{min(a for a, _ in latencies) * 1e3:.1f}..{max(a for a, _ in latencies) * 1e3:.1f}]; "
          f"to its delivery: {statistics.median(d for _, d in latencies) * 1e3:.1f} ms")  # fmt: skip
    cpu = statistics.median(r[0] for r in rates)
    per_exit = statistics.median(r[1] for r in rates)
    rss = max(r[3] for r in rates)
    print(f"kvmtop at full rate ({args.exits:,} exits, attached): CPU {cpu * 100:.1f}% of one "
          f"CPU over the run ({per_exit:.2f} µs per exit), peak RSS {rss / 1024:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
