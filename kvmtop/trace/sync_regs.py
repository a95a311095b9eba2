"""The one field kvmtop writes into a VMM, and only with ``--rip``: a vCPU's
``kvm_run.kvm_valid_regs``, which asks KVM to copy the guest's registers into ``kvm_run`` at
every return from KVM_RUN (``store_regs()`` in arch/x86/kvm/x86.c), so that each exit carries
the guest's RIP with no extra stop.

The rules, each a danger avoided:

- a bit KVM does not allow for the VM makes the next KVM_RUN fail with EINVAL (a protected
  guest allows none): only the bits the VMM's own ``KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)`` on
  its VM fd answered (:func:`bits_to_set`; kvmtop's own process gets EIO from that ioctl);
- ``kvm_dirty_regs`` is never written: KVM would load the page's registers into the vCPU;
- a VMM that uses the field itself (non-zero when kvmtop comes) is left alone;
- only kvmtop's own writable mapping of the vCPU fd it duplicated is written (a store, no
  syscall): never memory of the VMM's address space, so a VMM that has moved or unmapped its
  mapping cannot be hurt; a vCPU kvmtop can only read remotely gets no RIP;
- the field goes back to 0 when the vCPU is let go (detach, quit, Ctrl-C, the VMM's exec or
  exit), unless something else has changed it since.

No ptrace here; the tracer thread decides when (:mod:`kvmtop.tracer_thread`).
"""

from __future__ import annotations

import mmap
import os
import struct

from kvmtop.abi.arch import x86_64 as arch

_U64 = struct.Struct("<Q")
WANTED = arch.KVM_SYNC_X86_REGS | arch.KVM_SYNC_X86_SREGS  # RIP, and cs for its linear address
NOT_ASKED = -(1 << 31)  # a VMM kvmtop did not ask (a seccomp filter of its own): nothing set


def bits_to_set(allowed: int) -> int:
    """The kvm_valid_regs bits to set for a VM whose VMM answered ``allowed`` to
    KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS): none unless the registers are allowed; the segment
    registers too where they are (for the linear address and the CPL)."""
    if allowed < 0 or not allowed & arch.KVM_SYNC_X86_REGS:
        return 0
    return allowed & WANTED


class ValidRegs:
    """kvm_valid_regs of one vCPU, through kvmtop's own writable mapping of its first page."""

    def __init__(self, dupfd: int) -> None:
        self._map = mmap.mmap(dupfd, arch.PAGE_SIZE, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        self.written = 0  # the bits kvmtop set (0: it has set none, or restored them)

    def read(self) -> int:
        return int(_U64.unpack_from(self._map, arch.RUN_VALID_REGS)[0])

    def set(self, bits: int) -> str | None:
        """Set ``bits`` where the field is 0; else leave it, and say why (None: set)."""
        assert bits and not bits & ~WANTED
        found = self.read()
        if found:
            return f"its VMM uses kvm_valid_regs itself ({found:#x}): left alone"
        _U64.pack_into(self._map, arch.RUN_VALID_REGS, bits)
        self.written = bits
        return None

    def restore(self) -> None:
        """Back to 0, if the field still holds what kvmtop set."""
        if self.written and self.read() == self.written:
            _U64.pack_into(self._map, arch.RUN_VALID_REGS, 0)
        self.written = 0

    def close(self) -> None:
        self.restore()
        self._map.close()


def enable(fd: int, answer: int) -> ValidRegs | str | None:
    """kvm_valid_regs of the vCPU whose fd kvmtop duplicated as ``fd`` (-1: it has none, and can
    only read the VMM's memory) set to what its VM's answer to KVM_CAP_SYNC_REGS allows, where
    that is safe: the field, to restore at the end; else why not, for the user (None: the VMM
    was not asked, which is said once for it)."""
    if answer == NOT_ASKED:
        return None
    bits = bits_to_set(answer)
    if not bits:
        why = f"failed: {os.strerror(-answer)}" if answer < 0 else f"= {answer:#x}"
        return ("KVM allows this VM no synced registers "
                f"(KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS) {why})")  # fmt: skip
    if fd < 0:
        return "its kvm_run can only be read in the VMM's memory, which kvmtop never writes"
    try:
        valid_regs = ValidRegs(fd)
    except OSError as exc:
        return f"its kvm_run cannot be mapped writable ({exc.strerror})"
    refused = valid_regs.set(bits)
    if refused is not None:
        valid_regs.close()
        return refused
    return valid_regs
