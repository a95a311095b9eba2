"""The guests themselves, untraced: they make exactly the exits the tests count on."""

from __future__ import annotations

import json
import subprocess

import pytest
from guests.qemu_bios import build_bios, qemu_command

from kvmtop.minivmm.vmm import counted_command, demo_command


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2])
def test_minivmm_counted_guest_makes_exactly_the_requested_exits(tmp_path, vcpus):
    report = tmp_path / "own.json"
    argv = counted_command(
        vcpus=vcpus, outs=123, mmio_writes=45, exit_status=3, report_json=str(report)
    )
    assert subprocess.run(argv, timeout=60).returncode == 3
    own = json.loads(report.read_text())
    assert own["exits"] == {"KVM_EXIT_IO": 124 * vcpus, "KVM_EXIT_MMIO": 45 * vcpus}
    assert {"port": 0x80, "direction": "out", "size": 1, "count": 123 * vcpus} in own["io"]
    assert own["mmio"] == [{"address": 0xC0000, "len": 1, "write": True, "count": 45 * vcpus}]
    assert sorted(own["vcpus"]) == [str(i) for i in range(vcpus)]


@pytest.mark.kvm
def test_minivmm_demo_makes_a_varied_mix_on_two_vcpus(tmp_path):
    report = tmp_path / "own.json"
    assert (
        subprocess.run(
            demo_command(duration=2, report_json=str(report), phase_seconds=0.4), timeout=60
        ).returncode
        == 0
    )
    own = json.loads(report.read_text())
    for vcpu in ("0", "1"):
        assert {"KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_HLT"} <= set(own["vcpus"][vcpu]["exits"])
    ports = {entry["port"] for entry in own["io"]}
    assert {0x3F8, 0x70, 0x71, 0x80, 0xCF8, 0xCFC} <= ports


@pytest.mark.qemu
def test_qemu_bios_guest_exits_with_status_1(tmp_path):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=10, mmio_writes=10))
    assert subprocess.run(qemu_command(str(bios)), capture_output=True, timeout=60).returncode == 1
