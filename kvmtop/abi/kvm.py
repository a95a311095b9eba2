"""KVM's ABI that is the same on every architecture: ioctl request numbers, ``struct kvm_run``'s
head, and the coalesced MMIO ring. Values are from include/uapi/linux/kvm.h (see also shared
kvm-abi.md); the exit union's layout is the architecture's (:mod:`kvmtop.abi.arch`), the exit
numbers are :class:`kvmtop.xlat_exit.ExitReason`. The C modules get these numbers from the
header written at build time (:mod:`kvmtop.abi.c_header`).
"""

from __future__ import annotations

import struct

# ioctl request numbers: _IO(KVMIO, nr) carries no size, so they are the same on every
# architecture.
KVMIO = 0xAE  # the ioctl type byte of every KVM ioctl
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60  # in-kernel PIC, IOAPIC and LAPICs: vCPUs but 0 wait for a SIPI
KVM_RUN = 0xAE80
KVM_GET_STATS_FD = 0xAECE  # a VM or vCPU fd: its binary stats fd (Linux 5.14+)

# struct kvm_run: the head before the exit union is the same on every architecture
KVM_RUN_SIZE = 2352  # sizeof(struct kvm_run) on x86_64 and aarch64
RUN_IMMEDIATE_EXIT = 1  # offsetof(struct kvm_run, immediate_exit)
RUN_EXIT_REASON = 8  # offsetof(struct kvm_run, exit_reason)
RUN_UNION = 32  # offsetof(struct kvm_run, the exit union)
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3  # kvm_run.memory_fault.flags

# struct kvm_coalesced_mmio_ring {__u32 first, last; entries[]}, one page mapped by every vCPU
# fd at KVM_COALESCED_MMIO_PAGE_OFFSET; struct kvm_coalesced_mmio {__u64 phys_addr; __u32 len;
# __u32 pio (was pad); __u8 data[8]}
COALESCED_RING_HEAD = struct.Struct("<II")  # first, last
COALESCED_ENTRY = struct.Struct("<QII")  # phys_addr, len, pio (data[8] follows)
COALESCED_ENTRY_SIZE = 24


def coalesced_mmio_max(page_size: int) -> int:
    """KVM_COALESCED_MMIO_MAX: the ring's entries in one page (170 in 4 KiB)."""
    return (page_size - COALESCED_RING_HEAD.size) // COALESCED_ENTRY_SIZE
