"""Finding a vCPU's ``struct kvm_run`` in a running VMM and reading it without writing.

The preferred way duplicates the VMM's vCPU fd (pidfd_getfd) and maps it read-only into kvmtop:
after that, reading an exit costs no syscall and a mapping the VMM moves cannot go stale. Where
that is refused, the VMM's own mapping is found in /proc/PID/maps and read with
process_vm_readv, and found again when it moves. Used only by the tracer thread.
"""

from __future__ import annotations

import mmap
import os
from types import ModuleType

from kvmtop.abi.arch import HOST
from kvmtop.abi.ptrace_abi import RemoteReader, pidfd_getfd
from kvmtop.decoder import VM_FD_LINK, vcpu_id_of_fd_link, vcpu_mappings
from kvmtop.host.procfs import fd_table


class RunPage:
    """One vCPU's kvm_run (and PIO data page), readable with :meth:`view`."""

    vcpu: int
    tid: int = 0  # the VMM thread last seen running this vCPU (0: not yet seen)
    open_since: int = 0  # one-stop tracing: entry time of the run not yet accounted for
    open_immediate: bool = False  # ...and that run was entered with immediate_exit set
    mapping: mmap.mmap | None = None  # our own mapping, for the engine
    ring: mmap.mmap | None = None  # ...and of the VM's coalesced MMIO ring (None: not mapped)
    address: int = 0  # else the VMM's mapping's address, read with process_vm_readv
    fd: int = -1  # kvmtop's duplicate of the vCPU fd (-1: none, read remotely)

    def view(self) -> memoryview | bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class MappedRunPage(RunPage):
    """Our own read-only mapping of a duplicated vCPU fd: a live view, zero syscalls a read."""

    def __init__(self, vcpu: int, dupfd: int, size: int) -> None:
        self.vcpu = vcpu
        self._fd = self.fd = dupfd
        self._map = mmap.mmap(dupfd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._view = memoryview(self._map)
        self.mapping = self._map
        self.ring = map_ring(dupfd)

    def view(self) -> memoryview:
        return self._view

    def close(self) -> None:
        self._view.release()
        self._map.close()
        if self.ring is not None:
            self.ring.close()
        os.close(self._fd)  # the duplicate keeps the VM's kernel objects alive until closed


class RemoteRunPage(RunPage):
    """The VMM's own mapping, read with process_vm_readv (one syscall a read)."""

    def __init__(self, pid: int, vcpu: int, size: int) -> None:
        self.vcpu = vcpu
        self._pid = pid
        self._reader = RemoteReader(pid, size)
        self._address = self.address = self._find()

    def _find(self) -> int:
        with open(f"/proc/{self._pid}/maps") as f:
            found = [m.start for m in vcpu_mappings(f.read()) if m.vcpu == self.vcpu]
        if len(found) != 1:
            raise OSError(
                f"no unique kvm_run mapping for vCPU {self.vcpu} in /proc/{self._pid}/maps"
            )
        return found[0]

    def view(self) -> memoryview:
        try:
            return self._reader.read(self._address)
        except OSError:
            self._address = self._find()  # the VMM moved or remapped it
            return self._reader.read(self._address)

    def close(self) -> None:
        pass


def map_ring(vcpu_fd: int, arch: ModuleType = HOST) -> mmap.mmap | None:
    """The VM's coalesced MMIO ring, read-only, through a vCPU fd (None: KVM has none)."""
    try:
        return mmap.mmap(vcpu_fd, arch.PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ,
                         offset=arch.COALESCED_MMIO_PAGE_OFFSET * arch.PAGE_SIZE)  # fmt: skip
    except OSError:
        return None


def vcpu_fds(pid: int) -> dict[int, int]:
    """{fd number: vCPU id} for every vCPU fd the process holds."""
    found = {}
    for fd, link in fd_table(pid).items():
        vcpu = vcpu_id_of_fd_link(link)
        if vcpu is not None:
            found[fd] = vcpu
    return found


def vm_of_vcpu_fd(table: dict[int, str], fd: int) -> int:
    """The fd of the VM that vCPU fd ``fd`` belongs to, from the process's fd table (-1: none).
    Nothing in /proc says it; VMMs make a VM and then its vCPUs, so fds come in that order and
    the VM is the nearest VM fd below the vCPU's."""
    below = [vm for vm, link in table.items() if link == VM_FD_LINK and vm < fd]
    return max(below, default=-1)


def open_run_page(pid: int, pidfd: int, fd: int, arch: ModuleType = HOST) -> RunPage:
    """The run page behind fd ``fd`` of process ``pid``; raises OSError if it is not a vCPU."""
    vcpu = vcpu_id_of_fd_link(os.readlink(f"/proc/{pid}/fd/{fd}"))
    if vcpu is None:
        raise OSError(f"fd {fd} of pid {pid} is not a KVM vCPU")
    try:
        dupfd = pidfd_getfd(pidfd, fd)
    except OSError:
        return RemoteRunPage(pid, vcpu, arch.RUN_MAP_SIZE)
    try:
        return MappedRunPage(vcpu, dupfd, arch.RUN_MAP_SIZE)
    except OSError:
        os.close(dupfd)
        return RemoteRunPage(pid, vcpu, arch.RUN_MAP_SIZE)
