"""seccomp's user notification ABI, as the listener uses it (include/uapi/linux/seccomp.h).

The filter a launched command runs under is built by the architecture
(:func:`kvmtop.abi.arch.x86_64.seccomp_ioctls`), since it compares the syscall ABI and number.
"""

from __future__ import annotations

import struct

NOTIF = struct.Struct(
    "<QIIiIQ6Q"
)  # struct seccomp_notif (80 bytes): id, pid, flags, nr, arch, ip, args
NOTIF_RESP = struct.Struct("<QqiI")  # struct seccomp_notif_resp (24): id, val, error, flags
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # SECCOMP_IOWR(0, struct seccomp_notif)
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # SECCOMP_IOWR(1, struct seccomp_notif_resp)
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104  # SECCOMP_IOW(4, __u64), Linux 6.6+
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1
