"""--rip: every exit's guest RIP, exact, in every mode and on both engines; and the one field
kvmtop writes for it, kvm_valid_regs, set only where safe and always restored."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from guests.qemu_bios import BIOS_SIZE, build_bios, qemu_command
from helpers import (
    KVMTOP,
    SECCOMP_ALLOW_ALL,
    start_qemu,
    stop_once_set,
    valid_regs,
    vcpu_valid_regs,
    wait_for_vcpus,
)

from kvmtop.abi.arch import x86_64
from kvmtop.minivmm.guestcode import counted_rips
from kvmtop.minivmm.vmm import CODE_SEGMENT, counted_command, demo_command
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import Detached, ExitBatch, TracerFailed, TracerNote
from kvmtop.model.vcpu_keys import VcpuSlots
from kvmtop.trace.engine import MODE_TWO_STOP
from kvmtop.trace.py_engine import RIP_OFF, PyEngine
from kvmtop.trace.sync_regs import bits_to_set
from kvmtop.trace.traced_process import TracedProcess
from kvmtop.tracer_thread import Tracer
from kvmtop.xlat_exit import ExitReason

pytestmark = [pytest.mark.kvm]

GUEST = {"outs": 40, "ins": 3, "mmio_writes": 10, "mmio_reads": 4}
_U64 = struct.Struct("<Q")


def trace_all(tracer: Tracer) -> tuple[list[ExitEvent], list[str]]:
    """Every exit and note until the session ends."""
    events: list[ExitEvent] = []
    notes: list[str] = []
    while True:
        message = tracer.out.get(timeout=60)
        if isinstance(message, ExitBatch):
            events += message.events
        elif isinstance(message, TracerNote):
            notes.append(message.message)
        elif isinstance(message, TracerFailed):
            raise AssertionError(message.message)
        elif isinstance(message, Detached):
            return events, notes


def expected_rip(event: ExitEvent, sites: dict[str, int]) -> int:
    write = bool(event.flags & 1)
    if event.reason == ExitReason.IO:
        if event.a == 0xF4:
            return sites["exit"]
        return sites["out"] if write else sites["in"]
    assert event.reason == ExitReason.MMIO
    return sites["mmio_write"] if write else sites["mmio_read"]


def check_every_rip(events: list[ExitEvent], cs_base: int = CODE_SEGMENT * 16, spin: int = 0,
                    made: dict[str, int] = GUEST) -> None:  # fmt: skip
    """Every IO and MMIO exit of the counted guest (``made``, at ``cs_base``) is there, each
    with its exact RIP."""
    sites = counted_rips(made["outs"], made["mmio_writes"], spin, made["ins"],
                         made["mmio_reads"])  # fmt: skip
    guest = [e for e in events if e.errno == 0 and e.reason in (ExitReason.IO, ExitReason.MMIO)]
    assert len(guest) == made["outs"] + made["ins"] + 1 + made["mmio_writes"] + made["mmio_reads"]
    for e in guest:
        assert e.rip is not None, e
        rip = expected_rip(e, sites)
        assert (e.rip.rip, e.rip.linear, e.rip.cpl) == (rip, cs_base + rip, 0), e


@pytest.mark.usefixtures("engine")
@pytest.mark.parametrize("seccomp", ["notify", "trace", ""])
def test_every_launched_exit_carries_its_exact_rip(seccomp):
    tracer = Tracer(rip=True)
    tracer.start()
    try:
        tracer.launch(counted_command(**GUEST), seccomp).result(10)
        events, notes = trace_all(tracer)
    finally:
        tracer.stop()
    assert notes == []
    check_every_rip(events)


QEMU_BIOS_CS = 0xF0000  # the counted guest as a BIOS at F000:0000 (tests/guests/qemu_bios.py)
QEMU_GUEST = GUEST | {"mmio_reads": 0}


@pytest.mark.qemu
@pytest.mark.usefixtures("engine")
@pytest.mark.parametrize("seccomp", ["notify", "trace", ""])
def test_every_exit_of_a_launched_qemu_carries_its_exact_rip(seccomp, tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(GUEST["outs"], GUEST["mmio_writes"], ins=GUEST["ins"]))
    tracer = Tracer(rip=True)
    tracer.start()
    try:
        tracer.launch(qemu_command(str(bios)), seccomp).result(10)
        events, notes = trace_all(tracer)
    finally:
        tracer.stop()
    assert notes == []
    check_every_rip(events, QEMU_BIOS_CS, made=QEMU_GUEST)


@pytest.mark.qemu
@pytest.mark.usefixtures("engine")
def test_every_exit_after_an_attach_to_qemu_carries_its_exact_rip(processes, tmp_path):
    """The guest spins (no exit) while kvmtop attaches: the run under way then is kicked, not an
    exit; every exit after it, from a run begun with kvm_valid_regs set, has its RIP."""
    spin = 3_000_000
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(GUEST["outs"], GUEST["mmio_writes"], spin, ins=GUEST["ins"]))
    assert bios.stat().st_size == BIOS_SIZE
    vmm = start_qemu(processes, str(bios))
    page = vcpu_valid_regs(vmm.pid)
    tracer = Tracer(rip=True)
    tracer.start()
    try:
        tracer.attach(vmm.pid).result(10)
        events, notes = trace_all(tracer)
    finally:
        tracer.stop()
    assert notes == [] and vmm.wait(10) is not None
    check_every_rip(events, QEMU_BIOS_CS, spin, QEMU_GUEST)
    assert valid_regs(page) == 0


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def demo(processes):
    guest = subprocess.Popen(demo_command(vcpus=1), stdout=subprocess.DEVNULL)
    processes.append(guest)
    wait_for_vcpus(guest.pid)
    return guest


@pytest.mark.usefixtures("engine")
def test_attached_exits_carry_rips_and_kvm_valid_regs_is_0_again_after_detach(demo):
    page = vcpu_valid_regs(demo.pid)
    assert valid_regs(page) == 0
    tracer = Tracer(rip=True)
    tracer.start()
    try:
        tracer.attach(demo.pid).result(10)
        wait_for(lambda: valid_regs(page) == x86_64.KVM_SYNC_X86_REGS | x86_64.KVM_SYNC_X86_SREGS)
        time.sleep(0.5)
        tracer.detach().result(10)
        events, notes = trace_all(tracer)
    finally:
        tracer.stop()
    assert valid_regs(page) == 0
    assert notes == []
    with_rip = [e for e in events if e.rip is not None]
    assert len(with_rip) > 20
    # the demo guest's code sits at segment 0x1000, below its first 256 bytes
    assert all(
        e.rip.linear == CODE_SEGMENT * 16 + e.rip.rip and e.rip.rip < 0x100 for e in with_rip
    )
    # only the runs under way when the field was set (one per vCPU) can lack a RIP
    assert len([e for e in events if e.rip is None and e.errno == 0]) <= 1
    assert demo.poll() is None  # it runs on


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_kvm_valid_regs_is_0_again_after_a_stop_signal_ends_a_recording(demo, stop, tmp_path):
    page = vcpu_valid_regs(demo.pid)
    record = subprocess.Popen([*KVMTOP, "record", "--rip", "-p", str(demo.pid), "-o",
                               str(tmp_path / "r.kvmtop")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    err = stop_once_set(record, page, stop)
    assert record.returncode == 0, err
    assert valid_regs(page) == 0
    assert demo.poll() is None


def test_a_vmm_that_uses_kvm_valid_regs_itself_is_never_written(demo):
    page = vcpu_valid_regs(demo.pid)
    _U64.pack_into(page, x86_64.RUN_VALID_REGS, x86_64.KVM_SYNC_X86_REGS)  # as the VMM would
    seen = set()
    tracer = Tracer(rip=True)
    tracer.start()
    try:
        tracer.attach(demo.pid).result(10)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.add(valid_regs(page))
        tracer.detach().result(10)
        events, notes = trace_all(tracer)
    finally:
        tracer.stop()
    assert seen == {x86_64.KVM_SYNC_X86_REGS}
    assert valid_regs(page) == x86_64.KVM_SYNC_X86_REGS
    assert all(e.rip is None for e in events)
    assert len(notes) == 1 and "uses kvm_valid_regs itself (0x1): left alone" in notes[0]


def test_a_vm_for_which_kvm_allows_no_synced_registers_is_never_written(demo):
    """KVM answers 0 to KVM_CAP_SYNC_REGS for a protected guest (none can run here): that answer
    alone decides, whatever the page holds."""
    assert bits_to_set(0) == 0
    assert bits_to_set(-22) == 0  # the ioctl failed
    assert bits_to_set(x86_64.KVM_SYNC_X86_SREGS) == 0  # no RIP without the registers
    assert bits_to_set(0x7) == x86_64.KVM_SYNC_X86_REGS | x86_64.KVM_SYNC_X86_SREGS
    assert bits_to_set(x86_64.KVM_SYNC_X86_REGS) == x86_64.KVM_SYNC_X86_REGS
    page = vcpu_valid_regs(demo.pid)

    engine = PyEngine(0, False, 0, 0)  # tells which pages' exits carry RIPs
    proc = TracedProcess(demo.pid, os.pidfd_open(demo.pid), (), MODE_TWO_STOP, VcpuSlots())
    try:
        proc.open_known_vcpus(engine)
        (vm,) = proc.vms_to_check()
        proc.sync_allowed[vm] = 0
        notes = proc.enable_rips(engine)
        assert len(notes) == 1 and "KVM_CAP_SYNC_REGS) = 0x0" in notes[0], notes
        assert proc.vms_to_check() == [] and proc.enable_rips(engine) == []  # decided, once
        assert {page.rip for page in engine._pages.values()} == {RIP_OFF}
        assert valid_regs(page) == 0
    finally:
        proc.close(engine)
    assert valid_regs(page) == 0


def test_a_vmm_under_its_own_seccomp_filter_is_never_asked_nor_written(processes):
    """kvmtop would have to make it run KVM_CHECK_EXTENSION, which its filter could refuse or
    kill it for: it is not asked, its field never set, and kvmtop says so once."""
    n = 2_000
    vmm = subprocess.Popen([sys.executable, "-c", SECCOMP_ALLOW_ALL,
                            *counted_command(outs=n, mmio_writes=0, spin=2_000_000)])  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    page = vcpu_valid_regs(vmm.pid)
    seen = set()
    tracer = Tracer(rip=True)
    tracer.start()
    try:
        tracer.attach(vmm.pid).result(10)
        deadline = time.monotonic() + 1.0  # (no poll: the exit status is the tracer's to see)
        while time.monotonic() < deadline:
            seen.add(valid_regs(page))
            time.sleep(0.001)
        events, notes = trace_all(tracer)
    finally:
        tracer.stop()
    assert seen == {0} and vmm.wait(10) == 0 and valid_regs(page) == 0
    assert len(notes) == 1 and "seccomp filter of its own" in notes[0], notes
    assert sum(e.reason == ExitReason.IO and e.errno == 0 for e in events) == n + 1
    assert all(e.rip is None for e in events)


# --- KVM's tracepoints: the kernel traces each instruction it emulates (kvm_emulate_insn), and
# this host emulates the instruction of every exit to the VMM: RIPs with nothing written


def traced_with_tracepoints(start) -> tuple[list[ExitEvent], list[str]]:
    """``start(tracer)`` on the tracepoint engine's tracer with --rip, then every exit."""
    from kvmtop.tracer_thread import open_tracer

    tracer, _note, _why = open_tracer(rip=True)
    tracer.start()
    try:
        start(tracer)
        return trace_all(tracer)
    finally:
        tracer.stop()


