"""MMIO addresses named as the IO ports are (kvmtop.abi.mmio_names), and a one-stop run that ended
with reason 0 labelled for what is known of it: tables and argv parsing by hand-made input, then
real QEMU microvm guests whose MMIO exits are counted exactly."""

from __future__ import annotations

import json
import re
import subprocess

import helpers
import pytest
from guests.qemu_bios import build_flat32_bios, qemu_command
from helpers import KVMTOP, MODES

from kvmtop.abi.mmio_names import MmioNames, from_argv, kernel_devices, parse_size
from kvmtop.abi.record_layout import EXIT_CYCLE
from kvmtop.decoder import UNSEEN_LABEL, describe_exit, event_label
from kvmtop.model.events import ExitEvent

VIRTIO0 = 0xFEB00000


def test_the_well_known_x86_ranges_are_named_with_their_registers() -> None:
    names = MmioNames()
    assert names.name(0xFEE000B0) == "LAPIC EOI"
    assert names.name(0xFEE00300) == "LAPIC ICR low" and names.name(0xFEE00310) == "LAPIC ICR high"
    assert names.name(0xFEE00080) == "LAPIC TPR" and names.name(0xFEE00210) == "LAPIC IRR1"
    assert names.name(0xFEE00FF0) == "LAPIC"
    assert names.name(0xFEC00000) == "IOAPIC IOREGSEL" and names.name(0xFEC00010) == "IOAPIC IOWIN"
    assert names.name(0xFED000F0) == "HPET main counter"
    assert names.name(0xFED00128) == "HPET timer1 comparator"
    assert names.name(0xB00F8010) == "PCI MMCONFIG 00:1f.0 +0x10"
    assert names.name(0xC0000) == "" and names.name(VIRTIO0) == ""  # no microvm said


def test_microvm_on_the_command_line_names_its_virtio_mmio_transports() -> None:
    names = from_argv(["qemu-system-x86_64", "-M", "microvm,x-option-roms=off", "-m", "16"])
    assert names.name(VIRTIO0) == "virtio-mmio 0 MagicValue"
    assert names.name(VIRTIO0 + 0x200 * 3 + 0x50) == "virtio-mmio 3 QueueNotify"
    assert names.name(VIRTIO0 + 0x60) == "virtio-mmio 0 InterruptStatus"
    assert names.name(VIRTIO0 + 0x64) == "virtio-mmio 0 InterruptACK"
    assert names.name(VIRTIO0 + 0x70) == "virtio-mmio 0 Status"
    assert names.name(VIRTIO0 + 0x108) == "virtio-mmio 0 config+0x8"
    assert names.name(VIRTIO0 + 0x200 * 24) == ""  # past the 24 transports
    assert from_argv(["qemu", "-machine", "type=microvm"]).name(VIRTIO0) != ""
    assert from_argv(["qemu", "-machine", "q35"]).name(VIRTIO0) == ""
    assert from_argv(["qemu", "-machine", "q35"]).name(0xFEE000B0) == "LAPIC EOI"


def test_microvm_s_devices_take_the_transports_from_the_last_down() -> None:
    argv = ["qemu", "-M", "microvm", "-device", "virtio-blk-device,drive=d0",
            "-device=virtio-net-device,netdev=n0", "-device", "isa-debug-exit,iobase=0xf4",
            "-device", "virtio-rng-device,bus=virtio-mmio-bus.3"]  # fmt: skip
    names = from_argv(argv)
    assert names.name(VIRTIO0 + 0x200 * 23 + 0x50) == "virtio-mmio 23 (virtio-blk) QueueNotify"
    assert names.name(VIRTIO0 + 0x200 * 22) == "virtio-mmio 22 (virtio-net) MagicValue"
    assert names.name(VIRTIO0 + 0x200 * 3 + 0x70) == "virtio-mmio 3 (virtio-rng) Status"
    assert names.name(VIRTIO0 + 0x200 * 21) == "virtio-mmio 21 MagicValue"  # nothing on it


def test_a_kernel_command_line_declares_virtio_mmio_devices() -> None:
    argv = ["vmm", "--cmdline", "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 "
            "virtio_mmio.device=0x200@0xd0001000:6:3 virtio_mmio.device=bad@0x1:2"]  # fmt: skip
    names = from_argv(argv)
    assert names.name(0xD0000050) == "virtio-mmio 0 (irq 5) QueueNotify"
    assert names.name(0xD0000FFC) == "virtio-mmio 0 (irq 5) config+0xefc"
    assert names.name(0xD0001070) == "virtio-mmio 3 (irq 6) Status"
    assert names.name(0xD0001200) == ""
    assert [r.size for r in kernel_devices(argv[2])] == [4096, 0x200]
    assert parse_size("1M") == 1 << 20 and parse_size("0x10") == 16 and parse_size("x") is None


