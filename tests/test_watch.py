"""`kvmtop watch`: KVM's counters and samples of each vCPU's kvm_run, the VMM never traced after
the counters' moment, its fd table unchanged, and shares that agree with the tracer's."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import (
    as_nobody,
    assert_one_line_error,
    held_timed_vmm,
    let_go,
    own_clock,
    start_minivmm,
    start_qemu,
    wait_for_vcpus,
)

from kvmtop.commands.watch import snapshot_text
from kvmtop.host.procfs import is_stopped, tracer_pid
from kvmtop.sampling.entry_cost import EntryCost, measure
from kvmtop.sampling.shares import vmm_own_bound
from kvmtop.sampling.watcher import Watcher

# alone: a look's timing is what these test, and another worker's guests move it: where the
# host has more threads to run than CPUs, a look waits for a CPU as the VMM does, and sees the
# VMM at moments that depend on what it is doing (the bounds allow for the sampler's own
# stretch of the VMM's time, not for that)
pytestmark = [pytest.mark.kvm, pytest.mark.alone, pytest.mark.usefixtures("pure_sampler")]


def tracers(pid: int) -> set[int]:
    """The TracerPid of every thread of ``pid``."""
    return {tracer_pid(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def fd_links(pid: int) -> dict[str, str]:
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def io_loop(processes, **options) -> subprocess.Popen[bytes]:
    vmm = start_minivmm(processes, outs=10_000_000, mmio_writes=0, **options)
    time.sleep(0.2)  # running its loop
    return vmm


def test_a_watched_port_io_loop_is_never_traced_and_shows_its_port(processes):
    vmm = io_loop(processes, out_sleep_us=100)
    before = fd_links(vmm.pid)
    seen: list[set[int]] = []
    with Watcher(vmm.pid, rate_hz=2000) as watcher:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # TracerPid throughout the watch
            seen.append(tracers(vmm.pid))
            time.sleep(0.01)
        snap = watcher.snapshot()
    assert set().union(*seen) == {0} and len(seen) > 50, [
        (i, t) for i, t in enumerate(seen) if t != {0}
    ]
    assert fd_links(vmm.pid) == before  # the counters' fds were closed in the VMM too
    assert snap.counters and snap.reset_seen and not snap.note
    (vcpu,) = snap.vcpus
    assert vcpu.samples > 500 and vcpu.exits_per_s and vcpu.exits_per_s > 100
    io = vcpu.by_reason["KVM_EXIT_IO"]
    # a handler that sleeps 100 µs per exit of a guest that does nothing else: mostly the VMM
    assert io.value > 0.6 and set(vcpu.by_reason) == {"KVM_EXIT_IO"}
    assert snap.top_ports[0].label == "0x0080 out POST" and len(snap.top_ports) == 1
    assert vmm.poll() is None  # it runs on


def test_a_watched_mmio_loop_shows_its_address(processes):
    vmm = start_minivmm(processes, outs=0, mmio_writes=10_000_000, mmio_addr=0xD0000)
    with Watcher(vmm.pid, rate_hz=2000) as watcher:
        time.sleep(1.0)
        snap = watcher.snapshot()
    (vcpu,) = snap.vcpus
    assert max(vcpu.by_reason, key=lambda r: vcpu.by_reason[r].hits) == "KVM_EXIT_MMIO"
    assert snap.top_addresses[0].label == "0xd0000 write" and not snap.top_ports
    assert vcpu.mean_vmm_ns.get("KVM_EXIT_MMIO", 0) > 0  # KVM counts mmio_exits


@pytest.mark.qemu
def test_a_watched_qemu_is_never_traced_and_its_port_io_leads(bios, processes):
    vmm = start_qemu(processes, bios(outs=0xFFFFFFFF, mmio_writes=0))  # hours of `out 0x80`
    time.sleep(0.3)  # in its loop
    before = fd_links(vmm.pid)
    seen: list[set[int]] = []
    with Watcher(vmm.pid, rate_hz=2000) as watcher:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            seen.append(tracers(vmm.pid))
            time.sleep(0.01)
        snap = watcher.snapshot()
    assert set().union(*seen) == {0} and len(seen) > 50
    assert fd_links(vmm.pid) == before
    assert snap.reset_seen and snap.counters and snap.vm.in_run.hits > 0
    (vcpu,) = snap.vcpus
    assert max(vcpu.by_reason, key=lambda r: vcpu.by_reason[r].hits) == "KVM_EXIT_IO"
    assert snap.top_ports[0].label == "0x0080 out POST"
    assert vcpu.exits_per_s and vcpu.exits_per_s > 1000
    assert vmm.poll() is None


def test_a_vmm_that_ends_mid_watch_ends_the_watch_and_leaves_no_fd_behind(processes):
    vmm = start_minivmm(processes, outs=30_000, mmio_writes=0)
    ours = set(os.listdir("/proc/self/fd"))
    with Watcher(vmm.pid, rate_hz=1000) as watcher:
        vmm.wait(60)
        assert not watcher.alive
        snap = watcher.snapshot()
        assert snap.vcpus[0].samples > 0
    assert set(os.listdir("/proc/self/fd")) == ours
    result = subprocess.run([sys.executable, "-m", "kvmtop", "watch", "-p", str(vmm.pid)],
                            capture_output=True, text=True)  # fmt: skip
    assert_one_line_error(result, 3, f"no such process: {vmm.pid}")


def test_the_watch_command_ends_with_its_vmm(processes):
    vmm = start_minivmm(processes, outs=10_000, mmio_writes=0, out_sleep_us=200)  # ~3 s
    result = subprocess.run([sys.executable, "-m", "kvmtop", "watch", "-p", str(vmm.pid), "--json",
                             "--interval", "0.2"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and result.stderr == f"kvmtop: pid {vmm.pid} exited\n"
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert reports and all(r["pid"] == vmm.pid for r in reports)
    assert reports[0]["vcpus"]["0"]["vmm_by_reason"]["KVM_EXIT_IO"]["hits"] > 0
    # a vCPU seen inside KVM_RUN by the end (this handler leaves it there ~2% of the time)
    assert reports[-1]["reset_seen"] and reports[0]["kernel"] == os.uname().release


def test_bad_pids_and_no_permission_get_one_line(processes):
    result = subprocess.run([sys.executable, "-m", "kvmtop", "watch", "-p", str(os.getpid())],
                            capture_output=True, text=True)  # fmt: skip
    assert_one_line_error(result, 4, "not a KVM process")
    for bad in (["--rate", "0"], ["--interval", "0"], ["--count", "0"]):
        result = subprocess.run([sys.executable, "-m", "kvmtop", "watch", "-p", "1", *bad],
                                capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr
    if os.geteuid() == 0:
        vmm = io_loop(processes)
        result = as_nobody("watch", "-p", str(vmm.pid), "--count", "1")
        assert_one_line_error(result, 5, "needs its user or CAP_SYS_PTRACE")


def test_kvm_s_own_part_of_each_exit_is_timed_on_a_vm_of_kvmtop_s_own():
    if importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip(
            "kvmtop.native._sampler is not built (no C compiler or Python headers at install)"
        )
    entry = measure()
    assert isinstance(entry, EntryCost), entry
    # KVM_RUN's entry work on any host takes some hundreds of ns at least, and far under a ms
    assert 100 < entry.head_ns < 1e6 and 10 < entry.tail_ns < 1e6 and entry.timed >= 300
    assert measure() is entry  # once per process
    assert entry.text().startswith(f"{entry.ns / 1e3:.1f} µs (entry ")


def test_a_host_that_cannot_time_kvm_s_part_now_is_asked_again_later():
    """One CPU to run on (as a host whose CPUs are all taken leaves the watching thread none):
    not timed, and said why; given two, the same process times it, and keeps that."""
    if importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip("kvmtop.native._sampler is not built: KVM's part of each exit is not timed")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    program = (
        "import os\n"
        "from kvmtop.sampling.entry_cost import EntryCost, measure\n"
        f"os.sched_setaffinity(0, {{{cpus[0]}}})\n"
        "first = measure()\n"
        f"os.sched_setaffinity(0, {set(cpus)!r})\n"
        "second = measure()\n"
        "print(repr(first)); print(isinstance(second, EntryCost), measure() is second)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    first, second = result.stdout.splitlines()
    assert "it takes two CPUs" in first and second == "True True"


@pytest.mark.parametrize(
    ("mode", "handler_us", "exits"), [("io", 100, 10_000), ("io-sleep", 1000, 2000)]
)
def test_the_vmm_s_own_share_lies_in_the_watch_s_bound_by_the_vmm_s_own_clock(
    timed_vmm, processes, mode, handler_us, exits
):
    """A C VMM times its own KVM_RUN calls (two clock reads tens of ns from the syscall): the
    share of time it spent out of KVM_RUN (handling exits, spinning 100 µs, or sleeping 1 ms so
    that each run begins after a wake-up) is the truth. The looks also count, as the VMM's,
    KVM's own part of each exit (before it resets exit_reason at entry, after it sets the next),
    which differs between VMs and moments: the watch's bound of the VMM's own share allows it
    anything from nothing to its most, and holds the truth; and it says something (narrower
    than the share itself)."""
    if importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip("kvmtop.native._sampler is not built: KVM's part of each exit is not timed")
    assert isinstance(measure(), EntryCost)  # timed before the VMM starts: the watch sees it all
    vmm = held_timed_vmm(timed_vmm, str(exits), str(handler_us), mode)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    with Watcher(vmm.pid, rate_hz=4000) as watcher:
        own = own_clock(vmm)
        snap = watcher.snapshot()  # the VMM's threads' wait for a CPU read: the stretch's cap
    let_go(vmm)
    truth = own["out_ns"] / (own["out_ns"] + own["in_run_ns"])
    (vcpu,) = snap.vcpus
    assert vcpu.samples > 1000 and vcpu.vmm_own is not None, (snap.note, snap.entry)
    bound = vcpu.vmm_own
    assert bound.low <= truth <= bound.high, (bound, truth, vcpu.vmm.text(), snap.entry)
    assert bound.high - bound.low < truth
    assert vcpu.by_reason["KVM_EXIT_IO"].hits == vcpu.vmm.hits  # every look out saw the `out`


def test_each_reason_s_vmm_time_per_exit_lies_in_its_bound_by_a_c_vmm_s_clock(timed_vmm, processes):
    """A C VMM alternates `out` and MMIO writes, spins 100 µs after each `out` and 50 µs after
    each write, and times its KVM_RUN calls to tens of ns: each reason's VMM time per exit, as
    its own clock says, lies in the bound of its sampled share net of KVM's part (from nothing
    to its most), and that bound is narrower than the time itself."""
    if importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip("needs kvmtop.native._sampler (KVM's part of each exit)")
    vmm = held_timed_vmm(timed_vmm, "40000", "100", "mix")
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    with Watcher(vmm.pid, rate_hz=4000, counters=False) as watcher:
        time.sleep(0.2)
        watcher.snapshot()  # the loop from here on
        own = own_clock(vmm)
        snap = watcher.snapshot()
    let_go(vmm)
    assert isinstance(snap.entry, EntryCost), snap.entry
    total = own["in_run_ns"] + own["out_ns"]
    for key, label, handler_ns in (("io", "KVM_EXIT_IO", 100e3), ("mmio", "KVM_EXIT_MMIO", 50e3)):
        n, ns = own[key]
        truth = ns / n
        assert truth >= handler_ns  # the VMM spun as it was told
        vcpu = snap.vcpus[0]
        bound = vmm_own_bound(vcpu.by_reason[label], total, n, snap.entry, vcpu.stretch(label))
        assert bound is not None
        low, high = bound.low / n, bound.high / n
        assert low <= truth <= high, (label, low, high, truth, snap.entry)
        assert high - low < truth


def test_a_vcpu_waiting_inside_kvm_run_reads_in_kvm_run_not_a_stale_reason(processes):
    """With an in-kernel irqchip, minivmm's second vCPU waits in KVM_RUN for a SIPI that never
    comes; KVM does not reset exit_reason on that path, so after a signal (kvmtop's own kick
    when it takes the counters, here one sent to that thread) its page says KVM_EXIT_INTR for as
    long as it waits. The watch reads it as in KVM_RUN (KVM's `blocking` counter), not the VMM."""
    vmm = start_minivmm(processes, vcpus=2, irqchip=True, outs=10_000_000, mmio_writes=0,
                        out_sleep_us=100)  # fmt: skip
    wait_for_vcpus(vmm.pid, 2)
    time.sleep(0.3)
    with Watcher(vmm.pid, rate_hz=2000) as watcher:
        waiting = next(t for t in os.listdir(f"/proc/{vmm.pid}/task")
                       if open(f"/proc/{vmm.pid}/task/{t}/comm").read().strip() == "CPU 1/KVM")  # fmt: skip
        tgkill(vmm.pid, int(waiting), signal.SIGUSR1)  # KVM_RUN returns EINTR; minivmm re-enters
        time.sleep(0.1)
        watcher.snapshot()
        time.sleep(1.0)
        snap = watcher.snapshot()
    first, second = snap.vcpus
    assert first.by_reason["KVM_EXIT_IO"].value > 0.5  # the `out` loop, in the VMM
    assert second.samples > 500 and second.vmm.high < 0.01, second.by_reason
    assert "KVM_EXIT_INTR" not in second.by_reason and second.stale > 0.9 * second.samples
    assert snap.reset_seen and not snap.note


def test_a_stopped_vmm_is_said_to_be_stopped_not_a_kernel_that_keeps_its_reasons(processes):
    vmm = io_loop(processes, out_sleep_us=100)
    os.kill(vmm.pid, signal.SIGSTOP)
    try:
        while not is_stopped(vmm.pid):
            time.sleep(0.01)
        with Watcher(vmm.pid, rate_hz=2000, counters=False) as watcher:
            time.sleep(0.3)  # more than the 200 looks of the kernel's check
            stopped = watcher.snapshot()
            text = snapshot_text(stopped)
            os.kill(vmm.pid, signal.SIGCONT)
            deadline = time.monotonic() + 10  # beside stress-ng it may take a while to run
            while True:
                time.sleep(0.5)
                running = watcher.snapshot()
                if running.reset_seen or time.monotonic() > deadline:
                    break
    finally:
        os.kill(vmm.pid, signal.SIGCONT)
    assert stopped.stopped and not stopped.reset_seen and stopped.vcpus[0].samples >= 200
    assert f"pid {vmm.pid} is stopped" in stopped.note and "may not reset" not in stopped.note
    assert f"pid {vmm.pid} is stopped" in text and "kernel" not in stopped.note
    assert not running.stopped and running.reset_seen and not running.note


def tgkill(pid: int, tid: int, signum: int) -> None:
    """A signal to one thread of another process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(234, pid, tid, signum) != 0:  # SYS_tgkill (x86_64)
        raise OSError(ctypes.get_errno(), "tgkill")


def test_a_thread_reads_the_watch_while_the_sampler_runs(processes):
    vmm = io_loop(processes)
    with Watcher(vmm.pid, rate_hz=1000) as watcher:
        shares: list[float] = []
        reader = threading.Thread(target=lambda: [shares.append(watcher.snapshot().vm.vmm.value)
                                                  or time.sleep(0.05) for _ in range(10)])  # fmt: skip
        reader.start()
        reader.join(10)
    assert len(shares) == 10 and all(0 <= s <= 1 for s in shares)


def test_a_vmm_holding_its_own_stats_fds_is_never_stopped_at_all(processes):
    # handling of 10 µs, not 100: the vCPU is inside KVM_RUN for a share of the looks that a busy
    # host (whose sleeps of 100 µs last ~1 ms) does not shrink below what 0.5 s of looks sees
    vmm = start_minivmm(processes, outs=10_000_000, mmio_writes=0, out_sleep_us=10,
                        own_stats=True)  # fmt: skip
    time.sleep(0.2)
    before = fd_links(vmm.pid)
    assert sum(link.startswith("anon_inode:kvm-vcpu-stats") for link in before.values()) == 1
    seen: list[set[int]] = []
    done = threading.Event()

    def poll() -> None:  # from before the watch starts
        while not done.is_set():
            seen.append(tracers(vmm.pid))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(0.05)
        with Watcher(vmm.pid, rate_hz=2000) as watcher:
            time.sleep(0.5)
            snap = watcher.snapshot()
    finally:
        done.set()
        poller.join()
    assert watcher.counters_copied and snap.counters and not snap.note
    assert set().union(*seen) == {0} and len(seen) > 20  # no attach, not even the first moment
    assert fd_links(vmm.pid) == before
    assert snap.vcpus[0].exits_per_s and snap.vcpus[0].by_reason["KVM_EXIT_IO"].hits > 0


def test_an_internal_error_the_guest_ran_on_after_is_stale_and_one_it_did_not_is_the_vmm_s(
    tmp_path,
):
    """KVM may write KVM_EXIT_INTERNAL_ERROR into kvm_run and run the guest on (an emulation
    failure it handles itself): a look at that reason is the VMM's only if the vCPU's `exits`
    counter did not move by its next look. Without the vCPU's stats fd nothing can tell."""
    from kvmtop.abi.kvm import RUN_EXIT_REASON
    from kvmtop.sampling.sampler import make_sampler
    from kvmtop.xlat_exit import ExitReason

    pages = [bytearray(8192), bytearray(8192)]
    for page in pages:
        page[RUN_EXIT_REASON : RUN_EXIT_REASON + 4] = int(ExitReason.INTERNAL_ERROR).to_bytes(
            4, "little"
        )
    stats = tmp_path / "stats"
    stats.write_bytes(bytes(16))  # `blocking` 0 at 0, `exits` at 8
    fd = os.open(stats, os.O_RDWR)
    running = threading.Event()

    def guest_runs() -> None:  # KVM's exits counter while the guest runs on
        exits = 0
        while running.is_set():
            exits += 1
            os.pwrite(fd, exits.to_bytes(8, "little"), 8)
            time.sleep(0.00005)

    sampler = make_sampler(500.0, 1)
    sampler.add(pages[0], fd, 0, 8)
    sampler.add(pages[1])  # no stats fd
    running.set()
    writer = threading.Thread(target=guest_runs)
    writer.start()
    sampler.start()
    try:
        time.sleep(0.5)
        _ns, _looks, ran_on, _cpu = sampler.take()
        running.clear()
        writer.join()
        time.sleep(0.01)  # (the look held across the stop)
        sampler.take()
        time.sleep(0.5)  # a real one: the VMM holds the vCPU, the guest does not run
        _ns, _looks, stopped, _cpu = sampler.take()
    finally:
        running.clear()
        sampler.stop()
        os.close(fd)
    samples, in_run, keys, stale, _code, _stretch = ran_on[0]
    # (a look the writer's thread was late for, under load, reads as the VMM's)
    assert samples > 120 and in_run == stale > 0.9 * samples, ran_on[0]
    samples, in_run, keys, stale, _code, _stretch = stopped[0]
    assert samples > 120 and in_run == stale == 0, stopped[0]
    assert keys == [(ExitReason.INTERNAL_ERROR, 0, samples)]
    for taken in (ran_on, stopped):  # without its stats fd: the VMM's, as it reads
        samples, in_run, keys, _stale, _code, _stretch = taken[1]
        assert in_run == 0 and keys == [(ExitReason.INTERNAL_ERROR, 0, samples)]
