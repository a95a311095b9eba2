"""The pure side of `kvmtop watch`: looks to shares with their bounds, and the C sampler against
its Python reference on the same buffers."""

from __future__ import annotations

import importlib.util
import os
import struct
import threading
import time
from typing import Any

import pytest

from kvmtop.sampling.entry_cost import EntryCost
from kvmtop.sampling.sampler import PySampler
from kvmtop.sampling.shares import (
    MAX_KEYS,
    Share,
    Stretch,
    Tally,
    WatchedVcpu,
    estimate,
    vmm_own_bound,
)
from kvmtop.xlat_exit import ExitReason

KVM_EXIT_IO, KVM_EXIT_MMIO = ExitReason.IO, ExitReason.MMIO  # the names the samples' keys use here


def test_a_share_has_its_wilson_bounds():
    half = Share(50, 100)
    assert half.value == 0.5 and round(half.low, 4) == 0.4038 and round(half.high, 4) == 0.5962
    assert (Share(0, 0).low, Share(0, 0).high) == (0.0, 1.0)  # no look: nothing known
    none = Share(0, 1000)
    assert none.low == 0.0 and 0 < none.high < 0.004 and none.text() == "0.0% ±0.2"


def test_a_tally_keeps_a_bounded_table_and_the_estimate_adds_the_vcpus():
    tally = Tally(2)
    keys = [(KVM_EXIT_MMIO, a, 1) for a in range(MAX_KEYS + 10)]
    tally.add((1_000_000_000, 5000, [(5000, 1000, [(KVM_EXIT_IO, 0x80 | 1 << 16, 4000)], 0, None, []),
                                     (5000, 5000 - len(keys), keys, 0, None, [])], 0))  # fmt: skip
    assert len(tally.vcpus[1].keys) == MAX_KEYS + 1  # the rest as one OTHER
    vcpus = (WatchedVcpu("0", None, 0), WatchedVcpu("1", None, 1))
    snap = estimate(7, 1000.0, tally, vcpus, {0: {"exits": 10.0, "io_exits": 8.0}},
                    {"io_exits": 8.0})  # fmt: skip
    assert snap.reset_seen and snap.seconds == 1.0
    zero = snap.vcpus[0]
    assert zero.by_reason["KVM_EXIT_IO"] == Share(4000, 5000) and zero.in_run == Share(1000, 5000)
    assert zero.mean_vmm_ns["KVM_EXIT_IO"] == pytest.approx(0.8e9 / 8)  # 0.8 s over 8 exits
    assert snap.vm.samples == 10_000 and snap.top_ports[0].label == "0x0080 out POST"
    assert snap.top_ports[0].share == Share(4000, 10_000) and len(snap.top_addresses) == 8
    # the VM: 0.4 of 2 vCPU-seconds a second, the same 0.8 s over the same 8 exits
    assert snap.vm.mean_vmm_ns["KVM_EXIT_IO"] == pytest.approx(0.8e9 / 8)


def test_a_vmm_time_per_exit_is_net_of_kvm_s_own_part_of_each_exit_when_timed():
    tally = Tally(1)
    tally.add((1_000_000_000, 1000, [(1000, 600, [(KVM_EXIT_IO, 0x80, 400)], 0, None, [])], 0))
    vcpus = (WatchedVcpu("0", None, 0),)
    rates = {0: {"io_exits": 20_000.0}}
    raw = estimate(7, 1000.0, tally, vcpus, rates, rates[0])
    assert raw.vcpus[0].mean_vmm_ns["KVM_EXIT_IO"] == pytest.approx(20_000)  # 0.4 s / 20k exits
    entry = EntryCost(7_000.0, 500.0, 3000)
    net = estimate(7, 1000.0, tally, vcpus, rates, rates[0], entry=entry)
    assert net.entry is entry and net.vcpus[0].mean_vmm_ns["KVM_EXIT_IO"] == pytest.approx(12_500)
    assert net.vm.mean_vmm_ns["KVM_EXIT_IO"] == pytest.approx(12_500)
    assert net.vcpus[0].vmm == raw.vcpus[0].vmm  # the shares are what the looks saw
    assert raw.vcpus[0].kvm_part_at_most is None  # no entry cost, no bound
    rated = estimate(7, 1000.0, tally, vcpus, {0: {"exits": 10_000.0}}, {"exits": 10_000.0},
                     entry=entry)  # fmt: skip
    # every exit KVM counted, times 3 x 7.5 µs: 0.225 of each second at most is KVM's
    assert rated.vcpus[0].kvm_part_at_most == pytest.approx(0.225)
    assert rated.vm.kvm_part_at_most == pytest.approx(0.225)
    busy = estimate(7, 1000.0, tally, vcpus, {0: {"exits": 90_000.0}}, {}, entry=entry)
    assert busy.vcpus[0].kvm_part_at_most == pytest.approx(0.4)  # never more than the looks saw
    slow = estimate(7, 1000.0, tally, vcpus, rates, rates[0], entry=EntryCost(30e3, 0.0, 300))
    assert slow.vcpus[0].mean_vmm_ns["KVM_EXIT_IO"] == 0.0  # never below nothing


