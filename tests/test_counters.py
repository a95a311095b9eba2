"""KVM's own counters: the binary stats layout (pure), and stats fds taken from a real VMM by a
brief attach, while its threads run on, signals and all, exactly as before."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from guests.qemu_bios import build_bios, qemu_command
from helpers import KVMTOP, SECCOMP_ALLOW_ALL, a_vcpu_thread, kvm_fds_of, tgkill, wait_for_vcpus

from kvmtop.abi.binary_stats import (
    CUMULATIVE,
    LOG_HIST,
    PEAK,
    StatsFormatError,
    decode_values,
    histogram_percentile,
    parse_layout,
)
from kvmtop.counters.taking import settle_stats, take_stats
from kvmtop.counters.vm_stats import VmStats
from kvmtop.host.procfs import fd_table, tracer_pid
from kvmtop.minivmm.vmm import counted_command
from kvmtop.trace.inject import VM
from kvmtop.tracer_thread import Tracer

NAME_SIZE = 48

pytestmark = pytest.mark.usefixtures("engine")  # on the C engine and on its reference


def stats_blob(descs: list[tuple[str, int, int, int, int]], data: list[int]) -> bytes:
    """A stats file as KVM lays it out: (name, flags, exponent, size, bucket_size) each."""
    ident = b"kvm-42/vcpu-0".ljust(NAME_SIZE, b"\0")
    desc_offset = 24 + NAME_SIZE
    step = 16 + NAME_SIZE
    data_offset = desc_offset + len(descs) * step
    out = struct.pack("<6I", 0, NAME_SIZE, len(descs), 24, desc_offset, data_offset) + ident
    offset = 0
    for name, flags, exponent, size, bucket_size in descs:
        out += struct.pack("<IhHII", flags, exponent, size, offset, bucket_size)
        out += name.encode().ljust(NAME_SIZE, b"\0")
        offset += 8 * size
    return out + struct.pack(f"<{len(data)}Q", *data)


DESCS = [
    ("exits", CUMULATIVE, 0, 1, 0),
    ("halt_wait_ns", CUMULATIVE | 0x20, -9, 1, 0),  # seconds, base 10, exponent -9
    ("max_rmap", PEAK, 0, 1, 0),
    ("halt_wait_hist", LOG_HIST | 0x20, -9, 4, 0),
]


def test_descriptors_come_from_the_file_with_units_and_types():
    blob = stats_blob(DESCS, [7, 1500, 3, 0, 1, 0, 9])
    layout = parse_layout(blob)
    assert layout.ident == "kvm-42/vcpu-0"
    names = [d.name for d in layout.descs]
    assert names == ["exits", "halt_wait_ns", "max_rmap", "halt_wait_hist"]
    wait = layout.descs[1]
    assert (wait.unit, wait.kind, wait.in_unit(1500)) == ("seconds", CUMULATIVE, 1.5e-6)
    hist = layout.descs[3]
    assert hist.histogram and hist.size == 4
    values = decode_values(layout, blob[layout.data_offset :])
    assert values == {"exits": 7, "halt_wait_ns": 1500, "max_rmap": 3,
                      "halt_wait_hist": (0, 1, 0, 9)}  # fmt: skip
    # log2 buckets: 0 holds 0, i holds [2**(i-1), 2**i): 9 of 10 values are in bucket 3 (4..7 ns)
    assert histogram_percentile(hist, (0, 1, 0, 9), 0.5) == pytest.approx(4e-9)
    assert histogram_percentile(hist, (0, 1, 0, 9), 0.05) == pytest.approx(1e-9)
    assert histogram_percentile(hist, (0, 0, 0, 0), 0.5) is None


@pytest.mark.parametrize("cut", [0, 10, 24, 80, 200])
def test_a_truncated_stats_file_is_refused(cut):
    blob = stats_blob(DESCS, [7, 1500, 3, 0, 1, 0, 9])
    with pytest.raises(StatsFormatError):
        layout = parse_layout(blob[:cut])
        decode_values(layout, blob[layout.data_offset : cut])


def test_an_implausible_header_is_refused():
    with pytest.raises(StatsFormatError):
        parse_layout(struct.pack("<6I", 0, 48, 10**6, 24, 72, 0) + bytes(100))


def settled_fd_table(pid: int) -> dict[int, str]:
    """The VMM's fd table once it stops changing (it may still be making vCPUs and their
    mappings right after the first vCPU fd shows)."""
    table = fd_table(pid)
    while True:
        time.sleep(0.05)
        again = fd_table(pid)
        if again == table:
            return table
        table = again


def _signal_while(pid: int, tid: int, sig: int, until: threading.Event) -> list[int]:
    sent = [0]

    def run() -> None:
        while not until.is_set():
            tgkill(pid, tid, sig)
            sent[0] += 1
            time.sleep(0.01)

    threading.Thread(target=run, daemon=True).start()
    return sent


def _take_under_signals(pid: int, tid: int, sig: int, settle: float = 0.0
                        ) -> tuple[VmStats, int]:  # fmt: skip
    """Attach, wait ``settle`` s, take the stats fds, detach, while ``sig`` rains on thread
    ``tid``; (stats, signals sent)."""
    done = threading.Event()
    sent = _signal_while(pid, tid, sig, done)
    tracer = Tracer()
    tracer.start()
    try:
        tracer.attach(pid).result(10)
        time.sleep(settle)  # the attach kicked every vCPU out of KVM_RUN: let them re-enter
        try:
            stats = settle_stats(pid, tracer.stats_fds())
        finally:
            tracer.detach().result(10)
    finally:
        tracer.stop()
        done.set()
        time.sleep(0.05)
    return stats, sent[0]


@pytest.mark.kvm
def test_counters_after_detach_count_the_guests_exits(tmp_path, processes):
    """Taken while the guest spins (no exits): the VMM's main thread, blocked in a syscall and
    woken by signals, makes the VM's fd; the vCPU's own thread makes the vCPU's, once kvmtop
    kicks it out of KVM_RUN. Then kvmtop detaches; KVM's counters show every exit."""
    n = 20_000
    own = tmp_path / "own.json"
    vmm = subprocess.Popen(counted_command(outs=n, mmio_writes=0, spin=6_000_000,
                                           report_json=str(own)))  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    vcpu_thread = a_vcpu_thread(vmm.pid)
    before = settled_fd_table(vmm.pid)
    # signals to the main thread only: the vCPU spins in KVM_RUN, making no stop at all
    stats, signals = _take_under_signals(vmm.pid, vmm.pid, signal.SIGUSR1, settle=0.1)
    try:
        assert fd_table(vmm.pid) == before  # the VMM's copies were closed
        assert tracer_pid(vmm.pid) == 0  # detached: the counters cost the VM nothing
        assert stats.vcpus.keys() == {0} and stats.vm is not None
        # the VM's by its main thread, blocked in a syscall; the vCPU's by its own thread, at
        # the entry of a KVM_RUN (another thread's ioctl would wait for the vCPU's mutex)
        assert stats.made_by == {VM: vmm.pid, 0: vcpu_thread}
        first = stats.sample()
        assert vmm.wait(120) == 0
        last = stats.sample()
    finally:
        stats.close()
    grew = {k: last.vcpus[0][k] - first.vcpus[0][k]  # type: ignore[operator]
            for k in ("exits", "io_exits", "insn_emulation")}  # fmt: skip
    assert grew["exits"] > 0
    # Each `out` is a hardware IO exit, or (real-mode code without "unrestricted guest", as under
    # nested virtualization) an instruction KVM emulates, some without a VM exit at all; either
    # way KVM counted it.
    assert grew["io_exits"] + grew["insn_emulation"] >= n
    report = json.loads(own.read_text())
    assert report["exits"] == {"KVM_EXIT_IO": n + 1}
    assert report["signals"] == {"SIGUSR1": signals}  # none lost, none doubled


