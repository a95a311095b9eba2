"""Architecture-specific facts, behind one small interface.

Each architecture module defines:
  NAME, AUDIT_ARCH, SYS_IOCTL           -- syscall ABI (PTRACE_GET_SYSCALL_INFO reports AUDIT_ARCH)
  PIO_PAGE_OFFSET, COALESCED_MMIO_PAGE_OFFSET, RUN_MAP_SIZE
  decode_union(reason, run, with_data) -> (a, b, flags, data)   -- the kvm_run exit union
  PORT_NAMES                            -- well-known IO ports (empty where there is no port IO)
Adding aarch64 is one new file and one line in ``_MODULES``.
"""

from __future__ import annotations

import platform
from types import ModuleType

from kvmtop.abi.arch import x86_64

_MODULES: dict[str, ModuleType] = {"x86_64": x86_64, "amd64": x86_64}


def for_machine(machine: str | None = None) -> ModuleType:
    """The module for ``machine`` (default: this host). Unknown machines fall back to x86_64's
    generic header decoding is identical; only the union layout would be wrong."""
    name = (machine or platform.machine()).lower()
    return _MODULES.get(name, x86_64)


HOST = for_machine()
