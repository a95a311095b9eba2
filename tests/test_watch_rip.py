"""`kvmtop watch --rip`: the guest code the VMM's sampled time goes to, exact where the guest's
exits come from one known instruction; kvm_valid_regs set only where safe, through the watch's
own mapping, and back to 0 however the watch ends."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
from helpers import (
    KVMTOP,
    SECCOMP_ALLOW_ALL,
    held_timed_vmm,
    let_go,
    own_clock,
    start_minivmm,
    stop_once_set,
    valid_regs,
    vcpu_valid_regs,
    wait_for_vcpus,
    write_elf_symbols,
)

from kvmtop.abi.arch import x86_64
from kvmtop.abi.kvm import RUN_EXIT_REASON
from kvmtop.minivmm.guestcode import counted_rips
from kvmtop.minivmm.vmm import CODE_SEGMENT, counted_command
from kvmtop.sampling.entry_cost import EntryCost
from kvmtop.sampling.sampler import make_sampler
from kvmtop.sampling.shares import vmm_own_bound
from kvmtop.sampling.watcher import Watcher
from kvmtop.xlat_exit import ExitReason

# alone: as tests/test_watch.py
pytestmark = [pytest.mark.alone, pytest.mark.usefixtures("pure_sampler")]

BOTH = x86_64.KVM_SYNC_X86_REGS | x86_64.KVM_SYNC_X86_SREGS
_U64 = struct.Struct("<Q")


def put(page: bytearray, reason: int, rip: int) -> None:
    """What KVM leaves in kvm_run at an exit: its reason and the guest's synced RIP."""
    _U64.pack_into(page, x86_64.SYNC_RIP, rip)
    struct.pack_into("<I", page, RUN_EXIT_REASON, reason)


def test_the_sampler_counts_a_vcpu_s_rips_only_from_a_look_that_shows_a_run_since():
    """s.regs of the exit under way when kvm_valid_regs was set predates it: those looks are
    not counted, however many; from a look inside KVM_RUN (vCPU 0) or one whose exit or
    registers changed (vCPU 1) on, every look in the VMM is, at the RIP the page says (cs.base
    added outside 64-bit code, CPL 0 in real mode). vCPU 2 was not asked for RIPs."""
    pages = [bytearray(8192) for _ in range(3)]
    for page in pages:
        _U64.pack_into(page, x86_64.RUN_VALID_REGS, BOTH)
        _U64.pack_into(page, x86_64.SYNC_CS, 0x10000)  # cs.base; cs.l 0, cr0.PE 0
        put(page, ExitReason.IO, 0x1234)  # stale: from before the field was set
    sampler = make_sampler(4000.0, 1)
    for page in pages:
        sampler.add(page)
    sampler.rip(0)
    sampler.rip(1)
    sampler.start()
    try:
        time.sleep(0.1)
        _ns, _looks, before, _cpu = sampler.take()
        put(pages[0], 0, 0x1234)  # the VMM runs the vCPU again
        time.sleep(0.25)  # windows long enough for the counts below at a quarter of the rate
        put(pages[0], ExitReason.MMIO, 0x2000)
        put(pages[1], ExitReason.IO, 0x1300)  # the next exit, seen only in the VMM
        time.sleep(0.25)
    finally:
        sampler.stop()
    _ns, looks, after, _cpu = sampler.take()
    assert before[0][4] == before[1][4] == (0, 0, [], False)  # waiting
    assert before[2][4] is None and after[2][4] is None  # never asked
    for vcpu, (reason, rip), in_run in ((0, (ExitReason.MMIO, 0x2000), True),
                                        (1, (ExitReason.IO, 0x1300), False)):  # fmt: skip
        code_looks, unstable, rips, live = after[vcpu][4]
        (counted,) = rips
        assert live and counted[:4] == (reason, rip, 0x10000 + rip, 0), after[vcpu]
        assert counted[4] > 100 and unstable <= 2, after[vcpu]
        assert (code_looks - counted[4] > 50) == in_run  # its looks inside KVM_RUN count too


def mix_symbols(tmp_path) -> str:
    """timed_vmm's mix guest at 0x1000: `out 0x80` (2 bytes), a byte store (3), a jmp back."""
    elf = str(tmp_path / "guest.elf")
    write_elf_symbols(elf, [("out_post", 0x1000, 2), ("store_ds", 0x1002, 3),
                            ("jump_back", 0x1005, 2)])  # fmt: skip
    return elf