@pytest.mark.usefixtures("tracepoints")
def test_every_exit_seen_through_kernel_tracepoints_carries_its_exact_rip():
    events, notes = traced_with_tracepoints(
        lambda tracer: tracer.launch(counted_command(**GUEST)).result(10)
    )
    assert notes == []
    check_every_rip(events)


@pytest.mark.qemu
@pytest.mark.usefixtures("tracepoints")
def test_every_exit_of_qemu_seen_through_kernel_tracepoints_carries_its_exact_rip(tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(GUEST["outs"], GUEST["mmio_writes"], ins=GUEST["ins"]))
    events, notes = traced_with_tracepoints(
        lambda tracer: tracer.launch(qemu_command(str(bios))).result(10)
    )
    assert notes == []
    check_every_rip(events, QEMU_BIOS_CS, made=QEMU_GUEST)


@pytest.mark.usefixtures("tracepoints")
def test_rips_asked_for_while_attached_with_tracepoints_write_nothing_into_the_vmm(demo):
    """As `g` does: RIPs from the moment they are asked for, exact, and kvm_valid_regs never
    set (the kernel's trace of the emulated instruction gives them)."""
    from kvmtop.tracer_thread import open_tracer

    page = vcpu_valid_regs(demo.pid)
    tracer, _note, _why = open_tracer()
    tracer.start()
    try:
        tracer.attach(demo.pid).result(10)
        time.sleep(0.2)
        tracer.want_rip().result(10)
        for _ in range(50):
            assert valid_regs(page) == 0
            time.sleep(0.01)
        tracer.detach().result(10)
        events, notes = trace_all(tracer)
    finally:
        tracer.stop()
    assert notes == [] and valid_regs(page) == 0
    first = next(i for i, e in enumerate(events) if e.rip is not None)
    later = [e for e in events[first:] if e.errno == 0]
    assert first > 0 and len(later) > 20  # none before the ask; every one after it
    assert all(e.rip is not None for e in later)
    assert all(
        e.rip.linear == CODE_SEGMENT * 16 + e.rip.rip and e.rip.rip < 0x100 and e.rip.cpl == 0
        for e in later
    )
    assert demo.poll() is None
