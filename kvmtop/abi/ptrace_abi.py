"""The ptrace and process syscalls kvmtop needs, and the constants python-ptrace 0.9.9 lacks.

python-ptrace gives the raw ``ptrace()`` call and its error type; its high-level debugger is not
used (it attaches with SIGSTOP and builds objects per syscall). Values are from
include/uapi/linux/ptrace.h and include/uapi/linux/wait.h; syscall
numbers 424 and up are the same on every architecture.
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import os
import struct

from ptrace.binding.func import PTRACE_CONT as PTRACE_CONT
from ptrace.binding.func import PTRACE_DETACH as PTRACE_DETACH
from ptrace.binding.func import PTRACE_O_TRACECLONE as PTRACE_O_TRACECLONE
from ptrace.binding.func import PTRACE_O_TRACEEXEC as PTRACE_O_TRACEEXEC
from ptrace.binding.func import PTRACE_O_TRACESYSGOOD as PTRACE_O_TRACESYSGOOD
from ptrace.binding.func import PTRACE_SYSCALL as PTRACE_SYSCALL
from ptrace.binding.func import ptrace as ptrace
from ptrace.binding.func import ptrace_geteventmsg as ptrace_geteventmsg
from ptrace.binding.func import ptrace_getregs as ptrace_getregs

# Register writes: for kvmtop.trace.inject alone (KVM_GET_STATS_FD on the user's request).
from ptrace.binding.func import ptrace_setregs as ptrace_setregs
from ptrace.error import PtraceError as PtraceError

# Missing from python-ptrace 0.9.9 (include/uapi/linux/ptrace.h).
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_O_TRACESECCOMP = 0x00000080
PTRACE_O_EXITKILL = 0x00100000
PTRACE_O_TRACEFORK = 0x00000002
PTRACE_O_TRACEVFORK = 0x00000004
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

SYSCALL_STOP = 5 | 0x80  # a syscall stop's signal with PTRACE_O_TRACESYSGOOD: SIGTRAP | 0x80

PTRACE_SYSCALL_INFO_NONE = 0
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2

# include/uapi/linux/wait.h
WALL = 0x40000000  # __WALL: threads and clones too
WNOTHREAD = 0x20000000  # __WNOTHREAD: only children/tracees of the calling thread

SYS_PIDFD_GETFD = 438

# struct ptrace_syscall_info: u8 op, u8 pad[3], u32 arch, u64 ip, u64 sp, then a union:
# entry {u64 nr; u64 args[6]} | exit {s64 rval; u8 is_error} (include/uapi/linux/ptrace.h).
SYSCALL_INFO_SIZE = 88
SYSCALL_INFO_HEAD = struct.Struct("<B3xI16x")  # op, arch
SYSCALL_INFO_ENTRY = struct.Struct("<24xQQQ")  # nr, args[0], args[1]
SYSCALL_INFO_EXIT = struct.Struct("<24xq")  # rval

_libc = ctypes.CDLL(None, use_errno=True)  # our own libc: find_library("c") runs ldconfig, ~5 ms
_libc.syscall.restype = ctypes.c_long


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = (
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A duplicate of another process's fd (close-on-exec). Needs ptrace rights over it."""
    result = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


class RemoteReader:
    """process_vm_readv into one reusable buffer: a read of another process's memory that
    never writes to it (used when a vCPU fd cannot be duplicated)."""

    def __init__(self, pid: int, size: int) -> None:
        self.pid = pid
        self.buffer = ctypes.create_string_buffer(size)
        self._local = _IoVec(ctypes.addressof(self.buffer), size)
        self._remote = _IoVec(0, size)

    def read(self, address: int) -> memoryview:
        self._remote.base = address
        got = _libc.process_vm_readv(
            self.pid, ctypes.byref(self._local), 1, ctypes.byref(self._remote), 1, 0
        )
        if got != self._local.len:
            err = ctypes.get_errno() if got < 0 else 0
            raise OSError(err, os.strerror(err) if err else "short read")
        return memoryview(self.buffer).cast("B")


class SyscallInfo:
    """PTRACE_GET_SYSCALL_INFO into one reusable buffer (one syscall per stop, no allocation
    beyond the unpacked ints). Architecture-neutral: no register layout needed."""

    def __init__(self) -> None:
        self.buffer = ctypes.create_string_buffer(SYSCALL_INFO_SIZE)
        self.address = ctypes.addressof(self.buffer)

    def fetch(self, tid: int) -> memoryview:
        ptrace(PTRACE_GET_SYSCALL_INFO, tid, SYSCALL_INFO_SIZE, self.address)
        return memoryview(self.buffer).cast("B")


def ptrace_unless_gone(request: int, tid: int, data: int = 0) -> None:
    """A ptrace request on a stopped tracee that may have been killed meanwhile (SIGKILL and
    exit_group need no tracer): then there is nothing to do, its exit status follows."""
    try:
        ptrace(request, tid, 0, data)
    except PtraceError as exc:
        if exc.errno != errno_module.ESRCH:
            raise