@pytest.mark.kvm
def test_the_top_guest_code_of_each_reason_is_the_rip_past_its_exiting_instruction(
    timed_vmm, processes
):
    """A C VMM alternates `out` and an MMIO write, spinning 100 µs after each `out` and 50 µs
    after each write: each reason's top guest code is the RIP past its instruction."""
    vmm = subprocess.Popen([timed_vmm, "20000", "100", "mix"], stdout=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    page = vcpu_valid_regs(vmm.pid)
    with Watcher(vmm.pid, rate_hz=4000, counters=False, rip=True) as watcher:
        assert valid_regs(page) == BOTH and watcher.code_notes == []
        time.sleep(1.0)
        snap = watcher.snapshot()
    assert valid_regs(page) == 0
    code = snap.vcpus[0].code
    assert code is not None and code.live and code.looks > 1000, code
    top = {c.reason: c for c in reversed(code.top)}  # each reason's largest
    assert {r: (c.rip, c.linear, c.cpl) for r, c in top.items()} == {
        "KVM_EXIT_IO": (0x1002, 0x1002, 0), "KVM_EXIT_MMIO": (0x1005, 0x1005, 0)}  # fmt: skip
    # a look whose two reads differ is dropped; they are few (the pure sampler's reads lie
    # further apart than the C one's: 2.3% here under load)
    assert code.unstable < 0.1 * code.looks
    # another RIP of a reason: only looks between KVM's setting of exit_reason and its copy of
    # the registers see the previous exit's. That window is a part of KVM's own cost of an exit
    # (under a µs quiet, up to a few where the host's costs are 2-4x higher) in ~90 µs between
    # exits: 1% of the looks seen quiet, room for 4x that
    assert sum(c.share.hits for c in code.top if c not in top.values()) < 0.05 * code.looks


@pytest.mark.kvm
def test_the_share_of_the_guest_code_holds_the_vmm_s_own_clock_in_its_bound(timed_vmm, processes):
    """The C VMM sleeps 1 ms after each `out` (each run then begins after a wake-up) and times
    its KVM_RUN calls: the time it spent out of KVM_RUN, all of it on exits at the RIP past
    the `out`, lies in the bound of that RIP's share (net of KVM's part of each exit, as the
    reasons' bounds are), and the bound says something (narrower than the share)."""
    vmm = held_timed_vmm(timed_vmm, "2000", "1000", "io-sleep")
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    with Watcher(vmm.pid, rate_hz=4000, counters=False, rip=True) as watcher:
        own = own_clock(vmm)
        snap = watcher.snapshot()
    let_go(vmm)
    code = snap.vcpus[0].code
    assert code is not None and code.looks > 1000, code
    (out,) = code.top
    assert (out.reason, out.rip) == ("KVM_EXIT_IO", 0x1002)
    assert isinstance(snap.entry, EntryCost), snap.entry
    total = own["in_run_ns"] + own["out_ns"]
    n, ns = own["io"]
    # the sampler's stretch of the RIP's time is at most that of its reason's
    bound = vmm_own_bound(out.share, total, n, snap.entry, snap.vcpus[0].stretch(out.reason))
    assert bound is not None
    assert bound.low <= ns <= bound.high, (bound, ns, out.share.text(), snap.entry)
    assert bound.high - bound.low < ns


def watch_rip(pid: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*KVMTOP, "watch", "--rip", "-p", str(pid), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.kvm
def test_watch_rip_json_names_minivmm_s_out_from_a_kallsyms_file_and_restores_the_field(
    processes, tmp_path
):
    """minivmm's counted guest sleeps 200 µs in its VMM per `out`: every kept look in the VMM
    is at the RIP past that `out`, named from a kallsyms file the test writes; at --count's
    end kvm_valid_regs is 0 again, and the VMM runs on."""
    vmm = start_minivmm(processes, outs=10_000_000, mmio_writes=0, out_sleep_us=200)
    rip = counted_rips(10_000_000, 0)["out"]
    base = CODE_SEGMENT * 16
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(f"{base:016x} T counted_top\n{base + rip:016x} t after_out\n"
                        f"{base + rip + 3:016x} t later\n")  # fmt: skip
    page = vcpu_valid_regs(vmm.pid)
    watch = watch_rip(vmm.pid, "--guest-symbols", str(kallsyms), "--json", "--count", "2",
                      "--interval", "0.5")  # fmt: skip
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    last = json.loads(out.splitlines()[-1])["guest_code"]
    assert last["note"] == ""
    vcpu = last["vcpus"]["0"]
    (io,) = vcpu["by_reason"]["KVM_EXIT_IO"]
    assert (io["rip"], io["linear"], io["cpl"], io["symbol"]) == (rip, base + rip, 0, "after_out")
    assert io["looks"] > 100 and io["low"] <= io["share"] <= io["high"] and io["share"] > 0.5
    assert set(vcpu["by_reason"]) == {"KVM_EXIT_IO"}
    assert valid_regs(page) == 0 and vmm.poll() is None


@pytest.mark.kvm
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_kvm_valid_regs_is_0_again_after_a_stop_signal_ends_the_watch(processes, stop):
    vmm = start_minivmm(processes, outs=10_000_000, mmio_writes=0, out_sleep_us=100)
    page = vcpu_valid_regs(vmm.pid)
    watch = watch_rip(vmm.pid)
    err = stop_once_set(watch, page, stop)
    assert watch.returncode == 0, err
    assert valid_regs(page) == 0 and vmm.poll() is None


@pytest.mark.kvm
def test_a_vmm_that_uses_kvm_valid_regs_itself_is_never_written_by_the_watch(processes):
    vmm = start_minivmm(processes, outs=10_000_000, mmio_writes=0, out_sleep_us=100)
    page = vcpu_valid_regs(vmm.pid)
    _U64.pack_into(page, x86_64.RUN_VALID_REGS, x86_64.KVM_SYNC_X86_REGS)  # as the VMM would
    seen = set()
    with Watcher(vmm.pid, rate_hz=2000, rip=True) as watcher:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            seen.add(valid_regs(page))
        snap = watcher.snapshot()
    assert seen == {x86_64.KVM_SYNC_X86_REGS} and valid_regs(page) == x86_64.KVM_SYNC_X86_REGS
    assert "vCPU 0: no guest RIP: its VMM uses kvm_valid_regs itself (0x1): left alone" in (
        snap.code_note)  # fmt: skip
    assert snap.vcpus[0].code is None and snap.rip


@pytest.mark.kvm
def test_the_watch_without_rip_never_writes_the_field(processes):
    vmm = start_minivmm(processes, outs=10_000_000, mmio_writes=0, out_sleep_us=100)
    page = vcpu_valid_regs(vmm.pid)
    seen = set()
    with Watcher(vmm.pid, rate_hz=2000) as watcher:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            seen.add(valid_regs(page))
        snap = watcher.snapshot()
    assert seen == {0} and not snap.rip and snap.vcpus[0].code is None
    assert snap.vcpus[0].by_reason["KVM_EXIT_IO"].hits > 0  # it did watch


@pytest.mark.kvm
def test_a_vmm_under_its_own_seccomp_filter_is_never_asked_nor_written_by_the_watch(processes):
    vmm = subprocess.Popen([sys.executable, "-c", SECCOMP_ALLOW_ALL,
                            *counted_command(outs=10_000_000, mmio_writes=0, out_sleep_us=100)],
                           stdout=subprocess.DEVNULL)  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    page = vcpu_valid_regs(vmm.pid)
    with Watcher(vmm.pid, rate_hz=2000, counters=False, rip=True) as watcher:
        assert valid_regs(page) == 0
        snap = watcher.snapshot()
    assert valid_regs(page) == 0 and vmm.poll() is None
    assert "no guest RIP" in snap.code_note and "seccomp filter of its own" in snap.code_note
    assert snap.vcpus[0].code is None


def test_watch_help_names_rip_and_guest_symbols_need_it():
    shown = subprocess.run([*KVMTOP, "watch", "--help"], capture_output=True, text=True)
    assert "--rip" in shown.stdout and "--guest-symbols" in shown.stdout
    result = subprocess.run([*KVMTOP, "watch", "-p", str(os.getpid()), "--guest-symbols", "x"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "give --rip too" in result.stderr
