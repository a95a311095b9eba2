"""A tiny but real KVM VMM in pure Python: the guest kvmtop's tests count and its demo shows.

One process, one thread per vCPU, each calling KVM_RUN on its own vCPU and handling the exit
(port IO, MMIO, hlt) like any VMM. It counts every exit it handles, so a test can compare
kvmtop's counts with the VMM's own (``--report-json``, in ``kvmtop report --json``'s shape).

    python -m kvmtop.minivmm counted [--vcpus N] [--outs N] [--port P] [--mmio-writes N]
                                     [--mmio-addr A] [--spin N] [--exit-status S] [--report-json F]
                                     [--out-sleep-us US] [--out-syscalls N] [--own-stats]
                                     [--irqchip]
    python -m kvmtop.minivmm demo [--vcpus N] [--duration S] [--report-json F]

Exit status: counted mode exits with the status the guests wrote to port 0xf4 (the highest, if
vCPUs disagree) once every vCPU has; demo exits 0 on SIGTERM/SIGINT or after --duration.
/dev/kvm missing or unusable: one line on stderr, status 7.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import fcntl
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable

from kvmtop.abi.arch import x86_64
from kvmtop.abi.kvm import (
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_GET_STATS_FD,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    RUN_UNION,
)
from kvmtop.minivmm import guestcode
from kvmtop.xlat_exit import ExitReason, exit_reason_name

# include/uapi/linux/kvm.h: the size-encoded ioctls only this VMM makes (x86_64 values)
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84
KVM_REGISTER_COALESCED_MMIO = 0x4010AE67  # _IOW(KVMIO, 0x67, struct kvm_coalesced_mmio_zone)
COALESCED_RING = x86_64.COALESCED_MMIO_PAGE_OFFSET * x86_64.PAGE_SIZE  # in the vCPU mapping
REGS_SIZE, SREGS_SIZE = 144, 312
RIP_OFFSET, RFLAGS_OFFSET = 128, 136  # struct kvm_regs: 16 GPRs, rip, rflags
CS_BASE, CS_SELECTOR = 0, 12  # struct kvm_sregs starts with cs: base u64, limit u32, selector u16

RAM_SIZE = 0xA0000  # 640 KiB at GPA 0; no memory above, so 0xA0000.. exits as MMIO
CODE_SEGMENT = 0x1000  # vCPU i runs at segment 0x1000 * (i + 1): 64 KiB each
IO = struct.Struct("<BBHIQ")  # kvm_run.io at RUN_UNION
MMIO = struct.Struct("<QQIB")  # kvm_run.mmio at RUN_UNION: phys_addr, data, len, is_write
MMIO_DATA = RUN_UNION + 8  # kvm_run.mmio.data: what an MMIO read gives the guest
EXIT_STATUS_PORT = guestcode.DEBUG_EXIT_PORT
DEMO_PHASE_SECONDS = 5.0
DEMO_PACE_S = (0.02, 0.01, 0.03)  # sleep on hlt per phase: rates differ visibly


class KvmUnavailableError(Exception):
    pass


class Counts:
    """Every exit the VMM handled, in `kvmtop report --json`'s shape."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exits: collections.Counter[str] = collections.Counter()
        self.vcpus: dict[int, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.io: collections.Counter[tuple[int, str, int]] = collections.Counter()
        self.mmio: collections.Counter[tuple[int, int, bool]] = collections.Counter()
        self.signals: collections.Counter[str] = collections.Counter()
        self.coalesced = 0  # writes drained from the coalesced MMIO ring

    def add(self, vcpu: int, reason: int) -> None:
        name = exit_reason_name(reason)
        with self.lock:
            self.exits[name] += 1
            self.vcpus[vcpu][name] += 1

    def as_json(self) -> dict[str, object]:
        with self.lock:
            return {
                "exits": dict(self.exits),
                "vcpus": {str(v): {"exits": dict(c)} for v, c in sorted(self.vcpus.items())},
                "io": [
                    {"port": p, "direction": d, "size": s, "count": n}
                    for (p, d, s), n in self.io.most_common()
                ],
                "mmio": [
                    {"address": a, "len": ln, "write": w, "count": n}
                    for (a, ln, w), n in self.mmio.most_common()
                ],
                "signals": dict(self.signals),
                "coalesced": self.coalesced,
            }


class Vcpu:
    def __init__(self, vm_fd: int, index: int, mmap_size: int, code: bytes, ram: mmap.mmap) -> None:
        self.index = index
        self.fd = fcntl.ioctl(vm_fd, KVM_CREATE_VCPU, index)
        self.run = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        segment = CODE_SEGMENT * (index + 1)
        ram[segment * 16 : segment * 16 + len(code)] = code
        sregs = bytearray(SREGS_SIZE)
        fcntl.ioctl(self.fd, KVM_GET_SREGS, sregs)
        struct.pack_into("<Q", sregs, CS_BASE, segment * 16)
        struct.pack_into("<H", sregs, CS_SELECTOR, segment)
        fcntl.ioctl(self.fd, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(REGS_SIZE)
        struct.pack_into("<QQ", regs, RIP_OFFSET, 0, 2)  # rip 0, rflags: bit 1 is always set
        fcntl.ioctl(self.fd, KVM_SET_REGS, bytes(regs))
        self.exit_status: int | None = None
        self.run_ns = self.vmm_ns = self.returned_ns = 0

    def run_once(self) -> bool:
        """One KVM_RUN; False when it was interrupted (EINTR) and made no exit. Keeps the time
        spent inside KVM_RUN and out of it (handling exits), as the VMM's own truth."""
        entered = time.monotonic_ns()
        if self.returned_ns:
            self.vmm_ns += entered - self.returned_ns
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return False
            raise
        finally:
            self.returned_ns = time.monotonic_ns()
            self.run_ns += self.returned_ns - entered
        return True


class MiniVm:
    def __init__(
        self, programs: list[bytes], stopping: threading.Event, stagger_s: float = 0.0,
        irqchip: bool = False,
    ) -> None:  # fmt: skip
        """vCPU i is created by its own thread, ``i * stagger_s`` seconds after the start (like
        QEMU, where each vCPU thread creates its vCPU): a tracer attached early sees it appear."""
        try:
            self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open /dev/kvm: {exc.strerror}") from None
        try:
            self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
            size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        except OSError as exc:
            raise KvmUnavailableError(f"KVM refused to create a VM: {exc.strerror}") from None
        self.ram = mmap.mmap(-1, RAM_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = _address_of(self.ram)
        region = struct.pack("<IIQQQ", 0, 0, 0, RAM_SIZE, address)
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)
        if irqchip:  # then KVM_RUN of a vCPU but 0 waits in the kernel, as a real AP does
            fcntl.ioctl(self.vm, KVM_CREATE_IRQCHIP, 0)
        self.programs = programs
        self.mmap_size = size
        self.stagger_s = stagger_s
        self.vcpus: list[Vcpu] = []
        if not stagger_s:
            self.vcpus = [Vcpu(self.vm, i, size, code, self.ram) for i, code in enumerate(programs)]
        self.counts = Counts()
        self.stopping = stopping
        # a handler whose cost is known: each `out` (but the exit status) sleeps this long and
        # makes as many extra syscalls
        self.out_sleep_s = 0.0
        self.out_syscalls = 0
        self.coalesced_zone = False

    def handle_out_slowly(self) -> None:
        if self.out_sleep_s:
            time.sleep(self.out_sleep_s)  # one clock_nanosleep
        for _ in range(self.out_syscalls):
            os.getppid()

    def serve(
        self, vcpu: Vcpu, on_in: Callable[[Vcpu, int], int], pace: Callable[[Vcpu], float]
    ) -> None:
        """The vCPU loop: run, handle the exit, repeat, until the guest writes its exit status."""
        run = vcpu.run
        while not self.stopping.is_set():
            if not vcpu.run_once():
                continue
            if self.coalesced_zone:
                self._drain(run)
            reason = struct.unpack_from("<I", run, 8)[0]
            self.counts.add(vcpu.index, reason)
            if reason == ExitReason.IO:
                direction, size, port, count, offset = IO.unpack_from(run, RUN_UNION)
                with self.counts.lock:
                    self.counts.io[(port, "out" if direction else "in", size)] += 1
                if direction == 0:
                    value = on_in(vcpu, port)
                    run[offset : offset + size * count] = (
                        (value.to_bytes(4, "little")[:size]) * count
                    )
                elif port == EXIT_STATUS_PORT:
                    vcpu.exit_status = run[offset]
                    return
                elif self.out_sleep_s or self.out_syscalls:
                    self.handle_out_slowly()
            elif reason == ExitReason.MMIO:
                address, _data, length, is_write = MMIO.unpack_from(run, RUN_UNION)
                with self.counts.lock:
                    self.counts.mmio[(address, length, bool(is_write))] += 1
                if not is_write:
                    run[MMIO_DATA : MMIO_DATA + length] = (0x5A5A5A5A5A5A5A5A).to_bytes(
                        8, "little"
                    )[:length]
            elif reason == ExitReason.HLT:
                delay = pace(vcpu)
                if delay < 0:
                    return
                time.sleep(delay)
            else:
                raise RuntimeError(f"vCPU {vcpu.index}: unexpected exit {exit_reason_name(reason)}")

    def coalesce(self, address: int, size: int) -> None:
        """Writes to [address, address + size) are queued in the ring, without an exit."""
        zone = struct.pack("<QII", address, size, 0)  # struct kvm_coalesced_mmio_zone, MMIO
        fcntl.ioctl(self.vm, KVM_REGISTER_COALESCED_MMIO, zone)
        self.coalesced_zone = True

    def _drain(self, run: mmap.mmap) -> None:
        """Take the ring's entries, as QEMU does after each exit: count them, move ``first``."""
        with self.counts.lock:
            first, last = struct.unpack_from("<II", run, COALESCED_RING)
            n = (last - first) % ((4096 - 8) // 24)  # KVM_COALESCED_MMIO_MAX
            self.counts.coalesced += n
            struct.pack_into("<I", run, COALESCED_RING, last)

    def run_all(self, on_in: Callable[[Vcpu, int], int], pace: Callable[[Vcpu], float]) -> None:
        failures: list[BaseException] = []

        left = [len(self.programs)]
        lock = threading.Lock()
        all_done = threading.Event()

        def body(index: int) -> None:
            _name_this_thread(f"CPU {index}/KVM")  # as QEMU names its vCPU threads
            try:
                if self.stagger_s:
                    time.sleep(index * self.stagger_s)
                    self.vcpus.append(
                        Vcpu(self.vm, index, self.mmap_size, self.programs[index], self.ram)
                    )
                vcpu = next(v for v in self.vcpus if v.index == index)
                self.serve(vcpu, on_in, pace)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)
                self.stopping.set()
            finally:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        all_done.set()

        threads = [
            threading.Thread(target=body, args=(i,), name=f"CPU {i}/KVM", daemon=True)
            for i in range(len(self.programs))
        ]
        for t in threads:
            t.start()
        # Python runs signal handlers only in this thread, and a signal a vCPU thread took does
        # not wake it: so it wakes up to run them (SIGTERM ends the guest).
        while not all_done.wait(0.05):
            pass
        for t in threads:
            t.join()
        if failures:
            raise failures[0]


def _address_of(buffer: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def counted_command(
    vcpus: int = 1,
    outs: int = 300,
    mmio_writes: int = 200,
    spin: int = 0,
    port: int = 0x80,
    mmio_addr: int = 0xC0000,
    exit_status: int = 0,
    report_json: str | None = None,
    stagger: float = 0.0,
    vms: int = 1,
    ins: int = 0,
    mmio_reads: int = 0,
    out_sleep_us: float = 0.0,
    out_syscalls: int = 0,
    coalesced: bool = False,
    own_stats: bool = False,
    name: str | None = None,
    irqchip: bool = False,
) -> list[str]:
    argv = [sys.executable, "-m", "kvmtop.minivmm", "counted", "--vcpus", str(vcpus),
            "--outs", str(outs), "--mmio-writes", str(mmio_writes), "--spin", str(spin),
            "--port", hex(port), "--mmio-addr", hex(mmio_addr), "--exit-status", str(exit_status)]  # fmt: skip
    argv += ["--stagger", str(stagger)] if stagger else []
    argv += ["--vms", str(vms)] if vms != 1 else []
    argv += ["--ins", str(ins), "--mmio-reads", str(mmio_reads)] if ins or mmio_reads else []
    argv += ["--out-sleep-us", str(out_sleep_us)] if out_sleep_us else []
    argv += ["--out-syscalls", str(out_syscalls)] if out_syscalls else []
    argv += ["--coalesced"] if coalesced else []
    argv += ["--own-stats"] if own_stats else []
    argv += ["--name", name] if name else []
    argv += ["--irqchip"] if irqchip else []
    return argv + (["--report-json", report_json] if report_json else [])


def demo_command(
    vcpus: int = 2,
    duration: float | None = None,
    report_json: str | None = None,
    phase_seconds: float = DEMO_PHASE_SECONDS,
) -> list[str]:
    argv = [sys.executable, "-m", "kvmtop.minivmm", "demo", "--vcpus", str(vcpus),
            "--phase-seconds", str(phase_seconds)]  # fmt: skip
    if duration is not None:
        argv += ["--duration", str(duration)]
    return argv + (["--report-json", report_json] if report_json else [])


COUNTED_IN = 0x42  # what the counted guest's `in` reads
COUNTED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGRTMIN + 1)


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15


def _name_this_thread(name: str) -> None:
    """The OS thread name (/proc/PID/task/TID/comm), at most 15 bytes."""
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _signal_name(signum: int) -> str:
    if signum >= signal.SIGRTMIN:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    return signal.Signals(signum).name


def _count_signals(vm: MiniVm, wake_r: int) -> None:
    try:
        received = os.read(wake_r, 1 << 16)
    except BlockingIOError:
        return
    for signum in COUNTED_SIGNALS:
        n = received.count(bytes([signum]))
        if n:
            vm.counts.signals[_signal_name(signum)] += n


def _write_report(vm: MiniVm, path: str | None) -> None:
    if path:
        report = vm.counts.as_json()
        # the VMM's own truth of where each vCPU's time went: in KVM_RUN, or handling its exits
        report["time_ns"] = {str(v.index): {"run": v.run_ns, "vmm": v.vmm_ns} for v in vm.vcpus}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmtop.minivmm")
    sub = parser.add_subparsers(dest="mode", required=True)
    counted = sub.add_parser("counted", help="make a known number of exits, then exit")
    counted.add_argument("--vcpus", type=int, default=1)
    counted.add_argument("--name", help="the VM's name, as QEMU's -name (kvmtop list shows it)")
    counted.add_argument("--outs", type=int, default=300)
    counted.add_argument("--port", type=lambda s: int(s, 0), default=0x80)
    counted.add_argument("--mmio-writes", type=int, default=200)
    counted.add_argument("--mmio-addr", type=lambda s: int(s, 0), default=0xC0000)
    counted.add_argument("--spin", type=int, default=0, help="loop iterations without exits first")
    counted.add_argument("--exit-status", type=int, default=0)
    counted.add_argument("--report-json")
    counted.add_argument("--stagger", type=float, default=0.0, help="create vCPU i after i*S s")
    counted.add_argument("--vms", type=int, default=1, help="as many VMs, all running at once")
    counted.add_argument("--ins", type=int, default=0, help=f"`in` exits (read {COUNTED_IN:#x})")
    counted.add_argument("--mmio-reads", type=int, default=0, help="MMIO reads (read 0x5a)")
    counted.add_argument("--out-sleep-us", type=float, default=0.0, help="each out sleeps so long")
    counted.add_argument("--own-stats", action="store_true",
                         help="hold KVM stats fds of the VM and each vCPU, as a QEMU may")  # fmt: skip
    counted.add_argument("--out-syscalls", type=int, default=0, help="...and makes N syscalls")
    counted.add_argument("--irqchip", action="store_true",
                         help="an in-kernel irqchip: vCPUs but 0 wait inside KVM_RUN for ever")  # fmt: skip
    counted.add_argument("--coalesced", action="store_true",
                         help="register the MMIO address as a coalesced zone: writes queue, no exit")  # fmt: skip
    demo = sub.add_parser("demo", help="an endless, changing mix of exits")
    demo.add_argument("--vcpus", type=int, default=2)
    demo.add_argument("--duration", type=float)
    demo.add_argument("--phase-seconds", type=float, default=DEMO_PHASE_SECONDS)
    demo.add_argument("--report-json")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping.set()

    # Before any vCPU exists, so that every signal sent once it does is counted.
    for sig in (signal.SIGTERM, signal.SIGINT, *COUNTED_SIGNALS):
        signal.signal(sig, on_signal)
    # Python may run one handler for several deliveries of a signal; the wakeup fd gets one
    # byte per delivery, whichever thread took it: an exact count of each signal received.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    if args.mode == "counted":
        programs = [
            guestcode.counted(
                args.outs,
                args.mmio_writes,
                args.spin,
                args.port,
                args.mmio_addr,
                args.exit_status,
                args.ins,
                args.mmio_reads,
            )  # fmt: skip
            for _ in range(args.vcpus)
        ]
    else:
        programs = [guestcode.demo(i) for i in range(args.vcpus)]
    try:
        vms = [MiniVm(programs, stopping, getattr(args, "stagger", 0.0),
                      getattr(args, "irqchip", False))
               for _ in range(getattr(args, "vms", 1))]  # fmt: skip
    except KvmUnavailableError as exc:
        print(f"minivmm: {exc}", file=sys.stderr)
        return 7
    vm = vms[0]
    # like a QEMU that keeps them for query-stats: stats fds of its own, held to the end
    _held = [fcntl.ioctl(fd, KVM_GET_STATS_FD, 0) for one in vms if getattr(args, "own_stats", False)
            for fd in (one.vm, *(v.fd for v in one.vcpus))]  # fmt: skip
    for one in vms:
        one.out_sleep_s = getattr(args, "out_sleep_us", 0.0) / 1e6
        one.out_syscalls = getattr(args, "out_syscalls", 0)
    if getattr(args, "coalesced", False):
        for each in vms:
            each.coalesce(args.mmio_addr, 8)

    started = time.monotonic()
    if args.mode == "counted":
        others = [threading.Thread(target=other.run_all, args=(lambda _v, _port: COUNTED_IN, lambda _v: -1.0))
                  for other in vms[1:]]  # fmt: skip
        for thread in others:
            thread.start()
        vm.run_all(lambda _v, _port: COUNTED_IN, lambda _v: -1.0)
        for thread in others:
            thread.join()
        _count_signals(vm, wake_r)
        _write_report(vm, args.report_json)
        return max(v.exit_status or 0 for one in vms for v in one.vcpus)

    def phase(vcpu: Vcpu, port: int) -> int:
        if port != guestcode.PHASE_PORT:
            return 0x60 if port == 0x3FD else 0  # LSR: transmitter empty
        return (int((time.monotonic() - started) / args.phase_seconds) + vcpu.index) % 3

    def pace(vcpu: Vcpu) -> float:
        if args.duration is not None and time.monotonic() - started >= args.duration:
            return -1.0
        return DEMO_PACE_S[phase(vcpu, guestcode.PHASE_PORT)]

    vm.run_all(phase, pace)
    _count_signals(vm, wake_r)
    _write_report(vm, args.report_json)
    return 0
