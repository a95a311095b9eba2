"""What one traced KVM exit costs, as a slope, with start-up cancelled out.

    python benchmarks/bench_slope.py [--counts 20000,100000] [--rounds 3] [--only NAME,...]
                                     [--busy] [--baseline DIR]

The same QEMU ``-bios`` guest (tests/guests/qemu_bios.py: N x ``out 0x80``, then isa-debug-exit)
runs at two exit counts, untraced and under each tracer, the tracers alternating within each
round. A run's time t(N) is its wall time; per exit = (t(N2) - t(N1)) / (N2 - N1), so whatever a
run costs once (interpreters, imports, QEMU's own start, a tracer's set-up and tear-down) drops
out. The intercept t(N1) - slope * N1 is that once-per-run cost; ``start-up`` is a tracer's
intercept minus the untraced run's intercept of the same round: what the tracer adds to running
the command at all. Medians over rounds.

Attach mode (``kvmtop record -p PID``): QEMU starts paused (``-S``), its vCPU made and not yet
run; kvmtop attaches, and once it says "recording to", QMP's ``cont`` starts the guest. A run is
timed from ``cont`` to kvmtop's exit, which follows QEMU's; the untraced reference
(``untraced-paused``) is the same paused guest timed from ``cont`` to QEMU's exit. So the slope is
the cost per exit, and the start-up column is what kvmtop adds to the VM's life after ``cont``
plus the time it takes to end after the VM has. kvmtop's own start (the interpreter, the attach)
comes before ``cont`` and is reported on its own line (``attach latency``: kvmtop's start to its
"recording to" line). (A guest that spins until kvmtop is there would put the spin's own noise,
hundreds of ms where the host's speed moves, into every attach run.)

Counts are checked: kvmtop's summary (``--json``; on stderr when it launched the command) must hold N + 1 port-IO exits (N ``out 0x80``
and the debug-exit's ``out 0xf4``), the floor's "total" N + 1 (it reads each exit at the next
``KVM_RUN``, so the last ``out 0xf4`` never shows, and the first run's reason 0 does). strace
writes to /dev/null, as asked, and is not counted.

Against the floor: where ``floor-ptrace2`` ran, each launched row's N2 run time over the
floor's N2 run time in the same round, median and range. On a busy host one run's slope is
noise-bound (a round's 100k run can end before its 20k run); this ratio pairs runs that met the
same drift. Every row with a reference also gets its exits/s over the reference's round by
round: the reference's slope over the row's in the same round, median and range (the tracepoint
engine's targets are put this way).

Two-stop waits: the ``-sleeping`` rows run kvmtop with ``KVMTOP_POLL_US=0`` (never poll before
a wait), what the engine's poll chooser must never be slower than. ``--baseline DIR`` adds the
two-stop rows once more (``base-``) with the kvmtop in DIR (another checkout, its C modules
built in place), to compare a change with what it replaces in one run.

The host's regime: quiet (nothing else running: an idle CPU halts and is slow to wake) or, with
``--busy``, ``stress-ng --cpu <CPUs>`` started for the whole run and stopped after it (no CPU
idles, wake-ups are cheap, and a polling tracer takes CPU the VMM needs). The header says which.

kvmtop is the console script installed beside this interpreter when there is one (as a user runs
it), else ``kvmtop`` on PATH, else ``python -m kvmtop``; the header says which package it
imported (PYTHONPATH can point it at a checkout). The floor (/work/shared/floor/floor.c: a
C tracer that does nothing but read each exit, see its README) is built with gcc into a
temporary directory when both are there; its rows say how close kvmtop comes to what this
machine allows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from guests.qemu_bios import qemu_command, write_bios  # noqa: E402

STRACE = ["strace", "-f", "-qq", "-e", "trace=ioctl", "--kvm=vcpu", "-o", "/dev/null"]
FLOOR_SOURCE = "/work/shared/floor/floor.c"
IO_EXIT = "KVM_EXIT_IO"
PERF_EVENTS = ["-e", "kvm:kvm_userspace_exit", "-e", "kvm:kvm_pio", "-e", "syscalls:sys_enter_ioctl",
               "--filter", "cmd == 0xae80", "-e", "syscalls:sys_exit_ioctl"]  # fmt: skip
FLOOR_ROW = "floor-ptrace2"  # the 2-stop floor the 2-stop paths are held to
ENGINE = "KVMTOP_ENGINE"  # kvmtop's engine (a checkout from before engines ignores it)
SLEEPING = {"KVMTOP_POLL_US": "0"}  # never poll before a wait
PERF_DELIVERY = {"KVMTOP_TP_DELIVERY": "perf"}  # the tracepoint engine without BPF


def kvmtop_command() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "kvmtop")
    if os.access(beside, os.X_OK):
        return [beside]
    on_path = shutil.which("kvmtop")
    return [on_path] if on_path else [sys.executable, "-m", "kvmtop"]


@dataclass
class Run:
    seconds: float
    exits: int | None = None  # what the tracer counted, where it says
    latency: float | None = None  # attach mode: kvmtop's start to its "recording to" line


@dataclass
class Tracer:
    name: str
    run: Callable[[int], Run]  # exit count -> one timed run
    reference: str = "untraced"  # whose intercept its start-up is measured against
    expected: Callable[[int], int] | None = None  # exit count -> what it must count
    runs: dict[int, list[Run]] = field(default_factory=dict)


class Bench:
    def __init__(self, tmp: str, counts: list[int], baseline: str | None = None) -> None:
        self.kvmtop = kvmtop_command()
        # -P: not the working directory first, as for the console script
        self.baseline = [sys.executable, "-P", "-m", "kvmtop"] if baseline else None
        self.baseline_env = {"PYTHONPATH": os.path.abspath(baseline)} if baseline else {}
        self.busy = {n: write_bios(os.path.join(tmp, f"busy{n}.bin"), n) for n in counts}
        self.qmp = os.path.join(tmp, "qmp.sock")
        self.floor = self._build_floor(tmp)

    @staticmethod
    def _build_floor(tmp: str) -> str | None:
        if not os.path.exists(FLOOR_SOURCE) or shutil.which("gcc") is None:
            return None
        out = os.path.join(tmp, "floor")
        subprocess.run(["gcc", "-O2", "-o", out, FLOOR_SOURCE], check=True)
        return out

    def untraced(self, n: int) -> Run:
        return Run(_wall(qemu_command(self.busy[n]))[0])

    def strace(self, n: int) -> Run:
        return Run(_wall(STRACE + qemu_command(self.busy[n]))[0])

    def launch(
        self, *flags: str, env: dict[str, str] | None = None, kvmtop: list[str] | None = None
    ) -> Callable[[int], Run]:
        command = kvmtop or self.kvmtop
        environ = {**os.environ, ENGINE: "ptrace", **(env or {})}

        def run(n: int) -> Run:
            argv = [*command, "record", *flags, "--json", "-o", "/dev/null", "--"]
            seconds, _out, err = _wall(argv + qemu_command(self.busy[n]), environ)
            return Run(seconds, _io_exits(err[err.find("\n{") + 1 :]))  # after the notices

        return run

    def floor_mode(self, mode: str, sync: bool = False) -> Callable[[int], Run]:
        assert self.floor is not None
        env = {**os.environ, "SYNC": "1"} if sync else None

        def run(n: int) -> Run:
            seconds, _out, err = _wall([self.floor, mode, *qemu_command(self.busy[n])], env)
            total = err.rsplit("(total ", 1)[-1].split(")")[0]
            return Run(seconds, int(total) if total.isdigit() else None)

        return run

    def untraced_paused(self, n: int) -> Run:
        with self.paused(n) as (vmm, cont):
            started = cont()
            vmm.wait()
            return Run(time.monotonic() - started)

    @contextmanager
    def paused(self, n: int) -> Iterator[tuple[subprocess.Popen[bytes], Callable[[], float]]]:
        """QEMU with the guest of ``n`` exits, paused before its first instruction, and the
        function that starts it (returns when: the moment QMP's ``cont`` is sent)."""
        if os.path.exists(self.qmp):
            os.unlink(self.qmp)
        paused = ("-S", "-qmp", f"unix:{self.qmp},server=on,wait=off")
        vmm = subprocess.Popen(qemu_command(self.busy[n], *paused), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            with _qmp(self.qmp, vmm) as qmp:
                yield vmm, qmp
        finally:
            if vmm.poll() is None:
                vmm.kill()
            vmm.wait()

    def attacher(
        self, env: dict[str, str] | None = None, kvmtop: list[str] | None = None,
        engine: str = "ptrace", *flags: str,
    ) -> Callable[[int], Run]:  # fmt: skip
        command = kvmtop or self.kvmtop
        environ = {**os.environ, ENGINE: engine, **(env or {})}
        return lambda n: self.attach(n, command, environ, flags)

    def perf_record(self, n: int) -> Run:
        """The kernel's floor for the tracepoint engine: perf keeping every event of each exit."""
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["perf", "record", "-q", "-o", os.path.join(tmp, "perf.data"), *PERF_EVENTS]
            return Run(_wall(argv + ["--"] + qemu_command(self.busy[n]))[0])

    def attach(self, n: int, kvmtop: list[str], env: dict[str, str] | None,
               flags: tuple[str, ...] = ()) -> Run:  # fmt: skip
        with self.paused(n) as (vmm, cont):
            asked = time.monotonic()
            argv = [*kvmtop, "record", *flags, "-p", str(vmm.pid), "--json", "-o", "/dev/null"]
            rec = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env)  # fmt: skip
            assert rec.stderr is not None
            line = rec.stderr.readline()
            latency = time.monotonic() - asked
            if "recording to" not in line:
                rec.kill()
                raise SystemExit(f"kvmtop did not attach: {line}{rec.communicate()[1]}")
            started = cont()
            out, _err = rec.communicate()
            seconds = time.monotonic() - started
        return Run(seconds, _io_exits(out), latency)


def _wall(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str, str]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    return time.monotonic() - started, done.stdout, done.stderr


def _io_exits(summary_json: str) -> int | None:
    try:
        return int(json.loads(summary_json)["exits"].get(IO_EXIT, 0))
    except (ValueError, KeyError):
        return None


@contextmanager
def _qmp(path: str, vmm: subprocess.Popen[bytes]) -> Iterator[Callable[[], float]]:
    """QEMU's QMP socket at ``path``, once QEMU is up (its vCPUs made); yields ``cont``."""
    deadline = time.monotonic() + 10
    sock = socket.socket(socket.AF_UNIX)
    while True:
        try:
            sock.connect(path)
            break
        except OSError:
            if vmm.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"QEMU (pid {vmm.pid}) opened no QMP socket within 10 s") from None
            time.sleep(0.001)
    with sock, sock.makefile("rwb") as qmp:

        def execute(command: str) -> None:
            qmp.write(json.dumps({"execute": command}).encode() + b"\n")
            qmp.flush()
            while not {"return", "error"} & json.loads(qmp.readline()).keys():
                pass  # (events)

        def cont() -> float:
            started = time.monotonic()
            execute("cont")
            return started

        qmp.readline()  # the greeting
        execute("qmp_capabilities")
        yield cont