@pytest.mark.kvm
@pytest.mark.parametrize("signals", [False, True])
def test_a_vcpu_thread_busy_in_kvm_run_makes_the_fds_and_loses_no_signal(
    tmp_path, processes, signals
):
    n = 60_000
    own = tmp_path / "own.json"
    vmm = subprocess.Popen(counted_command(outs=n, mmio_writes=0, report_json=str(own)))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    time.sleep(0.2)  # well into its stream of port-IO exits
    vcpu_thread = a_vcpu_thread(vmm.pid)
    if signals:  # each kicks the vCPU out of KVM_RUN
        stats, sent = _take_under_signals(vmm.pid, vcpu_thread, signal.SIGUSR2)
    else:
        stats, sent = take_stats(vmm.pid), 0
    try:
        assert vmm.poll() is None, "the guest ended before the fds were taken: raise n"
        assert stats.made_by[0] == vcpu_thread  # at the entry of one of its KVM_RUNs
        assert stats.sample().vcpus[0]["exits"] > 0
    finally:
        stats.close()
    assert vmm.wait(120) == 0
    report = json.loads(own.read_text())
    assert report["exits"] == {"KVM_EXIT_IO": n + 1}
    assert report["signals"] == ({"SIGUSR2": sent} if sent else {})


@pytest.mark.kvm
def test_the_stats_command_prints_json_per_interval(processes):
    vmm = subprocess.Popen(counted_command(outs=2_000_000, mmio_writes=0, spin=2_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    result = subprocess.run([*KVMTOP, "stats", "-p", str(vmm.pid), "--json", "--count", "2",
                             "--interval", "0.5"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and lines[0]["pid"] == vmm.pid
    assert lines[1]["t"] > lines[0]["t"] > 0
    assert lines[1]["vcpus"]["0"]["exits"] >= lines[0]["vcpus"]["0"]["exits"] > 0
    assert "exits" in lines[1]["rates"]["0"] and "vm" in lines[1]["rates"]
    assert vmm.poll() is None and tracer_pid(vmm.pid) == 0  # runs on, untraced


def test_stats_of_a_process_that_is_not_a_vmm_is_one_line():
    result = subprocess.run([*KVMTOP, "stats", "-p", str(os.getpid())], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 4
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kvmtop: ")


@pytest.mark.qemu
def test_qemu_keeps_running_exactly_after_its_counters_are_taken(tmp_path, processes):
    """QEMU (main loop, RCU thread, vCPU thread): fds taken, its fd table as before, its guest
    ends as it would (isa-debug-exit: status 1), and KVM counted the guest's port IO."""
    n = 5_000
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=n, mmio_writes=0, spin_iterations=4_000_000))
    vmm = subprocess.Popen(qemu_command(str(bios)), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    before = settled_fd_table(vmm.pid)
    stats = take_stats(vmm.pid)
    try:
        assert fd_table(vmm.pid) == before and tracer_pid(vmm.pid) == 0
        assert vmm.wait(120) == 1
        total = stats.sample().vcpus[0]
    finally:
        stats.close()
    assert total["io_exits"] + total["insn_emulation"] >= n  # type: ignore[operator]


def threads_in_kvm_run(pid: int) -> list[int]:
    """The threads of ``pid`` inside ioctl(fd, KVM_RUN) now (/proc/PID/task/TID/syscall)."""
    inside = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if len(fields) > 2 and fields[0] == "16" and int(fields[2], 16) == 0xAE80:
            inside.append(int(tid))
    return inside


@pytest.mark.qemu
def test_signal_exits_leave_out_the_kicks_of_kvmtop_s_own_attach_and_detach(tmp_path, processes):
    """An idle QEMU guest (2 vCPUs halted in KVM_RUN): every attach and detach of kvmtop ends
    their KVM_RUNs, and KVM counts each as a signal exit. Each run leaves its own out and says
    how many; those of runs before it stay in the counter, as the kernel kept them. A detach
    that lands as a vCPU thread enters KVM_RUN would leave kvmtop's interrupt pending, so that
    KVM_RUN ended once more after kvmtop had gone: kvmtop runs that KVM_RUN to its EINTR,
    seen and counted, before it lets go. One more per vCPU can still be left unseen (1 run
    in about 20, on the pure engine too): a path not yet found."""
    bios = tmp_path / "hlt.bin"
    bios.write_bytes(b"\xf4" * 0x10000)  # the reset vector's hlt, interrupts off: halted for good
    vmm = subprocess.Popen(qemu_command(str(bios), "-smp", "2"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 2)
    deadline = time.monotonic() + 10
    while len(threads_in_kvm_run(vmm.pid)) < 2:  # both halted inside KVM_RUN
        assert time.monotonic() < deadline, "QEMU's vCPUs did not enter KVM_RUN"
        time.sleep(0.05)
    runs = []
    for _ in range(3):
        result = subprocess.run([*KVMTOP, "stats", "-p", str(vmm.pid), "--json", "--count", "1"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout))
    for before, after in zip(runs, runs[1:], strict=False):
        for vcpu in ("0", "1"):
            assert before["kvmtop_signal_exits"][vcpu] >= 1  # the attach kicked it
            kicks = before["kvmtop_signal_exits"][vcpu]
            left = after["vcpus"][vcpu]["signal_exits"] - before["vcpus"][vcpu]["signal_exits"]
            assert kicks <= left <= kicks + 1  # what `before`'s run left in the counter
    text = subprocess.run([*KVMTOP, "stats", "-p", str(vmm.pid), "--count", "1"],
                          capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "note: signal_exits leaves out the " in text
    assert vmm.poll() is None and tracer_pid(vmm.pid) == 0


@pytest.mark.kvm
def test_stats_into_a_closed_pipe_ends_quietly(processes):
    vmm = subprocess.Popen(counted_command(outs=2_000_000, mmio_writes=0, spin=2_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    result = subprocess.run(f"set -o pipefail; {' '.join(KVMTOP)} stats -p {vmm.pid} --json "
                            f"--interval 0.2 | head -c 10", shell=True, executable="/bin/bash",
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert len(result.stdout) == 10
    assert vmm.poll() is None and tracer_pid(vmm.pid) == 0


@pytest.mark.parametrize("err", [errno.ENOTTY, errno.EINVAL])
def test_a_kernel_without_binary_stats_is_said_so_in_one_line(err):
    from concurrent.futures import Future

    from kvmtop.abi.arch import x86_64
    from kvmtop.trace.inject import StatsJob

    job = StatsJob(Future(), [(VM, 5), (0, 7)])
    call = job.next_call(None)
    assert call is not None and call[0] == x86_64.SYS_IOCTL and call[1][0] == 5
    job.took(call, -err, 1234, -1)  # what the ioctl returned
    assert job.finished and not job.to_close  # nothing was made in the VMM: nothing to close
    job.settle()
    with pytest.raises(OSError, match="no KVM binary stats .*Linux 5.14"):
        job.future.result()


@pytest.mark.kvm
@pytest.mark.parametrize("seccomp", ["notify", "trace"])
def test_counters_through_a_one_stop_launch_leave_the_counts_exact(tmp_path, seccomp):
    """Under kvmtop's seccomp filter the vCPU threads stop only at KVM_RUN (seccomp stops): the
    fds are made there, and every exit is still counted exactly."""
    from kvmtop.model.messages import Detached, ExitBatch

    n, own = 30_000, tmp_path / "own.json"
    tracer = Tracer()
    tracer.start()
    io = 0
    try:
        attached = tracer.launch(counted_command(vcpus=2, outs=n, mmio_writes=0,
                                                 report_json=str(own)), seccomp).result(10)  # fmt: skip
        assert attached.one_stop
        wait_for_vcpus(attached.pid, 2)
        before = settled_fd_table(attached.pid)
        stats = settle_stats(attached.pid, tracer.stats_fds())
        try:
            # as before, but for the vCPU fds it was still making (minivmm mmaps them: a dup)
            after = fd_table(attached.pid)
            assert before.items() <= after.items()
            assert not [link for link in after.values() if "stats" in link]
            assert set(stats.made_by) == {VM, 0, 1}
            while not isinstance(message := tracer.out.get(timeout=60), Detached):
                if isinstance(message, ExitBatch):
                    io += sum(e.reason == 2 and e.errno == 0 for e in message.events)
            assert message.exit_status == 0
            assert all(v["exits"] > 0 for v in stats.sample().vcpus.values())
        finally:
            stats.close()
    finally:
        tracer.stop()
    assert json.loads(own.read_text())["exits"] == {"KVM_EXIT_IO": 2 * (n + 1)} and io == 2 * (
        n + 1
    )


@pytest.mark.kvm
def test_a_vmm_under_its_own_seccomp_filter_is_left_alone(tmp_path, processes):
    """Firecracker-like: a filter of the VMM's own might refuse the injected ioctl or kill the
    VMM for it, so kvmtop says so and does nothing; the VMM runs on, untraced, exactly."""
    own = tmp_path / "own.json"
    n = 3_000
    argv = counted_command(outs=n, mmio_writes=0, spin=4_000_000, report_json=str(own))
    vmm = subprocess.Popen([sys.executable, "-c", SECCOMP_ALLOW_ALL, *argv])
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    before = settled_fd_table(vmm.pid)
    result = subprocess.run([*KVMTOP, "stats", "-p", str(vmm.pid)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert "seccomp filter" in result.stderr
    assert fd_table(vmm.pid) == before and tracer_pid(vmm.pid) == 0
    assert vmm.wait(60) == 0
    assert json.loads(own.read_text())["exits"] == {"KVM_EXIT_IO": n + 1}


def test_the_counters_that_say_why_vcpus_exit_come_first():
    from kvmtop.counters.kernel_table import in_reading_order

    descs = parse_layout(stats_blob([
        ("halt_poll_invalid", CUMULATIVE, 0, 1, 0), ("pf_taken", CUMULATIVE, 0, 1, 0),
        ("io_exits", CUMULATIVE, 0, 1, 0), ("new_counter", CUMULATIVE, 0, 1, 0),
        ("exits", CUMULATIVE, 0, 1, 0),
    ], [0] * 5)).descs  # fmt: skip
    names = [d.name for d in in_reading_order(descs)]
    assert names == ["exits", "io_exits", "pf_taken", "halt_poll_invalid", "new_counter"]


def _stop(pid: int, traced: bool = False) -> None:
    """SIGSTOP ``pid`` and wait until /proc says every thread of it is stopped."""
    from kvmtop.host.procfs import is_stopped

    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    held = 0  # traced, a thread's brief ptrace stops look the same: the state must hold 0.2 s
    while held < (20 if traced else 1):
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        held = held + 1 if is_stopped(pid, traced) else 0
        time.sleep(0.01)


@pytest.mark.kvm
def test_stats_of_a_stopped_vmm_says_so_without_attaching(tmp_path, processes, monkeypatch):
    """A SIGSTOPped VMM runs no thread that could make the fds: kvmtop says so at once, in one
    line, without tracing it; resumed, it runs on exactly and its counters can be had."""
    from kvmtop.counters.vm_stats import StatsUnavailable

    n, own = 2_000, tmp_path / "own.json"
    vmm = subprocess.Popen(counted_command(outs=n, mmio_writes=0, spin=3_000_000,
                                           report_json=str(own)))  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    attached: list[int] = []
    monkeypatch.setattr(Tracer, "attach", lambda self, *pids: attached.extend(pids))
    _stop(vmm.pid)
    try:
        result = subprocess.run([*KVMTOP, "stats", "-p", str(vmm.pid), "--count", "1"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        with pytest.raises(StatsUnavailable, match="stopped") as raised:
            take_stats(vmm.pid)
        assert tracer_pid(vmm.pid) == 0
    finally:
        os.kill(vmm.pid, signal.SIGCONT)
    assert attached == []  # not even tried
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr == f"kvmtop: {raised.value}\n"
    assert "vCPUs are not running" in result.stderr
    assert f"kill -CONT {vmm.pid}" in result.stderr
    assert vmm.wait(120) == 0
    assert json.loads(own.read_text())["exits"] == {"KVM_EXIT_IO": n + 1}


@pytest.mark.kvm
def test_a_vmm_stopped_while_traced_is_named_when_no_fd_comes(processes):
    """Stopped after the attach (group-stopped under kvmtop, as without it), no thread reaches
    a syscall stop: the wait ends with the reason, not with an empty one. Continued, the VMM
    answers the request after all: nobody waits for it then, and its fds are closed."""
    from kvmtop.counters.vm_stats import StatsUnavailable

    vmm = subprocess.Popen(counted_command(outs=2_000, mmio_writes=0, spin=3_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    own_before = kvm_fds_of(os.getpid())
    tracer = Tracer()
    tracer.start()
    try:
        tracer.attach(vmm.pid).result(10)
        _stop(vmm.pid, traced=True)
        asked = tracer.stats_fds()
        try:
            with pytest.raises(StatsUnavailable) as raised:
                settle_stats(vmm.pid, asked, timeout=1.0)
        finally:
            os.kill(vmm.pid, signal.SIGCONT)
        late = asked.result(10)  # made once the vCPU runs again
        tracer.detach().result(10)
    finally:
        tracer.stop()
    message = str(raised.value)
    assert message.startswith(f"no KVM counters for pid {vmm.pid}: it is stopped"), message
    assert late.vm is not None and set(late.vcpus) == {0}
    assert kvm_fds_of(os.getpid()) == own_before  # the late answer's fds were closed
    assert vmm.wait(120) == 0


@pytest.mark.kvm
def test_counters_held_while_the_vmm_is_stopped_are_shown_and_say_so(processes):
    vmm = subprocess.Popen(counted_command(outs=2_000, mmio_writes=0, spin=3_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    stats = take_stats(vmm.pid)
    try:
        from kvmtop.commands.stats import sample_json, stats_table

        _stop(vmm.pid)
        try:
            first = stats.sample()
            now = stats.sample()
            table, stopped = (
                stats_table(stats, first, first, now),
                sample_json(stats, first, first, now),
            )
        finally:
            os.kill(vmm.pid, signal.SIGCONT)
        running = sample_json(stats, first, first, stats.sample())
    finally:
        stats.close()
    assert "(stopped: its vCPUs are not running)" in table.splitlines()[0]
    assert stopped["stopped"] is True and running["stopped"] is False
    assert now.vcpus[0]["exits"] == first.vcpus[0]["exits"] > 0  # nothing runs while stopped
    assert vmm.wait(120) == 0


@pytest.mark.qemu
def test_a_qemu_whose_vcpus_never_run_is_said_so_and_left_as_it_was(tmp_path, processes):
    """`-S`: QEMU runs, its vCPU threads wait for `cont` and never enter KVM_RUN, where alone a
    vCPU's stats fd can be made: the wait ends with that reason (not an empty one), and QEMU's
    fds are as before (the VM's stats fd made on the way was closed in it)."""
    from kvmtop.counters.vm_stats import StatsUnavailable

    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=10, mmio_writes=0))
    vmm = subprocess.Popen(qemu_command(str(bios), "-S"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    before = settled_fd_table(vmm.pid)
    with pytest.raises(StatsUnavailable) as raised:
        take_stats(vmm.pid, timeout=2.0)
    assert str(raised.value) == (
        f"no KVM counters for pid {vmm.pid}: its vCPU threads did not enter KVM_RUN within 2 s "
        "(are its vCPUs paused?); a vCPU's counters can only be made by the thread that runs it"
    )
    assert settled_fd_table(vmm.pid) == before and tracer_pid(vmm.pid) == 0
    assert vmm.poll() is None


@pytest.mark.parametrize("traced_io", [None, 80_000.0])
def test_the_io_note_says_where_kvm_counted_the_port_io_and_guesses_no_cause(traced_io):
    """A 64-bit guest's port IO can be emulated too: the note states the counters, no cause."""
    from types import SimpleNamespace

    from kvmtop.abi.binary_stats import CUMULATIVE, StatDesc
    from kvmtop.counters.kernel_table import io_note
    from kvmtop.counters.vm_stats import StatsSample

    descs = tuple(StatDesc(name, CUMULATIVE, "", 10, 0, 1, 8 * i, 0)
                  for i, name in enumerate(("io_exits", "insn_emulation")))  # fmt: skip
    stats = SimpleNamespace(descs=lambda: descs)
    last = StatsSample(0, {}, {0: {"io_exits": 0, "insn_emulation": 1000}})
    now = StatsSample(1_000_000_000, {}, {0: {"io_exits": 0, "insn_emulation": 81_000}})
    note = io_note(stats, last, now, traced_io)  # type: ignore[arg-type]
    assert "io_exits did not grow" in note and "insn_emulation" in note and "80.0k/s" in note
    assert "real-mode" not in note and "unrestricted" not in note
