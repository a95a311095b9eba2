"""The C header the native modules include (``kvmtop_abi.h``), written from the Python
declarations at build time (setup.py): KVM's exit numbers (:class:`kvmtop.xlat_exit.ExitReason`),
its ioctls, ``struct kvm_run``'s offsets and the coalesced ring (:mod:`kvmtop.abi.kvm`,
:mod:`kvmtop.abi.arch.x86_64`), and kvmtop's record layout (:mod:`kvmtop.abi.record_layout`):
kinds, flags, sizes and every field's offset. The C sources declare none of these themselves
(tests/test_abi.py checks), so the two sides cannot drift apart.

    python -m kvmtop.abi.c_header          prints the header
"""

from __future__ import annotations

import re
import struct

from kvmtop.abi import kvm, record_layout
from kvmtop.abi.arch import x86_64
from kvmtop.xlat_exit import ExitReason

_CODE = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdspP])")


def field_offsets(layout: struct.Struct, names: tuple[str, ...]) -> dict[str, int]:
    """Each named field's byte offset in ``layout`` (pad bytes have no name; ``30s`` is one
    field, ``6Q`` six)."""
    order = layout.format[0] if layout.format[0] in "<>=!@" else ""
    offsets: list[int] = []
    done = ""
    for count, code in _CODE.findall(layout.format.lstrip("<>=!@")):
        n = int(count) if count else 1
        if code == "x":
            done += f"{count}x"
            continue
        for _field in range(1 if code in "sp" else n):
            offsets.append(struct.calcsize(order + done))
            done += f"{count}{code}" if code in "sp" else code
    if len(offsets) != len(names):
        raise ValueError(f"{layout.format}: {len(offsets)} fields, {len(names)} names")
    return dict(zip(names, offsets, strict=True))


def definitions() -> list[tuple[str, int, str]]:
    """(name, value, where it comes from) of every #define in the header."""
    out: list[tuple[str, int, str]] = []

    def add(source: str, **values: int) -> None:
        out.extend((name, int(value), source) for name, value in values.items())

    kvm_h = "include/uapi/linux/kvm.h"
    add(kvm_h, **{f"KVM_EXIT_{reason.name}": reason for reason in ExitReason})
    add(kvm_h, KVMIO=kvm.KVMIO, KVM_RUN=kvm.KVM_RUN, KVM_CREATE_VCPU=kvm.KVM_CREATE_VCPU)
    add(kvm_h, KVM_MEMORY_EXIT_FLAG_PRIVATE=kvm.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    add("struct kvm_run (kvmtop/abi/kvm.py)", RUN_IMMEDIATE_EXIT=kvm.RUN_IMMEDIATE_EXIT,
        RUN_EXIT_REASON=kvm.RUN_EXIT_REASON, RUN_UNION=kvm.RUN_UNION)  # fmt: skip
    add(
        "kvm_run and the PIO data page (kvmtop/abi/arch/x86_64.py)",
        RUN_MAP_SIZE=x86_64.RUN_MAP_SIZE,
    )
    add(
        "the coalesced MMIO ring, one page (kvmtop/abi/kvm.py)",
        RING_PAGE=x86_64.PAGE_SIZE,
        RING_HEAD=kvm.COALESCED_RING_HEAD.size,
        RING_ENTRY=kvm.COALESCED_ENTRY_SIZE,
        RING_MAX=kvm.coalesced_mmio_max(x86_64.PAGE_SIZE),
    )
    add(
        "the guest's registers KVM syncs into kvm_run (kvmtop/abi/arch/x86_64.py)",
        RUN_VALID_REGS=x86_64.RUN_VALID_REGS, KVM_SYNC_X86_REGS=x86_64.KVM_SYNC_X86_REGS,
        KVM_SYNC_X86_SREGS=x86_64.KVM_SYNC_X86_SREGS, SYNC_REGS=x86_64.SYNC_REGS,
        SYNC_REGS_SIZE=x86_64.SYNC_REGS_SIZE, SYNC_RIP=x86_64.SYNC_RIP,
        SYNC_CS=x86_64.SYNC_CS, SYNC_CS_L=x86_64.SYNC_CS_L, SYNC_SS_DPL=x86_64.SYNC_SS_DPL,
        SYNC_CR0=x86_64.SYNC_CR0, X86_EFLAGS_VM=x86_64.X86_EFLAGS_VM, X86_CR0_PE=x86_64.X86_CR0_PE,
    )  # fmt: skip
    entry = field_offsets(kvm.COALESCED_ENTRY, ("phys_addr", "len", "pio"))
    add("struct kvm_coalesced_mmio", **{f"RING_ENTRY_AT_{k.upper()}": v for k, v in entry.items()})
    r = record_layout
    where = "kvmtop's records (kvmtop/abi/record_layout.py, docs/recording-format.md)"
    add(where, RECORD_SIZE=r.RECORD_SIZE, KIND_EXIT=r.KIND_EXIT, KIND_LONG=r.KIND_LONG,
        KIND_DATA=r.KIND_DATA, KIND_VCPU=r.KIND_VCPU, KIND_HELD=r.KIND_HELD,
        KIND_COALESCED=r.KIND_COALESCED, KIND_HARDWARE=r.KIND_HARDWARE, F_WRITE=r.F_WRITE,
        F_PRIVATE=r.F_PRIVATE, F_DATA=r.F_DATA, F_LONG=r.F_LONG, F_FAILED=r.F_FAILED, F_CYCLE=r.F_CYCLE,
        KIND_RIP=r.KIND_RIP, R_SEGMENTS=r.R_SEGMENTS,
        C_PIO=r.C_PIO, C_WRAP=r.C_WRAP, C_UNREADABLE=r.C_UNREADABLE, C_KERNEL=r.C_KERNEL,
        GUEST_NS_MAX=r.GUEST_NS_MAX, DATA_CHUNK=r.DATA_CHUNK, UNSEEN_LOW_MAX=r.UNSEEN_LOW_MAX,
        RUN_UNSEEN=r.RUN_UNSEEN)  # fmt: skip
    for record, (layout, names) in r.FIELDS.items():
        offsets = field_offsets(layout, names)
        add(where, **{f"{record}_AT_{k.upper()}": v for k, v in offsets.items() if k != "kind"})
    return out


def render() -> str:
    lines = [
        "/* kvmtop_abi.h: written by setup.py from kvmtop/abi/c_header.py at build time; do not",
        "   edit. The Python declarations are the reference: kvmtop/abi/, kvmtop/xlat_exit.py. */",
        "#ifndef KVMTOP_ABI_H",
        "#define KVMTOP_ABI_H",
    ]
    source = ""
    for name, value, where in definitions():
        if where != source:
            lines += ["", f"/* {where} */"]
            source = where
        text = f"{value:#x}" if value > 0xFF else str(value)
        suffix = "u" if value > 0x7FFFFFFF else ""
        lines.append(f"#define {name} {text}{suffix}")
    lines += ["", "#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
