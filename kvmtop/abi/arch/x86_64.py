"""x86_64: the kvm_run exit union, syscall numbers and well-known IO ports.

Offsets are from the start of the exit union (kvmtop.abi.kvm.RUN_UNION; include/uapi/linux/kvm.h),
checked on this machine with offsetof().
"""

from __future__ import annotations

import struct

from kvmtop.abi.kvm import KVM_MEMORY_EXIT_FLAG_PRIVATE, RUN_UNION
from kvmtop.abi.record_layout import EXIT_PRIVATE, EXIT_WRITE
from kvmtop.xlat_exit import ExitReason

NAME = "x86_64"
AUDIT_ARCH = 0xC000003E  # AUDIT_ARCH_X86_64 (include/uapi/linux/audit.h)
SYS_IOCTL = 16  # arch/x86/entry/syscalls/syscall_64.tbl
PAGE_SIZE = 4096
PIO_PAGE_OFFSET = 1  # KVM_PIO_PAGE_OFFSET
RUN_MAP_SIZE = PAGE_SIZE * (PIO_PAGE_OFFSET + 1)  # what kvmtop maps: kvm_run and PIO data
COALESCED_MMIO_PAGE_OFFSET = 2  # KVM_COALESCED_MMIO_PAGE_OFFSET

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset @32
_MMIO = struct.Struct("<QQIB")  # phys_addr, data, len, is_write @32
_MSR = struct.Struct("<B7xIIQ")  # error, pad, reason, index, data @32
_U64_U32 = struct.Struct("<QI")
_U32_U32 = struct.Struct("<II")
_HYPERCALL = struct.Struct("<Q48xQI")  # nr, args[6], ret, longmode @32
_MEMORY_FAULT = struct.Struct("<QQQ")  # flags, gpa, size @32
_DEBUG = struct.Struct("<II QQ")  # exception, pad, pc, dr6/dr7 @32 (kvm_debug_exit_arch)


# classic BPF (include/uapi/linux/filter.h, bpf_common.h) and seccomp (linux/seccomp.h)
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_TRACE = 0x7FFF0000, 0x7FF00000
SECCOMP_RET_TRACE, SECCOMP_RET_USER_NOTIF = 0x7FF00000, 0x7FC00000
_SECCOMP_DATA_NR, _SECCOMP_DATA_ARCH, _SECCOMP_DATA_ARG1 = 0, 4, 24  # struct seccomp_data
_INSN = struct.Struct("<HBBI")  # struct sock_filter: code, jt, jf, k


def seccomp_ioctls(requests: tuple[int, ...], action: int) -> bytes:
    """A filter returning ``action`` (SECCOMP_RET_TRACE or SECCOMP_RET_USER_NOTIF) for
    ioctl(_, request) with one of ``requests`` (compared on the low 32 bits, as the kernel reads
    it), and allowing every other syscall and every other ABI (x32, i386)."""
    n = len(requests)
    insns = [
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARCH),
        (_BPF_JEQ_K, 0, 3 + n, AUDIT_ARCH),  # another ABI: allow
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_NR),
        (_BPF_JEQ_K, 0, 1 + n, SYS_IOCTL),
        (_BPF_LD_W_ABS, 0, 0, _SECCOMP_DATA_ARG1),
        *((_BPF_JEQ_K, n - i, 0, request) for i, request in enumerate(requests)),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
        (_BPF_RET_K, 0, 0, action),
    ]
    return b"".join(_INSN.pack(*insn) for insn in insns)


def seccomp_trace_ioctls(first: int, second: int) -> bytes:
    """SECCOMP_RET_TRACE for ioctl(_, first|second); every other syscall allowed."""
    return seccomp_ioctls((first, second), SECCOMP_RET_TRACE)