def test_a_one_stop_run_with_reason_0_is_not_called_unknown() -> None:
    cycle = ExitEvent(1, 0, 0, 10, 20, flags=EXIT_CYCLE)
    assert event_label(cycle) == UNSEEN_LABEL == "RUN_FAILED_OR_UNKNOWN"
    assert describe_exit(cycle).startswith("run ended, exit reason 0: failed run or unknown")
    two_stops = ExitEvent(1, 0, 0, 10, 20)
    assert event_label(two_stops) == "KVM_EXIT_UNKNOWN"


def record_json(tmp_path, *args: str) -> dict:
    report = helpers.record_json(tmp_path, *args, status=1)  # QEMU's status from isa-debug-exit
    out = tmp_path / "r.kvmtop"
    text = subprocess.run([*KVMTOP, "report", str(out)], capture_output=True, text=True, timeout=60)
    trace = subprocess.run([*KVMTOP, "export", str(out), "--perfetto", "-"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    slices = [e for e in json.loads(trace.stdout)["traceEvents"] if e.get("ph") == "X"]
    guest = [e for e in slices if e["cat"] in ("guest", "guest+vmm")]  # one slice per run
    mmio_names = [e["args"]["mmio_name"] for e in guest if "mmio_name" in e["args"]]
    return report | {"text": text.stdout, "trace_mmio_names": mmio_names}


def microvm(tmp_path, accesses: list[tuple[int, bool, int]], *extra: str) -> list[str]:
    path = tmp_path / "flat32.bin"
    path.write_bytes(build_flat32_bios(accesses))
    return qemu_command(str(path), "-M", "microvm", *extra)


@pytest.mark.qemu
@pytest.mark.parametrize("mode", MODES)
def test_a_microvm_guests_virtio_mmio_exits_are_named_and_counted(tmp_path, engine, mode) -> None:
    # the LAPIC is KVM's own (in-kernel irqchip): its EOI writes never reach QEMU, no exit
    accesses = [(VIRTIO0, False, 7), (VIRTIO0 + 0x200 + 0x50, True, 5), (0xFEE000B0, True, 3)]
    report = record_json(tmp_path, *MODES[mode], "--", *microvm(tmp_path, accesses))
    assert report["exits"]["KVM_EXIT_MMIO"] == 12 and report["exits"]["KVM_EXIT_IO"] == 1
    assert report["mmio"] == [
        {"address": VIRTIO0, "len": 4, "write": False, "count": 7,
         "name": "virtio-mmio 0 MagicValue"},
        {"address": VIRTIO0 + 0x250, "len": 4, "write": True, "count": 5,
         "name": "virtio-mmio 1 QueueNotify"},
    ]  # fmt: skip
    assert "0x0000feb00000 read  len 4           7  virtio-mmio 0 MagicValue" in report["text"]
    assert (
        report["trace_mmio_names"]
        == ["virtio-mmio 0 MagicValue"] * 7 + ["virtio-mmio 1 QueueNotify"] * 5
    )


@pytest.mark.qemu
@pytest.mark.parametrize("mode", MODES)
def test_an_ap_that_never_ran_is_labelled_for_what_the_mode_sees(tmp_path, engine, mode) -> None:
    """vCPU 1 waits for a SIPI that never comes: its one run ends when QEMU quits. Under user
    notification the return value is not seen and exit_reason stays 0."""
    # the BSP's 3,000 exits first: time for the AP's thread to be in KVM_RUN before the end
    busy = [(VIRTIO0, False, 3000)]
    report = record_json(tmp_path, *MODES[mode], "--", *microvm(tmp_path, busy, "-smp", "2"))
    ap = report["vcpus"]["1"]["exits"]
    assert "KVM_EXIT_UNKNOWN" not in report["exits"]
    if mode == "notify":  # QEMU's quit may signal the AP out of its run first: then INTR
        assert ap in ({UNSEEN_LABEL: 1}, {"KVM_EXIT_INTR": 1})
        (label,) = ap  # the text's row for vCPU 1 names it too (vCPU 0 may have one of its own)
        assert re.search(rf"^ +1  {label} +1 ", report["text"], re.MULTILINE), report["text"]
    else:  # the tracer sees KVM_RUN's errno (two stops) or the kick's EINTR (one stop)
        assert ap == {"KVM_EXIT_INTR": 1}


def test_a_name_cut_to_fit_keeps_its_register_and_shortens_the_device():
    from kvmtop.abi.mmio_names import fit_name

    name = "virtio-mmio 23 (virtio-blk) InterruptStatus"
    assert fit_name(name, 60) == "vio23 (virtio-blk) InterruptStatus"
    assert fit_name(name, 30) == "vio23 (virtio… InterruptStatus"
    assert fit_name(name, 23) == "vio23 InterruptStatus"  # not "vio23 (virtio-blk) Inte"
    assert fit_name("virtio-mmio 23 (virtio-blk) InterruptACK", 23) == "vio23 InterruptACK"
    assert fit_name(name, 15) == "InterruptStatus"
    assert fit_name("PCI MMCONFIG 00:1f.0 +0x40", 16) == "00:1f.0 +0x40"
