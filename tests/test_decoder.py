"""Decoding is pure: hand-made kvm_run bytes in, typed values out."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from kvmtop import decoder
from kvmtop.abi.arch import x86_64
from kvmtop.abi.record_layout import EXIT_WRITE
from kvmtop.model.events import ExitEvent
from kvmtop.xlat_exit import ExitReason, exit_reason_name, exit_reason_number

RUN_BYTES = x86_64.RUN_MAP_SIZE


def run_page(reason: int, union: bytes = b"", pio: bytes = b"") -> bytearray:
    page = bytearray(RUN_BYTES)
    struct.pack_into("<I", page, 8, reason)
    page[32 : 32 + len(union)] = union
    page[4096 : 4096 + len(pio)] = pio
    return page


def test_io_out_decodes_port_size_count_and_data_when_asked() -> None:
    union = struct.pack("<BBHIQ", 1, 2, 0x3F8, 3, 4096)
    page = run_page(ExitReason.IO, union, b"abcdef")
    reason, a, b, flags, data = decoder.decode_exit(page, with_data=True)
    assert (reason, a, decoder.io_size_count(b), flags, data) == (
        2,
        0x3F8,
        (2, 3),
        EXIT_WRITE,
        b"abcdef",
    )
    assert decoder.decode_exit(page)[4] == b""  # data only with --data


def test_io_in_has_no_data_at_exit() -> None:
    page = run_page(ExitReason.IO, struct.pack("<BBHIQ", 0, 1, 0x71, 1, 4096), b"\xff")
    assert decoder.decode_exit(page, with_data=True)[1:] == (0x71, 1 | 1 << 8, 0, b"")


def test_mmio_write_decodes_address_length_and_data() -> None:
    union = struct.pack("<QQIB", 0xC0000, 0x11223344, 2, 1)
    reason, a, b, flags, data = decoder.decode_exit(run_page(6, union), with_data=True)
    assert (reason, a, b, flags, data) == (6, 0xC0000, 2, EXIT_WRITE, b"\x44\x33")


def test_system_event_internal_error_hypercall_fail_entry_msr() -> None:
    cases = {
        ExitReason.SYSTEM_EVENT: (struct.pack("<II", 2, 1), (2, 1, 0), "SYSTEM_EVENT reset"),
        ExitReason.INTERNAL_ERROR: (
            struct.pack("<II", 1, 3),
            (1, 3, 0),
            "INTERNAL_ERROR emulation",
        ),
        ExitReason.HYPERCALL: (struct.pack("<Q48xQI", 12, 0, 1), (12, 1, 0), "HYPERCALL nr=12"),
        ExitReason.FAIL_ENTRY: (
            struct.pack("<QI", 0x80000021, 5),
            (0x80000021, 5, 0),
            "FAIL_ENTRY",
        ),
        ExitReason.X86_WRMSR: (
            struct.pack("<B7xIIQ", 0, 2, 0x1B, 7),
            (0x1B, 2, EXIT_WRITE),
            "WRMSR 0x1b",
        ),
        ExitReason.X86_RDMSR: (
            struct.pack("<B7xIIQ", 0, 4, 0x10, 0),
            (0x10, 4, 0),
            "RDMSR 0x10 (filter)",
        ),
    }
    for reason, (union, expected, text) in cases.items():
        got = decoder.decode_exit(run_page(reason, union))
        assert got[0] == reason and got[1:4] == expected, reason
        event = ExitEvent(0, reason, 0, 0, 1, *expected)
        assert decoder.describe_exit(event).startswith(text), reason


@given(st.integers(min_value=44, max_value=2**32 - 1), st.binary(max_size=256))
def test_unknown_reasons_are_counted_by_number_and_never_crash(reason: int, union: bytes) -> None:
    got = decoder.decode_exit(run_page(reason, union))
    assert got == (reason, 0, 0, 0, b"")
    assert exit_reason_name(reason) == f"KVM_EXIT_{reason}"
    assert exit_reason_number(exit_reason_name(reason)) == reason
    assert decoder.describe_exit(ExitEvent(0, reason, 0, 0, 1)) == str(reason)


@given(st.integers(min_value=0, max_value=43), st.binary(min_size=256, max_size=256))
def test_every_known_reason_decodes_any_union_bytes(reason: int, union: bytes) -> None:
    reason_got, a, b, flags, data = decoder.decode_exit(run_page(reason, union), with_data=True)
    assert reason_got == reason and a >= 0 and b >= 0
    decoder.describe_exit(ExitEvent(0, reason, 0, 0, 1, a, b, flags, data))


def test_failed_runs_are_labelled_by_errno() -> None:
    assert decoder.exit_label(ExitReason.IO, 0) == "KVM_EXIT_IO"
    assert decoder.exit_label(ExitReason.IO, 4) == "KVM_EXIT_INTR"  # EINTR: the kernel says INTR
    assert decoder.exit_label(0, 14) == "KVM_RUN_EFAULT"


def test_proc_text_names_vcpus() -> None:
    assert decoder.vcpu_id_of_fd_link("anon_inode:kvm-vcpu:12") == 12
    assert decoder.vcpu_id_of_fd_link("anon_inode:kvm-vm") is None
    assert decoder.is_kvm_fd_link("/dev/kvm") and not decoder.is_kvm_fd_link("/dev/null")
    assert decoder.is_kvm_fd_link("anon_inode:kvm-vm")
    assert decoder.is_kvm_fd_link("anon_inode:kvm-vcpu:3")
    # stats fds (kvmtop's own, or QEMU's for query-stats) are neither a VM nor a vCPU
    assert not decoder.is_kvm_fd_link("anon_inode:kvm-vm-stats")
    assert not decoder.is_kvm_fd_link("anon_inode:kvm-vcpu-stats:0")
    maps = (
        "7f4454bbb000-7f4454bbe000 rw-s 00000000 00:10 1039   anon_inode:kvm-vcpu:0\n"
        "7f4454c00000-7f4454c40000 rw-s 00040000 00:10 1039   anon_inode:kvm-vcpu:0\n"
        "7f4454bbf000-7f4454bc2000 rw-s 00000000 00:10 1039   anon_inode:kvm-vcpu:1\n"
        "55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0      [heap]\n"
    )
    got = decoder.vcpu_mappings(maps)
    assert [(m.vcpu, m.start) for m in got] == [(0, 0x7F4454BBB000), (1, 0x7F4454BBF000)]
    assert decoder.proc_syscall("16 0x10 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f00") == (
        16,
        (0x10, 0xAE80, 0, 0, 0, 0),
    )
    assert decoder.proc_syscall("running") is None
