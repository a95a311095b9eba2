"""The engine against real guests: exact counts, launch and attach, detach, signals, exec.

Counts are compared with what the guest did (and, for QEMU, with strace --kvm=vcpu)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
from guests.qemu_bios import build_bios, qemu_command
from helpers import wait_for_vcpus

from kvmtop.decoder import exit_label
from kvmtop.host.procfs import tracer_pid
from kvmtop.minivmm.vmm import counted_command
from kvmtop.model.messages import Attached, Detached, ExitBatch, TracerFailed
from kvmtop.tracer_thread import Tracer, open_tracer

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("any_engine")]


@dataclass
class Trace:
    """What one tracing run saw, counted the way `kvmtop report` counts."""

    exits: collections.Counter[str] = field(default_factory=collections.Counter)
    io: collections.Counter[tuple[int, bool]] = field(default_factory=collections.Counter)
    mmio: collections.Counter[tuple[int, int, bool]] = field(default_factory=collections.Counter)
    per_vcpu: collections.Counter[int] = field(default_factory=collections.Counter)
    vcpus: dict[int, int] = field(default_factory=dict)
    lost: int = 0
    stops: int = 0
    end: Detached | None = None

    def take(self, message: object) -> None:
        if isinstance(message, ExitBatch):
            self.lost += message.lost
            self.stops += message.stops
            for seen in message.vcpus:
                self.vcpus[seen.vcpu] = seen.tid
            for e in message.events:
                self.exits[exit_label(e.reason, e.errno)] += 1
                self.per_vcpu[e.vcpu] += 1
                assert e.exit_ns >= e.entry_ns
                if e.errno == 0 and e.reason == 2:
                    self.io[(e.a, bool(e.flags & 1))] += 1
                elif e.errno == 0 and e.reason == 6:
                    self.mmio[(e.a, e.b, bool(e.flags & 1))] += 1
        elif isinstance(message, Detached):
            self.end = message
        elif isinstance(message, TracerFailed):
            raise AssertionError(message.message)


def drain(tracer: Tracer, trace: Trace, until_detached: bool = True, timeout: float = 60) -> Trace:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = tracer.out.get(timeout=0.2)
        except Exception:
            continue
        trace.take(message)
        if until_detached and trace.end is not None:
            return trace
    raise AssertionError(f"tracing did not end within {timeout} s: {trace}")


@pytest.fixture
def tracer(any_engine):
    t = open_tracer()[0]
    t.start()
    yield t
    t.stop()


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """A VMM to attach to. While traced, its exit is reported to the tracer (same process), so
    tests read the exit status from the tracer; after a detach, from Popen."""
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.qemu
def test_launched_qemu_counts_every_exit_exactly(tracer, tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=300, mmio_writes=200))
    tracer.launch(qemu_command(str(bios))).result(10)
    trace = drain(tracer, Trace())
    assert trace.end.why == "exited" and trace.end.exit_status == 1
    assert trace.exits["KVM_EXIT_IO"] == 301 and trace.exits["KVM_EXIT_MMIO"] == 200
    assert trace.io == {(0x80, True): 300, (0xF4, True): 1}
    assert trace.mmio == {(0xC0000, 1, True): 200}
    assert trace.lost == 0
    assert set(trace.vcpus) == {0} and trace.vcpus[0] > 0  # the thread running vCPU 0


@pytest.mark.qemu
def test_attach_to_running_qemu_counts_every_later_exit(tracer, tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=300, mmio_writes=200, spin_iterations=3_000_000))
    vmm = spawn(qemu_command(str(bios)))
    try:
        wait_for_vcpus(vmm.pid)  # QEMU is up; its guest spins without exits
        attached = tracer.attach(vmm.pid).result(5)
        assert isinstance(attached, Attached) and not attached.launched
        trace = drain(tracer, Trace())
        assert trace.end.why == "exited"
        assert trace.exits["KVM_EXIT_IO"] == 301 and trace.exits["KVM_EXIT_MMIO"] == 200
        assert trace.io == {(0x80, True): 300, (0xF4, True): 1}
        assert trace.mmio == {(0xC0000, 1, True): 200}
    finally:
        vmm.kill()
        vmm.wait()


@pytest.mark.qemu
def test_detach_mid_run_leaves_the_guest_to_finish_right(tracer, tmp_path):
    bios = tmp_path / "bios.bin"
    # it spins first (~1 s): attached before its exits begin, however late this test runs; and
    # its exits last seconds, so the detach comes before its end, however late the tracer hands
    # over its first 500 (the tracepoint engine: a batch every 0.1 s)
    bios.write_bytes(build_bios(outs=300_000, mmio_writes=0, spin_iterations=4_000_000))
    vmm = spawn(qemu_command(str(bios)))
    try:
        wait_for_vcpus(vmm.pid)
        tracer.attach(vmm.pid).result(5)
        trace = Trace()
        while trace.exits["KVM_EXIT_IO"] < 500:  # the guest is busy making exits
            trace.take(tracer.out.get(timeout=10))
        started = time.monotonic()
        detached = tracer.detach().result(2)
        # Bounded, not timed: without the kicker an idle guest would never let waitpid return.
        # The 100 ms target is measured by benchmarks/bench_tracer.py (0.45 ms median).
        assert detached.why == "detached" and time.monotonic() - started < 1.0
        assert vmm.wait(60) == 1  # isa-debug-exit: the guest ran to its end
        assert tracer_pid(vmm.pid) == 0
    finally:
        vmm.kill()
        vmm.wait()


def launch_and_count(tracer: Tracer, argv: list[str]) -> Trace:
    tracer.launch(argv).result(10)
    return drain(tracer, Trace())


def test_every_vcpu_of_a_launched_vmm_is_counted_like_the_vmm_counts_itself(tracer, tmp_path):
    own_path = tmp_path / "own.json"
    argv = counted_command(
        vcpus=4, outs=250, mmio_writes=70, exit_status=5, report_json=str(own_path)
    )
    trace = launch_and_count(tracer, argv)
    own = json.loads(own_path.read_text())
    assert trace.end.exit_status == 5
    assert dict(trace.exits) == own["exits"] == {"KVM_EXIT_IO": 4 * 251, "KVM_EXIT_MMIO": 4 * 70}
    assert trace.per_vcpu == {0: 321, 1: 321, 2: 321, 3: 321}
    assert len(set(trace.vcpus.values())) == 4  # four vCPU threads, each found
    assert trace.lost == 0


def test_signals_reach_the_vmm_exactly_once_while_traced(tracer, tmp_path):
    own_path = tmp_path / "own.json"
    argv = counted_command(outs=300, mmio_writes=0, spin=4_000_000, report_json=str(own_path))
    attached = tracer.launch(argv).result(10)
    wait_for_vcpus(attached.pid)
    for _ in range(25):  # real-time signals queue: none may be lost or doubled
        os.kill(attached.pid, signal.SIGRTMIN + 1)
        time.sleep(0.002)
    trace = drain(tracer, Trace())
    own = json.loads(own_path.read_text())
    assert own["signals"] == {"SIGRTMIN+1": 25}
    assert trace.exits["KVM_EXIT_IO"] == own["exits"]["KVM_EXIT_IO"] == 301


def test_stop_and_continue_behave_as_without_kvmtop(tracer, tmp_path):
    own_path = tmp_path / "own.json"
    argv = counted_command(outs=300, mmio_writes=0, spin=4_000_000, report_json=str(own_path))
    attached = tracer.launch(argv).result(10)
    wait_for_vcpus(attached.pid)
    os.kill(attached.pid, signal.SIGSTOP)
    time.sleep(0.3)
    states = _thread_states(attached.pid)
    assert states and all(s in "tT" for s in states)  # every thread stays stopped
    os.kill(attached.pid, signal.SIGCONT)
    trace = drain(tracer, Trace())
    assert trace.end.exit_status == 0
    assert trace.exits["KVM_EXIT_IO"] == 301


def test_a_vmm_started_through_exec_is_followed(tracer, tmp_path):
    own_path = tmp_path / "own.json"
    inner = counted_command(outs=77, mmio_writes=11, report_json=str(own_path))
    trace = launch_and_count(tracer, ["sh", "-c", 'sleep 0.1; exec "$@"', "sh", *inner])
    assert dict(trace.exits) == {"KVM_EXIT_IO": 78, "KVM_EXIT_MMIO": 11}
    assert dict(trace.exits) == json.loads(own_path.read_text())["exits"]


@pytest.mark.qemu
def test_detach_from_an_idle_guest_is_prompt(tracer, tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=0, mmio_writes=0, spin_iterations=100_000_000))
    vmm = spawn(qemu_command(str(bios)))
    try:
        wait_for_vcpus(vmm.pid)
        tracer.attach(vmm.pid).result(5)
        time.sleep(0.3)  # nothing happens: no exits, no syscalls to wake the tracer
        started = time.monotonic()
        detached = tracer.detach().result(2)
        # Bounded, not timed: without the kicker an idle guest would never let waitpid return.
        # The 100 ms target is measured by benchmarks/bench_tracer.py (0.45 ms median).
        assert detached.why == "detached" and time.monotonic() - started < 1.0
        assert tracer_pid(vmm.pid) == 0 and vmm.poll() is None  # untraced, still running
    finally:
        vmm.kill()
        vmm.wait()


def _thread_states(pid: int) -> list[str]:
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return states


def test_data_values_are_captured_only_when_asked(tmp_path):
    argv = counted_command(outs=3, mmio_writes=2, exit_status=7)
    for with_data in (False, True):
        tracer = Tracer(with_data=with_data)
        tracer.start()
        try:
            tracer.launch(argv).result(10)
            events = []
            while True:
                message = tracer.out.get(timeout=30)
                if isinstance(message, ExitBatch):
                    events += message.events
                elif isinstance(message, Detached):
                    break
        finally:
            tracer.stop()
        data = [(e.reason, e.a, e.data) for e in events if e.errno == 0]
        if with_data:  # `mov al, 7; out 0xf4, al` carries the status; the earlier outs carry al=0
            assert data == [(2, 0x80, b"\0")] * 3 + [(6, 0xC0000, b"\0")] * 2 + [(2, 0xF4, b"\x07")]
        else:
            assert all(d == b"" for _, _, d in data) and len(data) == 6


@pytest.mark.qemu
def test_without_pidfd_getfd_the_vmms_own_mapping_is_read(tracer, tmp_path, monkeypatch):
    """Where duplicating the vCPU fd is refused, kvm_run is read from the VMM's own mapping
    (found in /proc/PID/maps) with process_vm_readv: the counts stay exact."""
    from kvmtop.host import vcpu_maps

    def refused(_pidfd: int, _fd: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(vcpu_maps, "pidfd_getfd", refused)
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=300, mmio_writes=200))
    trace = launch_and_count(tracer, qemu_command(str(bios)))
    assert trace.exits["KVM_EXIT_IO"] == 301 and trace.exits["KVM_EXIT_MMIO"] == 200
    assert trace.mmio == {(0xC0000, 1, True): 200} and trace.lost == 0


def test_the_detach_kick_is_no_guest_exit(tmp_path, processes):
    """Detaching interrupts each thread; the KVM_RUN that ends is kvmtop's doing, not the guest's:
    a guest that makes no exit while traced records none."""
    vmm = subprocess.Popen(counted_command(vcpus=2, outs=1, mmio_writes=0, spin=8_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 2)
    time.sleep(0.2)  # both vCPUs spinning in the guest
    argv = [sys.executable, "-m", "kvmtop", "record", "-p", str(vmm.pid), "--duration", "0.5",
            "--json", "-o", str(tmp_path / "r.kvmtop")]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["exits"] == {} and summary["total"] == 0, summary["exits"]
    assert vmm.wait(120) == 0  # and the guest ran on to its end
