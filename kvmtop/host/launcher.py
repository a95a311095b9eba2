"""Run by kvmtop as a fresh interpreter (``python -I -S launcher.py NOTIFY TRACE IGNORED CMD...``),
never imported: install a seccomp filter that hands kvmtop only the KVM ioctls it needs (if
asked), stop until kvmtop has seized us, then exec CMD. Standalone on purpose: it imports nothing
of kvmtop, and a fresh interpreter (unlike a forked copy of a threaded one) cannot deadlock.

NOTIFY and TRACE are filter programs in hex ("-": not wanted; both "-": no filter, and no
PR_SET_NO_NEW_PRIVS either). NOTIFY's KVM_RUN goes to a seccomp user-notification listener
(SECCOMP_FILTER_FLAG_NEW_LISTENER), which kvmtop takes from us with pidfd_getfd while we are
stopped (our copy is close-on-exec); TRACE's stops the tracer instead. We tell kvmtop on fd 3
which is in place ("notify FD", "trace") or why none is ("no seccomp: ..."); without one, kvmtop
traces CMD the ordinary way. IGNORED: the signals kvmtop was started with ignored ("2,15"; "-":
none), which CMD inherits ignored, as from a shell.
"""

import ctypes
import os
import signal
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38  # include/uapi/linux/prctl.h
SYS_SECCOMP = 317  # arch/x86/entry/syscalls/syscall_64.tbl
SECCOMP_SET_MODE_FILTER = 1  # include/uapi/linux/seccomp.h
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3


def install(libc: ctypes.CDLL, program: bytes, flags: int) -> int:
    """seccomp(SECCOMP_SET_MODE_FILTER, flags, program): the listener fd, 0, or -errno."""
    filters = ctypes.create_string_buffer(program, len(program))
    fprog = ctypes.create_string_buffer(
        struct.pack("<H6xQ", len(program) // 8, ctypes.addressof(filters))
    )
    result = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, ctypes.c_ulong(flags),
                          ctypes.c_void_p(ctypes.addressof(fprog)))  # fmt: skip
    return result if result >= 0 else -ctypes.get_errno()


SYS_RT_SIGACTION = 13  # arch/x86/entry/syscalls/syscall_64.tbl
# glibc's internal signals (SIGCANCEL, SIGSETXID): posix_spawn ignores them in the child, and an
# exec would keep that; glibc's own sigaction() refuses them, the raw syscall does not.
GLIBC_INTERNAL_SIGNALS = (32, 33)


def reset_internal_signals(libc: ctypes.CDLL) -> None:
    """SIG_DFL for glibc's internal signals, as in a process a shell starts."""
    act = ctypes.create_string_buffer(32)  # struct kernel_sigaction: handler 0 = SIG_DFL
    for sig in GLIBC_INTERNAL_SIGNALS:
        libc.syscall(SYS_RT_SIGACTION, sig, ctypes.c_void_p(ctypes.addressof(act)), None, 8)


def install_best(notify: str, trace: str) -> str:
    if notify == trace == "-":
        return "no seccomp: not asked for"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong)  # fmt: skip
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"no seccomp: PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}"
    why = ""
    if notify != "-":
        fd = install(libc, bytes.fromhex(notify), SECCOMP_FILTER_FLAG_NEW_LISTENER)
        if fd > 0:
            return f"notify {fd}"
        why = f" (user notification: {os.strerror(-fd)})"
    if trace != "-":
        result = install(libc, bytes.fromhex(trace), 0)
        if result == 0:
            return "trace" + why
        why = os.strerror(-result)
    return f"no seccomp: {why.strip(' ()') or 'not asked for'}"


def main() -> None:
    notify, trace, ignored, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    os.write(3, install_best(notify, trace).encode())
    os.close(3)
    os.kill(os.getpid(), signal.SIGSTOP)  # kvmtop seizes us, then sends SIGCONT
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; CMD must not
        signal.signal(sig, signal.SIG_DFL)
    for number in ignored.split(",") if ignored != "-" else ():
        signal.signal(int(number), signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    reset_internal_signals(libc)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"kvmtop: cannot execute {argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127)


main()
