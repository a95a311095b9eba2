"""Which vCPU an exit belongs to, when a session traces many processes and VMs.

Every record carries a 16-bit vCPU number. In a session with one VM it is KVM's vCPU id, as it
always was; a vCPU of any further VM (another process, or a second VM in the same process) gets
a number from :data:`OTHER_VMS_FROM` on. A VCPU record ties each number to its
:class:`VcpuKey`: the process, the VM and KVM's vCPU id. Pure bookkeeping, safe from any thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

OTHER_VMS_FROM = 0x8000  # vCPU ids stay below KVM_MAX_VCPU_IDS (4096 on x86)
NO_VM = -1  # the VM is not known (a recording made before VMs were told apart)


@dataclass(frozen=True, slots=True, order=True)
class VcpuKey:
    """A vCPU told apart from every other in a session."""

    pid: int  # the VMM process (0: not known)
    vm: int  # the VM's fd number in that process (NO_VM: not known)
    vcpu: int  # KVM's vCPU id

    def label(self) -> str:
        """``PID:VM:VCPU``, how reports and the TUI name a vCPU when there are several VMs."""
        vm = "?" if self.vm == NO_VM else str(self.vm)
        return f"{self.pid}:{vm}:{self.vcpu}"


class VcpuSlots:
    """Hands out the records' vCPU numbers: the first VM's vCPUs keep their ids."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[VcpuKey, int] = {}
        self._keys: dict[int, VcpuKey] = {}
        self._first_vm: tuple[int, int] | None = None
        self._next = OTHER_VMS_FROM

    def slot(self, key: VcpuKey) -> int:
        with self._lock:
            found = self._slots.get(key)
            if found is not None:
                return found
            vm = (key.pid, key.vm)
            if self._first_vm is None:
                self._first_vm = vm
            if vm == self._first_vm and key.vcpu < OTHER_VMS_FROM:
                slot = key.vcpu
            else:
                slot, self._next = self._next, self._next + 1
            self._slots[key] = slot
            self._keys[slot] = key
            return slot

    @property
    def first_pid(self) -> int:
        """The process of the first VM (0: no vCPU yet)."""
        return self._first_vm[0] if self._first_vm is not None else 0

    def key(self, slot: int) -> VcpuKey | None:
        with self._lock:
            return self._keys.get(slot)