def decode_union(
    reason: int, run: bytes | memoryview, with_data: bool, reads: bool = False
) -> tuple[int, int, int, bytes]:
    """(a, b, flags, data) for one exit. ``run`` holds at least the kvm_run page, and the PIO
    page after it when IO data is wanted. Unknown reasons decode to zeros. ``reads``: read at
    the vCPU's next KVM_RUN entry, where the VMM has put the value of an IO in, MMIO read or
    RDMSR for the guest: that value is the data too."""
    R = ExitReason
    if reason == R.IO:
        direction, size, port, count, data_offset = _IO.unpack_from(run, RUN_UNION)
        data = b""
        if with_data and (direction == 1 or reads):
            end = data_offset + size * count
            data = bytes(run[data_offset:end]) if end <= len(run) else b""
        return port, size | (count << 8), EXIT_WRITE if direction else 0, data
    if reason == R.MMIO:
        addr, value, length, is_write = _MMIO.unpack_from(run, RUN_UNION)
        data = _U64.pack(value)[: min(length, 8)] if (with_data and (is_write or reads)) else b""
        return addr, length, EXIT_WRITE if is_write else 0, data
    if reason in (R.X86_RDMSR, R.X86_WRMSR):
        _error, why, index, value = _MSR.unpack_from(run, RUN_UNION)
        write = reason == R.X86_WRMSR
        data = _U64.pack(value) if (with_data and (write or reads)) else b""
        return index, why, EXIT_WRITE if write else 0, data
    if reason == R.HYPERCALL:
        nr, _ret, longmode = _HYPERCALL.unpack_from(run, RUN_UNION)
        return nr, longmode, 0, b""
    if reason in (R.SYSTEM_EVENT, R.INTERNAL_ERROR):
        kind, ndata = _U32_U32.unpack_from(run, RUN_UNION)
        return kind, ndata, 0, b""
    if reason == R.FAIL_ENTRY:
        hw_reason, cpu = _U64_U32.unpack_from(run, RUN_UNION)
        return hw_reason, cpu, 0, b""
    if reason == R.UNKNOWN:
        return _U64.unpack_from(run, RUN_UNION)[0], 0, 0, b""
    if reason == R.EXCEPTION:
        exception, error_code = _U32_U32.unpack_from(run, RUN_UNION)
        return exception, error_code, 0, b""
    if reason == R.TPR_ACCESS:
        rip, is_write = _U64_U32.unpack_from(run, RUN_UNION)
        return rip, is_write, EXIT_WRITE if is_write else 0, b""
    if reason == R.DEBUG:
        exception, _pad, pc, _dr = _DEBUG.unpack_from(run, RUN_UNION)
        return pc, exception, 0, b""
    if reason == R.IOAPIC_EOI:
        return _U8.unpack_from(run, RUN_UNION)[0], 0, 0, b""
    if reason in (R.NOTIFY, R.HYPERV, R.XEN):
        return _U32.unpack_from(run, RUN_UNION)[0], 0, 0, b""
    if reason == R.MEMORY_FAULT:
        flags, gpa, size = _MEMORY_FAULT.unpack_from(run, RUN_UNION)
        private = EXIT_PRIVATE if flags & KVM_MEMORY_EXIT_FLAG_PRIVATE else 0
        return gpa, min(size, 0xFFFFFFFF), private, b""
    return 0, 0, 0, b""


# Well-known PC IO ports, for naming the top ports of a vCPU.
PORT_NAMES: dict[int, str] = {
    0x20: "PIC1 cmd",
    0x21: "PIC1 data",
    0x40: "PIT ch0",
    0x41: "PIT ch1",
    0x42: "PIT ch2",
    0x43: "PIT mode",
    0x60: "i8042 data",
    0x61: "system ctrl B",
    0x64: "i8042 cmd",
    0x70: "RTC index",
    0x71: "RTC data",
    0x80: "POST",
    0x92: "A20 fast",
    0xA0: "PIC2 cmd",
    0xA1: "PIC2 data",
    0xB2: "APM/SMI cmd",
    0xB3: "APM/SMI status",
    0xF4: "debug-exit",
    0x1F0: "IDE0 data",
    0x1F7: "IDE0 status",
    0x2F8: "COM2",
    0x3F8: "COM1 data",
    0x3F9: "COM1 IER",
    0x3FA: "COM1 IIR",
    0x3FB: "COM1 LCR",
    0x3FC: "COM1 MCR",
    0x3FD: "COM1 LSR",
    0x3FE: "COM1 MSR",
    0x402: "firmware debug",
    0x510: "fw_cfg ctl",
    0x511: "fw_cfg data",
    0x514: "fw_cfg dma",
    0x600: "ACPI PM",
    0x604: "ACPI PM1a cnt",
    0x608: "ACPI PM timer",
    0xCF8: "PCI config addr",
    0xCFC: "PCI config data",
    0xCFD: "PCI config data+1",
    0xCFE: "PCI config data+2",
    0xCFF: "PCI config data+3",
}