def looked_at(native: bool, pages: list[bytearray]) -> Any:
    """What a sampler (the C one, or its Python twin) took from ``pages`` in 0.1 s."""
    if native:
        from kvmtop.native import _sampler  # type: ignore[attr-defined]

        sampler = _sampler.Sampler(2000.0, 1)
    else:
        sampler = PySampler(2000.0, 1)
    for page in pages:
        sampler.add(page)
    sampler.start()
    time.sleep(0.1)
    sampler.stop()
    return sampler.take()


@pytest.mark.parametrize("native", [True, False])
def test_the_sampler_counts_what_the_page_says(native):
    if native and importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip(
            "kvmtop.native._sampler is not built (no C compiler or Python headers at install)"
        )
    pages = [bytearray(4096), bytearray(4096)]
    struct.pack_into("<I", pages[1], 8, KVM_EXIT_IO)  # vCPU 1 in the VMM, `out 0x3f8`
    struct.pack_into("<BBBBI", pages[1], 32, 1, 1, 0xF8, 0x03, 1)
    ns, looks, ((s0, r0, k0, x0, _c0, t0), (s1, r1, k1, x1, _c1, t1)), cpu_ns = looked_at(
        native, pages
    )
    assert looks > 0 and s0 == r0 == s1 == looks and not k0
    assert r1 == 0 and k1 == [(KVM_EXIT_IO, 0x3F8 | 1 << 16, looks)] and x0 == x1 == 0
    # the sampler's own CPU time: every cycle after a look that saw the IO exit, none after the
    # looks inside KVM_RUN (the last look's cycle is not over at the take)
    ((reason, after_io),) = t1
    assert not t0 and reason == KVM_EXIT_IO and 0 < after_io == cpu_ns < ns


@pytest.mark.parametrize("native", [True, False])
def test_the_sampler_keys_an_mmio_look_by_its_address_and_direction(native):
    if native and importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip(
            "kvmtop.native._sampler is not built (no C compiler or Python headers at install)"
        )
    from kvmtop.sampling.shares import MMIO_WRITE

    pages = [bytearray(4096), bytearray(4096)]
    for page, write in zip(pages, (0, 1), strict=True):  # phys_addr @0, len @16, is_write @20
        struct.pack_into("<I", page, 8, KVM_EXIT_MMIO)
        struct.pack_into("<Q8xIB", page, 32, 0xFEB02E60, 4, write)
    _ns, looks, ((_s0, _r0, k0, _x0, _c0, _t0), (_s1, _r1, k1, _x1, _c1, _t1)), _cpu = looked_at(
        native, pages
    )
    assert k0 == [(KVM_EXIT_MMIO, 0xFEB02E60, looks)]
    assert k1 == [(KVM_EXIT_MMIO, 0xFEB02E60 | MMIO_WRITE, looks)]


