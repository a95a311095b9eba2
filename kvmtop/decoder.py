"""Pure decoding: ioctls, struct kvm_run, and the /proc text that names vCPUs.

Bytes and strings in, typed values out. No ptrace, no Textual, no I/O: everything here can be
tested with hand-made bytes.
"""

from __future__ import annotations

import errno as errno_module
import re
import struct
from dataclasses import dataclass
from types import ModuleType

from kvmtop.abi.arch import HOST
from kvmtop.abi.kvm import RUN_EXIT_REASON
from kvmtop.abi.record_layout import EXIT_CYCLE, EXIT_PRIVATE, EXIT_WRITE, RUN_UNSEEN
from kvmtop.model.events import ExitEvent
from kvmtop.xlat_exit import (
    INTERNAL_ERROR_SUBERRORS,
    MSR_EXIT_REASONS,
    SYSTEM_EVENT_TYPES,
    ExitReason,
    errno_name,
    exit_reason_name,
)

_EXIT_REASON = struct.Struct("<I")


def exit_reason_of(run: bytes | memoryview) -> int:
    return int(_EXIT_REASON.unpack_from(run, RUN_EXIT_REASON)[0])


def decode_exit(
    run: bytes | memoryview, with_data: bool = False, arch: ModuleType = HOST, reads: bool = False
) -> tuple[int, int, int, int, bytes]:
    """(reason, a, b, flags, data) from a vCPU's kvm_run mapping, read after KVM_RUN returned 0
    (``reads``: at its next entry, where a read's value for the guest is there too). ``run`` is
    the kvm_run page, plus the PIO data page when ``with_data``."""
    reason = _EXIT_REASON.unpack_from(run, RUN_EXIT_REASON)[0]
    a, b, flags, data = arch.decode_union(reason, run, with_data, reads)
    return reason, a, b, flags, data


def is_read(reason: int, flags: int) -> bool:
    """An exit whose value the VMM gives the guest (IO in, MMIO read, RDMSR)."""
    return not flags & EXIT_WRITE and reason in (
        ExitReason.IO,
        ExitReason.MMIO,
        ExitReason.X86_RDMSR,
    )


def ioctl_request_32(request: int) -> int:
    """ioctl's request argument is an unsigned int: the kernel ignores the upper register bits."""
    return request & 0xFFFFFFFF


# A one-stop exit with reason 0 (the summaries' RUN_UNSEEN errno): a failed run and
# KVM_EXIT_UNKNOWN look alike, since KVM_RUN's return value was not seen.
UNSEEN_LABEL = "RUN_FAILED_OR_UNKNOWN"
UNSEEN_TEXT = "run ended, exit reason 0: failed run or unknown"


def exit_label(reason: int, run_errno: int) -> str:
    """The key exits are counted under: the exit reason when KVM_RUN returned 0;
    ``KVM_EXIT_INTR`` for EINTR (the kernel sets that reason when a signal ends the run);
    ``KVM_RUN_<ERRNO>`` for any other failure; :data:`UNSEEN_LABEL` for reason 0 of a run
    whose return value was not seen (:data:`RUN_UNSEEN`)."""
    if run_errno == RUN_UNSEEN:
        return UNSEEN_LABEL
    if run_errno == 0:
        return exit_reason_name(reason)
    if run_errno == errno_module.EINTR:
        return exit_reason_name(ExitReason.INTR)
    return f"KVM_RUN_{errno_name(run_errno)}"


def unseen_run(event: ExitEvent) -> bool:
    """A one-stop exit with reason 0: a failed KVM_RUN or KVM_EXIT_UNKNOWN, not told apart."""
    return bool(event.flags & EXIT_CYCLE) and event.reason == 0 and not event.errno


def event_label(event: ExitEvent) -> str:
    """:func:`exit_label` of one exit."""
    return exit_label(event.reason, RUN_UNSEEN if unseen_run(event) else event.errno)


def io_size_count(b: int) -> tuple[int, int]:
    """IO exits pack ``size | count << 8`` into ExitEvent.b."""
    return b & 0xFF, b >> 8


