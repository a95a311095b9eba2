"""The pure side of `kvmtop watch`: looks to shares with their bounds, and the C sampler against
its Python reference on the same buffers."""

from __future__ import annotations

import importlib.util
import struct
import time

import pytest

from kvmtop.entry_cost import EntryCost
from kvmtop.sampler import PySampler
from kvmtop.sampling import (
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    MAX_KEYS,
    Share,
    Tally,
    WatchedVcpu,
    estimate,
)


def test_a_share_has_its_wilson_bounds():
    half = Share(50, 100)
    assert half.value == 0.5 and round(half.low, 4) == 0.4038 and round(half.high, 4) == 0.5962
    assert (Share(0, 0).low, Share(0, 0).high) == (0.0, 1.0)  # no look: nothing known
    none = Share(0, 1000)
    assert none.low == 0.0 and 0 < none.high < 0.004 and none.text() == "0.0% ±0.2"


def test_a_tally_keeps_a_bounded_table_and_the_estimate_adds_the_vcpus():
    tally = Tally(2)
    keys = [(KVM_EXIT_MMIO, a, 1) for a in range(MAX_KEYS + 10)]
    tally.add((1_000_000_000, 5000, [(5000, 1000, [(KVM_EXIT_IO, 0x80 | 1 << 16, 4000)]),
                                     (5000, 5000 - len(keys), keys)]))  # fmt: skip
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
    tally.add((1_000_000_000, 1000, [(1000, 600, [(KVM_EXIT_IO, 0x80, 400)])]))
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
    rated = estimate(7, 1000.0, tally, vcpus, {0: {"exits": 30_000.0}}, {"exits": 30_000.0},
                     entry=entry)  # fmt: skip
    # every exit KVM counted, times 7.5 µs: 0.225 of each second at most is KVM's, not the VMM's
    assert rated.vcpus[0].kvm_part_at_most == pytest.approx(0.225)
    assert rated.vm.kvm_part_at_most == pytest.approx(0.225)
    busy = estimate(7, 1000.0, tally, vcpus, {0: {"exits": 90_000.0}}, {}, entry=entry)
    assert busy.vcpus[0].kvm_part_at_most == pytest.approx(0.4)  # never more than the looks saw
    slow = estimate(7, 1000.0, tally, vcpus, rates, rates[0], entry=EntryCost(30e3, 0.0, 300))
    assert slow.vcpus[0].mean_vmm_ns["KVM_EXIT_IO"] == 0.0  # never below nothing


@pytest.mark.parametrize("native", [True, False])
def test_the_sampler_counts_what_the_page_says(native):
    if native and importlib.util.find_spec("kvmtop._sampler") is None:
        pytest.skip("kvmtop._sampler is not built (no C compiler or Python headers at install)")
    pages = [bytearray(4096), bytearray(4096)]
    struct.pack_into("<I", pages[1], 8, KVM_EXIT_IO)  # vCPU 1 in the VMM, `out 0x3f8`
    struct.pack_into("<BBBBI", pages[1], 32, 1, 1, 0xF8, 0x03, 1)
    if native:
        from kvmtop import _sampler  # type: ignore[attr-defined]

        sampler = _sampler.Sampler(2000.0, 1)
    else:
        sampler = PySampler(2000.0, 1)
    for page in pages:
        sampler.add(page)
    sampler.start()
    time.sleep(0.2)
    sampler.stop()
    _ns, looks, ((s0, r0, k0), (s1, r1, k1)) = sampler.take()
    assert looks > 0 and s0 == r0 == s1 == looks and not k0
    assert r1 == 0 and k1 == [(KVM_EXIT_IO, 0x3F8 | 1 << 16, looks)]