@pytest.mark.parametrize("native", [True, False])
def test_a_reason_seen_while_kvm_says_the_vcpu_is_blocked_counts_as_in_kvm_run(native, tmp_path):
    """A vCPU waiting in kvm_vcpu_block keeps the reason it last returned with (KVM_EXIT_INTR
    after a signal): its `blocking` counter, read where a look sees a reason, says it is in
    KVM_RUN. Here a file stands for the stats fd: blocking is 1 at offset 24."""
    if native and importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip(
            "kvmtop.native._sampler is not built (no C compiler or Python headers at install)"
        )
    stats = tmp_path / "stats"
    stats.write_bytes(bytes(24) + struct.pack("<Q", 1) + struct.pack("<Q", 0))
    page = bytearray(4096)
    struct.pack_into("<I", page, 8, 10)  # KVM_EXIT_INTR
    fd = os.open(stats, os.O_RDONLY)
    try:
        if native:
            from kvmtop.native import _sampler  # type: ignore[attr-defined]

            sampler = _sampler.Sampler(2000.0, 1)
        else:
            sampler = PySampler(2000.0, 1)
        sampler.add(page, fd, 24)  # blocked
        sampler.add(page, fd, 32)  # not blocked: the VMM is handling the exit
        sampler.add(page)  # no stats fd: the reason is taken as it is
        sampler.start()
        time.sleep(0.2)
        sampler.stop()
        _ns, looks, vcpus, _cpu_ns = sampler.take()
    finally:
        os.close(fd)
    (s0, r0, k0, x0, c0, _), (s1, r1, k1, x1, c1, _), (s2, r2, k2, x2, c2, _) = vcpus
    assert c0 is c1 is c2 is None  # no guest RIPs asked
    assert looks > 0 and s0 == r0 == x0 == looks and not k0
    assert r1 == x1 == 0 and k1 == [(10, 0, looks)]
    assert r2 == x2 == 0 and k2 == [(10, 0, looks)]
    tally = Tally(3)
    tally.add((1, looks, vcpus, 0))
    assert not tally.reset_seen  # a blocked vCPU says nothing of KVM's reset at entry


def test_the_vmm_s_own_time_is_bounded_by_kvm_s_part_from_nothing_to_its_most():
    entry = EntryCost(7_000.0, 500.0, 3000)  # at most 22.5 µs an exit
    share = Share(500, 1000)
    own = vmm_own_bound(share, 1e9, 10_000, entry)
    assert own is not None and own.high == pytest.approx(share.high * 1e9)
    assert own.low == pytest.approx(share.low * 1e9 - 10_000 * 22_500)
    assert vmm_own_bound(share, 1e9, None, entry) is None  # no count of the exits: not known
    assert vmm_own_bound(share, 1e9, 10_000, "not timed") is None
    assert vmm_own_bound(share, 1e9, 1e6, entry).low == 0.0  # never below nothing
    tally = Tally(1)
    tally.add((1_000_000_000, 1000, [(1000, 500, [(KVM_EXIT_MMIO, 0xD0000, 500)], 0, None, [])], 0))
    snap = estimate(7, 1000.0, tally, (WatchedVcpu("0", None, 0),),
                    {0: {"exits": 10_000.0, "mmio_exits": 10_000.0}},
                    {"exits": 10_000.0, "mmio_exits": 10_000.0}, entry=entry)  # fmt: skip
    v = snap.vcpus[0]
    assert v.vmm_own is not None and v.vmm_own.low == pytest.approx(own.low / 1e9)
    assert v.vmm_own.high == pytest.approx(share.high)
    per_exit = v.mean_vmm_bounds["KVM_EXIT_MMIO"]
    assert per_exit.low == pytest.approx(own.low / 10_000)
    assert per_exit.high == pytest.approx(share.high * 1e9 / 10_000)
    assert per_exit.low <= v.mean_vmm_ns["KVM_EXIT_MMIO"] <= per_exit.high