# The guest's registers KVM copies into kvm_run at every KVM_RUN return while kvm_valid_regs
# asks for them (store_regs() in arch/x86/kvm/x86.c; struct kvm_sync_regs, checked with
# offsetof against linux/kvm.h 6.1). kvm_dirty_regs is never written: KVM would load the
# page's registers into the vCPU.
KVM_CAP_SYNC_REGS = 74  # KVM_CHECK_EXTENSION on a VM fd: the kvm_valid_regs bits it allows
KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS = 0x1, 0x2  # kvm_valid_regs bits (KVM_SYNC_X86_*)
RUN_VALID_REGS = 0x120  # offsetof(struct kvm_run, kvm_valid_regs), u64
RUN_DIRTY_REGS = 0x128  # offsetof(struct kvm_run, kvm_dirty_regs): never written
SYNC_REGS, SYNC_REGS_SIZE = 0x130, 0x90  # s.regs.regs: struct kvm_regs (rax..r15, rip, rflags)
SYNC_RIP = 0x1B0  # s.regs.regs.rip (rflags follows)
SYNC_CS = 0x1C0  # s.regs.sregs.cs: base u64, limit u32, selector u16, type, present, dpl, db, s, l
SYNC_CS_L = SYNC_CS + 19  # cs.l: 64-bit code, where cs.base is not used
SYNC_SS_DPL = 0x248  # s.regs.sregs.ss.dpl: the CPL in protected mode
SYNC_CR0 = 0x2A0  # s.regs.sregs.cr0
_RIP_FLAGS = struct.Struct("<QQ")  # rip, rflags
X86_EFLAGS_VM = 1 << 17  # virtual-8086 mode: CPL 3
X86_CR0_PE = 1


def guest_rip(run: bytes | memoryview) -> tuple[int, int, int] | None:
    """(rip, linear address, CPL or -1) of the exit KVM last returned from, from the registers
    it synced into ``run`` (None: kvm_valid_regs does not ask for them). The linear address
    adds cs.base outside 64-bit code, and it and the CPL are known only where the segment
    registers are synced too (else: rip, -1)."""
    valid = _U64.unpack_from(run, RUN_VALID_REGS)[0]
    if not valid & KVM_SYNC_X86_REGS:
        return None
    rip, rflags = _RIP_FLAGS.unpack_from(run, SYNC_RIP)
    if not valid & KVM_SYNC_X86_SREGS:
        return rip, rip, -1
    base = _U64.unpack_from(run, SYNC_CS)[0]
    cr0 = _U64.unpack_from(run, SYNC_CR0)[0]
    if not cr0 & X86_CR0_PE:
        cpl = 0
    else:
        cpl = 3 if rflags & X86_EFLAGS_VM else run[SYNC_SS_DPL] & 3
    linear = rip if run[SYNC_CS_L] else (base + rip) & 0xFFFFFFFF
    return rip, linear, cpl


# Running a syscall in a tracee (kvmtop.trace.inject, only for KVM_GET_STATS_FD): the 64-bit
# `syscall` instruction, its user code segment, and its argument registers.
SYS_CLOSE = 3
SYSCALL_INSN = b"\x0f\x05"
USER_CS_64 = 0x33
SYSCALL_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
