"""Run by kvmtop as a fresh interpreter (``python -I launcher.py HEXBPF CMD...``), never
imported: install a seccomp filter that stops only the KVM ioctls kvmtop needs, stop until kvmtop
has seized us, then exec CMD. Standalone on purpose: it imports nothing of kvmtop, and a fresh
interpreter (unlike a forked copy of a threaded one) cannot deadlock.

It tells kvmtop on fd 3 whether the filter is in place ("seccomp") or why not ("no seccomp: ...");
without it, kvmtop traces CMD the ordinary way.
"""

import ctypes
import os
import signal
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38  # include/uapi/linux/prctl.h
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2  # include/uapi/linux/seccomp.h


def install(program: bytes) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = (
        ctypes.c_int,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
    )
    filters = ctypes.create_string_buffer(program, len(program))
    fprog = ctypes.create_string_buffer(
        struct.pack("<H6xQ", len(program) // 8, ctypes.addressof(filters))
    )
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        return f"no seccomp: PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}"
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        return f"no seccomp: {os.strerror(ctypes.get_errno())}"
    return "seccomp"


def main() -> None:
    program, argv = bytes.fromhex(sys.argv[1]), sys.argv[2:]
    os.write(3, install(program).encode())
    os.close(3)
    os.kill(os.getpid(), signal.SIGSTOP)  # kvmtop seizes us, then sends SIGCONT
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; CMD must not
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"kvmtop: cannot execute {argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127)


main()