def test_the_bounds_allow_for_the_sampler_s_own_stretch_of_what_its_looks_saw():
    """The sampler ran 100 ms of the second, 40 ms of it after looks at the MMIO exit: that
    exit's time may be 4% more than its looks' share, and every state's 10% less."""
    entry = EntryCost(7_000.0, 500.0, 3000)
    share = Share(500, 1000)
    plain = vmm_own_bound(share, 1e9, 10_000, entry)
    own = vmm_own_bound(share, 1e9, 10_000, entry, Stretch(0.1, 0.04))
    assert plain is not None and own is not None
    assert own.high == pytest.approx((share.high + 0.04) * 1e9)
    assert own.low == pytest.approx(share.low * 0.9 * 1e9 - 10_000 * 22_500) and own.low < plain.low
    assert vmm_own_bound(Share(1000, 1000), 1e9, 0, entry, Stretch(0.1, 0.04)).high == 1e9
    tally = Tally(2)
    looked = [(1000, 500, [(KVM_EXIT_MMIO, 0xD0000, 500)], 0, None, [(KVM_EXIT_MMIO, 40_000_000)]),
              (1000, 1000, [], 0, None, [])]  # fmt: skip
    tally.add((1_000_000_000, 1000, looked, 100_000_000))
    rates = {"exits": 10_000.0, "mmio_exits": 10_000.0}
    snap = estimate(7, 1000.0, tally, (WatchedVcpu("0", None, 0), WatchedVcpu("1", None, 1)),
                    {0: rates, 1: {"exits": 0.0}}, rates, entry=entry)  # fmt: skip
    v = snap.vcpus[0]
    assert v.sampler == pytest.approx(0.1) and v.stretch("KVM_EXIT_MMIO") == v.stretch()
    assert v.vmm_own is not None and v.vmm_own.high == pytest.approx(own.high / 1e9)
    assert v.mean_vmm_bounds["KVM_EXIT_MMIO"].high == pytest.approx(own.high / 10_000)
    # the VM: two vCPUs' time, the sampler's on at most one of them at a time
    assert snap.vm.sampler == pytest.approx(0.05)
    assert snap.vm.stretch("KVM_EXIT_MMIO").seen == pytest.approx(0.02)
    # the VMM's threads waited 20 ms for a CPU: no look kept one off its CPU for longer
    tally.vmm_wait_ns = 20_000_000
    snap = estimate(7, 1000.0, tally, (WatchedVcpu("0", None, 0), WatchedVcpu("1", None, 1)),
                    {0: rates, 1: {"exits": 0.0}}, rates, entry=entry)  # fmt: skip
    assert snap.vcpus[0].stretch() == Stretch(pytest.approx(0.02), pytest.approx(0.02))
    assert snap.vcpus[1].stretch() == Stretch(pytest.approx(0.02), 0.0)


def test_the_run_delays_of_a_process_s_threads_are_read_per_thread():
    from kvmtop.host.procfs import run_delays

    delays = run_delays(os.getpid())
    assert delays is not None and threading.get_native_id() in delays
    assert all(isinstance(ns, int) and ns >= 0 for ns in delays.values())
    assert run_delays(2**22 + 1) is None  # no such process


def test_the_watch_names_each_mmio_address_and_its_direction_as_report_does():
    from kvmtop.abi.mmio_names import from_argv
    from kvmtop.commands.watch import snapshot_json, snapshot_text
    from kvmtop.sampling.shares import MMIO_WRITE
    from kvmtop.widgets.sampled_targets import _label

    names = from_argv(["qemu", "-M", "microvm", "-device", "virtio-blk-device,drive=d"])
    tally = Tally(1)
    tally.add((10**9, 1000, [(1000, 700, [(KVM_EXIT_MMIO, 0xFEB02E60, 200),
                                          (KVM_EXIT_MMIO, 0xFEB02E64 | MMIO_WRITE, 100)], 0, None,
                                         [])], 0))  # fmt: skip
    snap = estimate(1, 1000.0, tally, (WatchedVcpu("0", None, 0),), {}, {}, names=names)
    status, ack = snap.top_addresses
    assert status.label == "0xfeb02e60 read virtio-mmio 23 (virtio-blk) InterruptStatus"
    assert ack.label == "0xfeb02e64 write virtio-mmio 23 (virtio-blk) InterruptACK"
    assert ack.name == names.name(0xFEB02E64)  # the same names as report's
    assert status.label in snapshot_text(snap)
    (first, second) = snapshot_json(snap)["top_addresses"]
    assert first["address"] == 0xFEB02E60 and first["direction"] == "read"
    assert second["name"] == "virtio-mmio 23 (virtio-blk) InterruptACK"
    assert _label(status, 29) == "0xfeb02e60 r InterruptStatus"  # the watch view's pane at 80


def test_the_c_sampler_refuses_held_reasons_it_cannot_keep():
    if importlib.util.find_spec("kvmtop.native._sampler") is None:
        pytest.skip(
            "kvmtop.native._sampler is not built (no C compiler or Python headers at install)"
        )
    from kvmtop.native import _sampler  # type: ignore[attr-defined]

    _sampler.Sampler(1000.0, 1, tuple(range(17, 25)))  # eight: kept
    with pytest.raises(ValueError, match="at most 8 held exit reasons"):
        _sampler.Sampler(1000.0, 1, tuple(range(17, 26)))
    with pytest.raises(TypeError):
        _sampler.Sampler(1000.0, 1, ("17",))