def describe_exit(event: ExitEvent) -> str:
    """One line of decoded details, as the exit log shows it."""
    if event.errno:
        return (
            f"{exit_label(event.reason, event.errno)} (KVM_RUN failed: {errno_name(event.errno)})"
        )
    if unseen_run(event):
        return f"{UNSEEN_TEXT} (KVM_RUN's return value is not seen in this mode)"
    reason = event.reason
    write = bool(event.flags & EXIT_WRITE)
    data = f" data={event.data.hex()}" if event.data else ""
    R = ExitReason
    if reason == R.IO:
        size, count = io_size_count(event.b)
        rep = f" count={count}" if count != 1 else ""
        return f"IO {'out' if write else 'in'} port=0x{event.a:x} size={size}{rep}{data}"
    if reason == R.MMIO:
        return f"MMIO {'write' if write else 'read'} 0x{event.a:x} len={event.b}{data}"
    if reason in (R.X86_RDMSR, R.X86_WRMSR):
        kind = "WRMSR" if write else "RDMSR"
        why = MSR_EXIT_REASONS.get(event.b, str(event.b))
        return f"{kind} 0x{event.a:x} ({why}){data}"
    if reason == R.SYSTEM_EVENT:
        return f"SYSTEM_EVENT {SYSTEM_EVENT_TYPES.get(event.a, f'type {event.a}')}"
    if reason == R.INTERNAL_ERROR:
        sub = INTERNAL_ERROR_SUBERRORS.get(event.a, f"suberror {event.a}")
        return f"INTERNAL_ERROR {sub} ndata={event.b}"
    if reason == R.HYPERCALL:
        return f"HYPERCALL nr={event.a}"
    if reason == R.FAIL_ENTRY:
        return f"FAIL_ENTRY hardware reason=0x{event.a:x} cpu={event.b}"
    if reason == R.UNKNOWN:
        return f"UNKNOWN hardware reason=0x{event.a:x}"
    if reason == R.EXCEPTION:
        return f"EXCEPTION {event.a} error_code=0x{event.b:x}"
    if reason == R.TPR_ACCESS:
        return f"TPR_ACCESS {'write' if write else 'read'} rip=0x{event.a:x}"
    if reason == R.DEBUG:
        return f"DEBUG exception={event.b} pc=0x{event.a:x}"
    if reason == R.IOAPIC_EOI:
        return f"IOAPIC_EOI vector={event.a}"
    if reason in (R.NOTIFY, R.HYPERV, R.XEN):
        return (
            f"{exit_reason_name(reason)[9:]} {'flags' if reason == R.NOTIFY else 'type'}={event.a}"
        )
    if reason == R.MEMORY_FAULT:
        private = " private" if event.flags & EXIT_PRIVATE else ""
        return f"MEMORY_FAULT gpa=0x{event.a:x} size={event.b}{private}"
    return exit_reason_name(reason)[9:]


# The names of details a and b by reason (docs/recording-format.md), for exports; IO is apart.
_DETAIL_NAMES: dict[int, tuple[str, str | None]] = {
    ExitReason.MMIO: ("address", "len"),
    ExitReason.X86_RDMSR: ("msr", "msr_reason"),
    ExitReason.X86_WRMSR: ("msr", "msr_reason"),
    ExitReason.HYPERCALL: ("nr", "longmode"),
    ExitReason.SYSTEM_EVENT: ("type", "ndata"),
    ExitReason.INTERNAL_ERROR: ("suberror", "ndata"),
    ExitReason.FAIL_ENTRY: ("hardware_reason", "cpu"),
    ExitReason.UNKNOWN: ("hardware_reason", None),
    ExitReason.EXCEPTION: ("exception", "error_code"),
    ExitReason.TPR_ACCESS: ("rip", "write"),
    ExitReason.DEBUG: ("pc", "exception"),
    ExitReason.IOAPIC_EOI: ("vector", None),
    ExitReason.NOTIFY: ("flags", None),
    ExitReason.HYPERV: ("type", None),
    ExitReason.XEN: ("type", None),
    ExitReason.MEMORY_FAULT: ("gpa", "size"),
}


