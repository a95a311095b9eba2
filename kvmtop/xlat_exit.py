"""Tables that turn KVM's numbers into names.

Values come from include/uapi/linux/kvm.h (see also shared kvm-abi.md). A number that is not in a
table is shown as a number (``KVM_EXIT_44``): newer kernels add reasons, and kvmtop must count
them rather than fail on them.
"""

from __future__ import annotations

import enum


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* from include/uapi/linux/kvm.h."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37
    LOONGARCH_IOCSR = 38
    MEMORY_FAULT = 39
    TDX = 40
    ARM_SEA = 41
    ARM_LDST64B = 42
    SNP_REQ_CERTS = 43


class IoDirection(enum.IntEnum):
    """KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT."""

    IN = 0
    OUT = 1


# KVM_SYSTEM_EVENT_* (kvm_run.system_event.type)
SYSTEM_EVENT_TYPES: dict[int, str] = {
    1: "shutdown",
    2: "reset",
    3: "crash",
    4: "wakeup",
    5: "suspend",
    6: "sev-term",
    7: "tdx-fatal",
}

# KVM_INTERNAL_ERROR_* (kvm_run.internal.suberror)
INTERNAL_ERROR_SUBERRORS: dict[int, str] = {
    1: "emulation",
    2: "simultaneous exceptions",
    3: "delivery event",
    4: "unexpected exit reason",
}

# KVM_MSR_EXIT_REASON_* (kvm_run.msr.reason)
MSR_EXIT_REASONS: dict[int, str] = {1: "inval", 2: "unknown", 4: "filter"}

_PREFIX = "KVM_EXIT_"
_BY_NAME: dict[str, int] = {_PREFIX + r.name: int(r) for r in ExitReason}


def exit_reason_name(reason: int) -> str:
    """``KVM_EXIT_IO`` for 2; ``KVM_EXIT_44`` for a number this table does not know."""
    try:
        return _PREFIX + ExitReason(reason).name
    except ValueError:
        return f"{_PREFIX}{reason}"


def exit_reason_short(reason: int) -> str:
    """``IO`` for 2, ``44`` for an unknown number: for narrow columns."""
    return exit_reason_name(reason)[len(_PREFIX) :]


def exit_reason_number(name: str) -> int:
    """The inverse of :func:`exit_reason_name`; raises ValueError for a malformed name."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit():
        return int(name[len(_PREFIX) :])
    raise ValueError(f"not a KVM exit reason: {name!r}")


def errno_name(errno_value: int) -> str:
    """``EINTR`` for 4: how a failed KVM_RUN is named in tables."""
    import errno as errno_module

    return errno_module.errorcode.get(errno_value, f"errno {errno_value}")