def tracers(bench: Bench) -> list[Tracer]:
    io_count = lambda n: n + 1  # noqa: E731 - N `out 0x80` and the debug-exit's `out 0xf4`
    rows = [
        Tracer("untraced", bench.untraced),
        Tracer("strace", bench.strace),
        Tracer("kvmtop", bench.launch(), expected=io_count),
        Tracer("kvmtop-no-seccomp", bench.launch("--no-seccomp"), expected=io_count),
        Tracer("kvmtop-tracepoints", bench.launch(env={ENGINE: "tracepoints"}), expected=io_count),
        Tracer("untraced-paused", bench.untraced_paused, "untraced-paused"),
        Tracer("kvmtop-attach", bench.attacher(), "untraced-paused", io_count),
        Tracer(
            "kvmtop-tracepoints-attach",
            bench.attacher(engine="tracepoints"),
            "untraced-paused",
            io_count,
        ),  # fmt: skip
        # the tracepoint engine as perf samples (KVMTOP_TP_DELIVERY=perf; as root, BPF above)
        Tracer(
            "kvmtop-tracepoints-perf",
            bench.launch(env={ENGINE: "tracepoints", **PERF_DELIVERY}),
            expected=io_count,
        ),  # fmt: skip
        Tracer(
            "kvmtop-tracepoints-perf-attach",
            bench.attacher(PERF_DELIVERY, None, "tracepoints"),
            "untraced-paused",
            io_count,
        ),  # fmt: skip
        Tracer(
            "kvmtop-no-seccomp-sleeping",
            bench.launch("--no-seccomp", env=SLEEPING),
            expected=io_count,
        ),
        Tracer("kvmtop-attach-sleeping", bench.attacher(SLEEPING), "untraced-paused", io_count),
        # --rip: every exit's guest RIP (kvm_valid_regs set: KVM copies the registers at each exit)
        Tracer("kvmtop-rip", bench.launch("--rip"), expected=io_count),
        Tracer("kvmtop-no-seccomp-rip", bench.launch("--no-seccomp", "--rip"), expected=io_count),
        Tracer(
            "kvmtop-attach-rip",
            bench.attacher(None, None, "ptrace", "--rip"),
            "untraced-paused",
            io_count,
        ),  # fmt: skip
        # --rip with tracepoints: kvm_emulate_insn too (the guest's every instruction, here)
        Tracer(
            "kvmtop-tracepoints-rip",
            bench.launch("--rip", env={ENGINE: "tracepoints"}),
            expected=io_count,
        ),
        Tracer(
            "kvmtop-tracepoints-attach-rip",
            bench.attacher(None, None, "tracepoints", "--rip"),
            "untraced-paused",
            io_count,
        ),  # fmt: skip
    ]
    if bench.baseline is not None:
        base, env = bench.baseline, bench.baseline_env
        rows += [
            Tracer(
                "base-no-seccomp",
                bench.launch("--no-seccomp", env=env, kvmtop=base),
                expected=io_count,
            ),
            Tracer("base-attach", bench.attacher(env, base), "untraced-paused", io_count),
        ]
    if shutil.which("perf") is not None:
        rows.append(Tracer("perf-record", bench.perf_record))
    if bench.floor is not None:
        for mode, sync in (("ptrace1", False), ("ptrace2", False), ("unotif", False),
                           ("unotif", True)):  # fmt: skip
            name = f"floor-{mode}" + ("-sync" if sync else "")
            rows.append(Tracer(name, bench.floor_mode(mode, sync), expected=io_count))
    return rows