def exit_details(event: ExitEvent) -> dict[str, int | str | bool]:
    """An exit's details under stable names, for exports: IO ``port``, ``direction``, ``size``,
    ``count``; MMIO ``address``, ``len``, ``write``; ...; ``data`` (hex) only when recorded. A
    failed run has none: kvm_run's exit union is stale then."""
    details: dict[str, int | str | bool] = {}
    write = bool(event.flags & EXIT_WRITE)
    if event.errno:
        return details
    if event.reason == ExitReason.IO:
        size, count = io_size_count(event.b)
        details.update(port=event.a, direction="out" if write else "in", size=size, count=count)
    elif event.reason in _DETAIL_NAMES:
        name_a, name_b = _DETAIL_NAMES[event.reason]
        details[name_a] = event.a
        if name_b is not None:
            details[name_b] = event.b
        if event.reason == ExitReason.MMIO:
            details["write"] = write
    if event.flags & EXIT_PRIVATE:
        details["private"] = True
    if event.data:
        details["data"] = event.data.hex()
    return details


# --- /proc text -------------------------------------------------------------------------------

_VCPU_LINK = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")


def vcpu_id_of_fd_link(link: str) -> int | None:
    """The vCPU id from a /proc/PID/fd link (``anon_inode:kvm-vcpu:3`` -> 3), else None."""
    m = _VCPU_LINK.match(link)
    return int(m.group(1)) if m else None


VM_FD_LINK = "anon_inode:kvm-vm"  # not "anon_inode:kvm-vm-stats", a stats fd of the VM


def is_kvm_fd_link(link: str) -> bool:
    """True for /dev/kvm and the VM and vCPU anon inodes."""
    return link in ("/dev/kvm", VM_FD_LINK) or vcpu_id_of_fd_link(link) is not None


@dataclass(frozen=True, slots=True)
class VcpuMapping:
    """A vCPU's kvm_run mapping as /proc/PID/maps shows it."""

    start: int
    end: int
    vcpu: int


def vcpu_mappings(maps_text: str) -> list[VcpuMapping]:
    """kvm_run mappings (file offset 0) in /proc/PID/maps text. The dirty-ring mapping of the
    same fd (offset 0x40000) is not one of them."""
    found = []
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith("anon_inode:kvm-vcpu:"):
            continue
        vcpu = vcpu_id_of_fd_link(fields[5].strip())
        if vcpu is None or int(fields[2], 16) != 0:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        found.append(VcpuMapping(start, end, vcpu))
    return found


def proc_syscall(text: str) -> tuple[int, tuple[int, ...]] | None:
    """(syscall number, args) from /proc/PID/task/TID/syscall, or None when the thread is
    running (``running``) or not in a syscall (``-1 ...``)."""
    fields = text.split()
    if not fields or fields[0] in ("running", "-1"):
        return None
    try:
        return int(fields[0]), tuple(int(x, 16) for x in fields[1:7])
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class TraceField:
    """A field of a tracepoint's raw sample, as its tracefs ``format`` file declares it."""

    offset: int
    size: int
    signed: bool


_FORMAT_FIELD = re.compile(
    r"field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d)"
)


def tracepoint_format(text: str) -> tuple[int, dict[str, TraceField]]:
    """(id, {field name: TraceField}) from a tracepoint's tracefs ``format`` file; an array
    field (``u8 insn[15]``) by its name without the brackets."""
    event_id = -1
    fields: dict[str, TraceField] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("ID:"):
            event_id = int(line[3:])
            continue
        match = _FORMAT_FIELD.search(line)
        if match is None:
            continue
        name = match["decl"].split()[-1].split("[")[0]
        fields[name] = TraceField(int(match["offset"]), int(match["size"]), match["signed"] == "1")
    return event_id, fields
