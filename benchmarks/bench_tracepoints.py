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
- **the kernel's part** (``--events``): a C VMM (benchmarks/guests/timed_vmm.c, `out 0x80` with
  no handling) at 20k and 100k exits, the rounds alternating: untraced; with the engine's events
  open as perf samples and read by its native reader (every event, and smaller sets: what each
  costs the guest); with every event open and none read (the kernel's writes alone); every
  event delivered by the engine's BPF programs into its BPF ring and read (the engine as root);
  with every event holding a BPF program that returns 0 (no event written: the floor of any
  consumer of the same tracepoints in the kernel). µs per exit as slopes.

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


EVENT_SETS = {  # the engine's events (kvmtop.trace.tp_engine.EVENTS) by name, in smaller sets
    "every event": None,
    "no ioctl exit": ("kvm/kvm_userspace_exit", "syscalls/sys_enter_ioctl", "kvm/kvm_pio",
                      "kvm/kvm_mmio", "kvm/kvm_hypercall", "kvm/kvm_exit"),
    "KVM's only": ("kvm/kvm_userspace_exit", "kvm/kvm_pio", "kvm/kvm_mmio", "kvm/kvm_hypercall",
                   "kvm/kvm_exit"),
    "kvm_userspace_exit": ("kvm/kvm_userspace_exit",),
}  # fmt: skip


def events_open(names: tuple[str, ...] | None, read: bool, bpf: bool = False):
    """The engine's rings with the events ``names`` (None: all), read by a thread as the
    engine reads them (``read``) or never, delivered as perf samples or by BPF programs
    (``bpf``); a callable that closes them."""
    import threading

    from kvmtop import native
    from kvmtop.trace import tp_engine

    module = native.built("_tracepoints")
    assert module is not None, "kvmtop.native._tracepoints is not built"
    specs = tuple(e for e in tp_engine.EVENTS if names is None or e[1] in names)
    rings = module.Rings(tp_engine.online_cpus(), tp_engine.opened_events(module, specs),
                         tp_engine.RING_PAGES, False, bpf=bpf)  # fmt: skip
    stop = threading.Event()
    wake_r, wake_w = os.pipe()

    def reader() -> None:
        while not stop.is_set():
            rings.run(time.monotonic_ns() + 50_000_000, 1 << 20, wake_r)
            rings.take()

    thread = threading.Thread(target=reader, daemon=True)
    if read:
        thread.start()

    def close() -> None:
        stop.set()
        os.write(wake_w, b"x")
        if read:
            thread.join(5)
        rings.close()
        os.close(wake_r)
        os.close(wake_w)

    return close


def bpf_open(names: tuple[str, ...] | None):
    """The engine's tracepoints (``names``; None: all) each with a BPF program that returns 0,
    so that nothing is written for them: what an in-kernel consumer of the same events would
    start from. One perf event per tracepoint holds it (a tracepoint's programs run on every
    CPU). A callable that closes them."""
    import ctypes
    import struct

    from kvmtop.host.tracefs import event_format, tracefs_root
    from kvmtop.trace import tp_engine

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # include/uapi/linux/bpf.h: r0 = 0; exit
    insns = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])
    license_ = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    attr = ctypes.create_string_buffer(struct.pack("<IIQQ", BPF_PROG_TYPE_TRACEPOINT, 2,
                                                   ctypes.addressof(code),
                                                   ctypes.addressof(license_)), 128)  # fmt: skip
    prog = libc.syscall(SYS_BPF, BPF_PROG_LOAD, attr, 128)
    if prog < 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_LOAD")
    fds = [prog]
    root = tracefs_root()
    assert root is not None, "no tracefs"
    for _role, name, _fields, _filter in tp_engine.EVENTS:
        found = event_format(root, name) if names is None or name in names else None
        if found is None:
            continue
        event_id = found[0]
        # include/uapi/linux/perf_event.h: type, size, config, sample_period
        pattr = ctypes.create_string_buffer(struct.pack("<IIQQ", PERF_TYPE_TRACEPOINT, 128,
                                                        event_id, 1), 128)  # fmt: skip
        fd = libc.syscall(SYS_PERF_EVENT_OPEN, pattr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"perf_event_open {name}")
        fds.append(fd)
        if libc.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog) < 0:
            raise OSError(ctypes.get_errno(), f"PERF_EVENT_IOC_SET_BPF {name}")

    def close() -> None:
        for fd in reversed(fds):
            os.close(fd)

    return close


SYS_BPF, SYS_PERF_EVENT_OPEN = 321, 298  # arch/x86/entry/syscalls/syscall_64.tbl
BPF_PROG_LOAD, BPF_PROG_TYPE_TRACEPOINT = 5, 5  # include/uapi/linux/bpf.h
PERF_TYPE_TRACEPOINT, PERF_FLAG_FD_CLOEXEC = 2, 8  # include/uapi/linux/perf_event.h
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)


def kernel_part(rounds: int) -> dict[str, list[float]]:
    """{row: µs per exit of each round} (see the module's docstring)."""
    from attached import build_timed_vmm

    rows: dict[str, list[float]] = {"untraced": []}
    rows |= {f"{name}, read": [] for name in EVENT_SETS}
    rows["every event, unread"] = []
    rows["every event, BPF delivery, read"] = []
    rows["every event, BPF"] = []
    with tempfile.TemporaryDirectory() as tmp:
        vmm = build_timed_vmm(tmp)

        def wall(n: int) -> float:
            t = time.monotonic()
            subprocess.run([vmm, str(n), "0", "io"], check=True, stdout=subprocess.DEVNULL)
            return time.monotonic() - t

        for _ in range(rounds):
            for row in rows:
                name, _sep, how = row.partition(", ")
                times = []
                for n in (20_000, 100_000):
                    if row == "untraced":
                        close = None
                    elif how == "BPF":
                        close = bpf_open(EVENT_SETS[name])
                    elif how == "BPF delivery, read":
                        close = events_open(EVENT_SETS[name], True, bpf=True)
                    else:
                        close = events_open(EVENT_SETS[name], how == "read")
                    try:
                        times.append(wall(n))
                    finally:
                        if close is not None:
                            close()
                rows[row].append((times[1] - times[0]) / 80_000 * 1e6)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="stress-ng --cpu <CPUs> beside")
    parser.add_argument("--events", action="store_true", help="the kernel's part alone")
    args = parser.parse_args()
    if args.events:
        with host_regime(args.busy) as regime:
            rows = kernel_part(args.rounds)
        print(f"host: {regime}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print("| C VMM, `out 0x80` | µs/exit | rounds | vs untraced |\n|---|---:|---:|---:|")
        untraced = statistics.median(rows["untraced"])
        for row, values in rows.items():
            median = statistics.median(values)
            print(f"| {row} | {median:.2f} | {min(values):.2f}..{max(values):.2f} | "
                  f"{untraced / median:.2f}x |")  # fmt: skip
        return
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