def slope(tracer: Tracer, lo: int, hi: int, r: int) -> float:
    return (tracer.runs[hi][r].seconds - tracer.runs[lo][r].seconds) / (hi - lo)


def intercept(tracer: Tracer, lo: int, hi: int, r: int) -> float:
    return tracer.runs[lo][r].seconds - slope(tracer, lo, hi, r) * lo


def kvmtop_package(command: list[str], env: dict[str, str] | None = None) -> str:
    """Where ``command`` imports kvmtop from (its interpreter, as the console script runs)."""
    python = sys.executable
    if command and command[0] != sys.executable and os.path.isfile(command[0]):
        with open(command[0], "rb") as script:
            first = script.readline()
        if first.startswith(b"#!"):
            python = first[2:].decode().strip().split()[0]
    code = "import os, kvmtop; print(os.path.dirname(kvmtop.__file__))"
    done = subprocess.run([python, "-P", "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)  # fmt: skip
    return done.stdout.strip() or f"? ({done.stderr.strip()[-200:]})"


@contextmanager
def host_regime(busy: bool) -> Iterator[str]:
    """Quiet, or every CPU kept busy by stress-ng for as long as the block runs."""
    if not busy:
        yield "quiet (nothing started beside the runs)"
        return
    cpus = os.cpu_count() or 1
    stress = subprocess.Popen(["stress-ng", "--cpu", str(cpus), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(1)  # its workers started
        if stress.poll() is not None:
            raise SystemExit(f"stress-ng ended at once (status {stress.returncode})")
        yield f"busy (stress-ng --cpu {cpus}, pid {stress.pid}, for the whole run)"
    finally:
        stress.terminate()  # it stops its workers
        try:
            stress.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stress.kill()
            stress.wait()


def report(
    rows: list[Tracer], lo: int, hi: int, rounds: int, kvmtop: list[str], header: str
) -> None:
    by_name = {t.name: t for t in rows}
    per_exit = {t.name: statistics.median(slope(t, lo, hi, r) for r in range(rounds)) for t in rows}
    whole = {t.name: statistics.median(run.seconds for run in t.runs[lo]) for t in rows}
    strace = by_name.get("strace")
    print(f"QEMU -bios guest, {lo:,} and {hi:,} exits, {rounds} alternating rounds, medians")
    print(f"kvmtop: {' '.join(kvmtop)}")
    print(f"{header}\n")
    head = (f"| tracer | µs/exit | rounds | over untraced µs | exits/s | vs strace | start-up s "
            f"| {lo // 1000}k run s | vs strace |")  # fmt: skip
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in rows:
        us = per_exit[t.name] * 1e6
        each = [slope(t, lo, hi, r) * 1e6 for r in range(rounds)]
        spread = f"{min(each):.1f}..{max(each):.1f}"
        ref = by_name.get(t.reference)
        over = f"{us - per_exit[ref.name] * 1e6:.1f}" if ref is not None and ref is not t else "-"
        if ref is not None and ref is not t:
            added = [intercept(t, lo, hi, r) - intercept(ref, lo, hi, r) for r in range(rounds)]
            startup_text = f"{statistics.median(added):+.3f} [{min(added):+.2f}..{max(added):+.2f}]"
        else:
            startup_text = (
                f"({statistics.median(intercept(t, lo, hi, r) for r in range(rounds)):.3f})"
            )
        rate = 1 / per_exit[t.name] if per_exit[t.name] > 0 else float("inf")
        if strace is not None:
            vs_rate = f"{per_exit['strace'] / per_exit[t.name]:.2f}x"
            vs_whole = f"{whole[t.name] / whole['strace']:.2f}x"
        else:
            vs_rate = vs_whole = "-"
        print(f"| {t.name} | {us:.1f} | {spread} | {over} | {rate:,.0f} | {vs_rate} "
              f"| {startup_text} | {whole[t.name]:.3f} | {vs_whole} |")  # fmt: skip
    print("\nrounds: the rounds' range of µs/exit. start-up: intercept over the reference's "
          "(untraced; attach: untraced-paused), [the rounds' range]; in round brackets, a "
          "reference's own intercept. An intercept's "
          f"error is {lo:,} times its slope's: 5 µs/exit of noise moves it {lo * 5e-6:.2f} s")  # fmt: skip
    attach = by_name.get("kvmtop-attach")
    if attach is not None:
        latencies = [run.latency for runs in attach.runs.values() for run in runs if run.latency]
        print(f"attach latency (kvmtop's start -> its 'recording to'): median "
              f"{statistics.median(latencies):.3f} s, max {max(latencies):.3f} s")  # fmt: skip
    floor = by_name.get(FLOOR_ROW)
    launched = [t for t in rows if t.reference == "untraced" and t is not floor]
    if floor is not None and launched:
        print(f"\n{hi // 1000}k runs against {FLOOR_ROW}, round by round (a run's time over the "
              "floor's in the same round; within a round the host's drift hits both alike):")  # fmt: skip
        for t in launched:
            ratios = [
                a.seconds / b.seconds for a, b in zip(t.runs[hi], floor.runs[hi], strict=True)
            ]
            print(f"  {t.name}: {statistics.median(ratios):.2f}x "
                  f"[{min(ratios):.2f}..{max(ratios):.2f}]")  # fmt: skip
    paired = [t for t in rows if t.reference in by_name and t.reference != t.name]
    if paired:
        print("\nexits/s over the reference's, round by round (the reference's slope over the "
              "row's, in each round): median [range]")  # fmt: skip
        for t in paired:
            ref = by_name[t.reference]
            ratios = [slope(ref, lo, hi, r) / slope(t, lo, hi, r)
                      if slope(t, lo, hi, r) > 0 else float("inf") for r in range(rounds)]  # fmt: skip
            print(f"  {t.name} (over {ref.name}): {statistics.median(ratios):.2f}x "
                  f"[{min(ratios):.2f}..{max(ratios):.2f}]")  # fmt: skip
    for t in rows:
        if t.expected is None:
            continue
        for n, runs in t.runs.items():
            wrong = [run.exits for run in runs if run.exits != t.expected(n)]
            if wrong:
                print(f"WARNING: {t.name} at {n:,} exits counted {wrong}, expected {t.expected(n)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="20000,100000", help="two exit counts (20000,100000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="comma-separated tracer names (default: all)")
    parser.add_argument("--busy", action="store_true",
                        help="keep every CPU busy with stress-ng for the whole run")  # fmt: skip
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run the two-stop rows with the kvmtop in DIR (base-)")  # fmt: skip
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    if len(counts) != 2 or counts[0] == counts[1]:
        parser.error("--counts takes two different exit counts")
    if args.baseline and not os.path.isdir(os.path.join(args.baseline, "kvmtop")):
        parser.error(f"--baseline {args.baseline}: no kvmtop package there")
    with tempfile.TemporaryDirectory() as tmp, host_regime(args.busy) as regime:
        bench = Bench(tmp, counts, args.baseline)
        rows = tracers(bench)
        if args.only:
            wanted = args.only.split(",")
            unknown = set(wanted) - {t.name for t in rows}
            if unknown:
                parser.error(
                    f"unknown tracer(s) {sorted(unknown)}; known: {[t.name for t in rows]}"
                )
            needed = set(wanted) | {t.reference for t in rows if t.name in wanted}
            rows = [t for t in rows if t.name in needed]
        for t in rows:
            t.runs = {n: [] for n in counts}
        started = time.monotonic()
        for r in range(args.rounds):
            for n in counts:
                order = rows[r % len(rows) :] + rows[: r % len(rows)]  # a new first each round
                for t in order:
                    t.runs[n].append(t.run(n))
            print(f"round {r + 1}/{args.rounds}: {time.monotonic() - started:.0f} s",
                  file=sys.stderr)  # fmt: skip
        header = f"kvmtop package: {kvmtop_package(bench.kvmtop)}"
        if bench.baseline is not None:
            base = kvmtop_package(bench.baseline, bench.baseline_env)
            header += f"\nbase- rows: {' '.join(bench.baseline)}, package {base}"
        stamp = time.strftime("%Y-%m-%d %H:%M %Z")
        header += f"\nhost: {regime}; {os.cpu_count()} CPUs; ended {stamp}"
        report(rows, counts[0], counts[1], args.rounds, bench.kvmtop, header)


if __name__ == "__main__":
    main()
