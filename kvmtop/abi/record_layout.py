"""kvmtop's packed 32-byte records: the recording's record layout (docs/recording-format.md),
declared once. The tracer's engines write them, the recording stores them verbatim, the
aggregate reads them in bulk; the C modules get the same kinds, flags and field offsets from the
header written at build time (:mod:`kvmtop.abi.c_header`). Also the flags an exit carries
(ExitEvent.flags), which the architecture's decoding sets. Declarations only: packing and
decoding are :mod:`kvmtop.model.records`' and :mod:`kvmtop.model.coalesced`'.
"""

from __future__ import annotations

import struct

# ExitEvent.flags
EXIT_WRITE = 0x01  # IO out, MMIO write, WRMSR, TPR write: the guest gave the VMM a value
EXIT_PRIVATE = 0x02  # MEMORY_FAULT on private (guest_memfd) memory
EXIT_CYCLE = 0x04  # one-stop tracing: entry_ns..exit_ns span the run and the VMM's handling

RECORD_SIZE = 32

KIND_EXIT, KIND_LONG, KIND_DATA, KIND_VCPU, KIND_COUNTERS, KIND_END = 1, 2, 3, 4, 5, 6
KIND_PROCESS, KIND_NAME = 7, 8
KIND_HELD = 9
KIND_RIP = 12
EXIT = struct.Struct("<BBHIqIIQ")  # kind, flags, vcpu, reason, t_exit, guest_ns, b, a
LONG = struct.Struct("<B7xQ16x")  # kind, guest_ns (when it does not fit 32 bits)
DATA = struct.Struct("<BB30s")  # kind, length, bytes
VCPU = struct.Struct("<BxHIqIiI4x")  # kind, vcpu, tid, t, pid, VM fd, vCPU id (version 2)
VCPU_HEAD = struct.Struct("<BxHIq16x")  # kind, vcpu, tid, t: the engine's, and version 1's
PROCESS = struct.Struct("<BBxxIqIi8x")  # kind, flags (P_ENDED...), pid, t, ppid, exit status
NAME = struct.Struct("<BB30s")  # kind, length, a piece of the argv (after its PROCESS record)
# a part of an exit (after its EXIT, LONG, DATA; version 3): the ptrace stops between the
# vCPU's previous exit and this exit's entry, and the time they held it: seen by the tracer
# (stop to the start of its resume) and not seen (the stop's and the wake-up's switches): its
# estimate, and the least and most it costs on average (docs/engine.md); recordings from before
# the two bounds hold zeros there (the least, 0; the most, 0: no bound)
HELD = struct.Struct("<BxHIQQQ")  # kind, stops, unseen_low_ns, seen_ns, unseen_ns, unseen_high_ns
UNSEEN_LOW_MAX = 0xFFFFFFFF  # unseen_low_ns saturates here (a lower least: the bound still holds)
# a part of an exit (after its HELD; version 4, with --rip): the guest's RIP at the exit, as KVM
# synced it into kvm_run, its linear address (rip, or cs.base + rip outside 64-bit code) and the
# CPL; flags R_SEGMENTS: the segment registers were synced too (linear address and CPL exact;
# else linear = rip and the CPL is not known)
RIP = struct.Struct("<BBBx4xQQ8x")  # kind, flags, cpl, rip, linear
R_SEGMENTS = 0x01
# kind, lost, stops, t, then (version 3 files may hold zeros) the events the kernel dropped on
# one CPU's ring since the last such record (the tracepoint engine), and that CPU
COUNTERS = struct.Struct("<B3xIQqIH2x")
END = struct.Struct("<BBHiqQ8x")  # kind, why, pad, exit status (-1: none), t, total exits
T_EXIT = struct.Struct("<q")  # an EXIT record's t_exit alone, at byte 8

# EXIT record flags
F_WRITE, F_PRIVATE, F_DATA, F_LONG, F_FAILED, F_CYCLE = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
SAME_BITS = F_WRITE | F_PRIVATE  # the same bits as ExitEvent.flags' EXIT_WRITE, EXIT_PRIVATE
assert SAME_BITS == EXIT_WRITE | EXIT_PRIVATE
GUEST_NS_MAX = 0xFFFFFFFE
DATA_CHUNK = 30

# PROCESS record flags
P_ENDED, P_EXITED = 0x01, 0x02  # the process has gone; ...and exited (the status is its own)
NAME_PIECES = 4  # at most 4 NAME records (120 bytes) of argv a process

for _s in (EXIT, LONG, DATA, HELD, RIP, VCPU, VCPU_HEAD, PROCESS, NAME, COUNTERS, END):
    assert _s.size == RECORD_SIZE

# bytes.translate table: the kinds an exit is made of (EXIT and its parts) become 0, others 1
EXIT_PART_KINDS = (KIND_EXIT, KIND_LONG, KIND_DATA, KIND_HELD, KIND_RIP)
EXIT_PARTS = bytes(0 if k in EXIT_PART_KINDS else 1 for k in range(256))

# COALESCED records (kind 10): writes KVM queued in the coalesced MMIO ring without an exit
KIND_COALESCED = 10
# kind, flags, vcpu, len, t (- start_ns), count, pad, address: the EXIT record's shape
COALESCED = struct.Struct("<BBHIqIIQ")
C_PIO = 0x01  # port IO (the entry's pio field), else MMIO
C_WRAP = 0x02  # the VMM drained entries appended since kvmtop's previous look: a whole turn
# of the ring (KVM_COALESCED_MMIO_MAX more entries) between the two looks cannot be ruled out
# (set on the first record of such a look)
C_UNREADABLE = 0x04  # this vCPU's ring cannot be read (no mapping of it): nothing is counted
C_KERNEL = 0x08  # seen by KVM's tracepoints: a write KVM handled in the kernel, with no exit
# (queued in the coalesced ring, or taken by an in-kernel device or an ioeventfd)
assert COALESCED.size == RECORD_SIZE

# HARDWARE records (kind 11, beside the COALESCED ones, in their shape): the guest's hardware
# exits of one vCPU by reason, from KVM's kvm_exit tracepoint (KVM's own and the VMM's)
KIND_HARDWARE = 11
# kind, isa (xlat_exit.ISA_*), vcpu, reason, t (- start_ns) of the last, count, pad, its guest RIP
HARDWARE = struct.Struct("<BBHIqIIQ")
assert HARDWARE.size == RECORD_SIZE

# The summaries' errno of a one-stop exit with reason 0 (F_CYCLE): KVM_RUN's return value was
# not seen (one-stop and user-notification tracing), so a failed run and KVM_EXIT_UNKNOWN look
# alike.
RUN_UNSEEN = 0xFFFFFFFF

# The fields of each record, in the order of its struct (pad bytes have no name): for the C
# header's offsets (RECORD_AT_FIELD), and for readers.
FIELDS: dict[str, tuple[struct.Struct, tuple[str, ...]]] = {
    "EXIT": (EXIT, ("kind", "flags", "vcpu", "reason", "t_exit", "guest_ns", "b", "a")),
    "LONG": (LONG, ("kind", "guest_ns")),
    "DATA": (DATA, ("kind", "length", "bytes")),
    "VCPU": (VCPU, ("kind", "vcpu", "tid", "t", "pid", "vm", "vcpu_id")),
    "HELD": (HELD, ("kind", "stops", "unseen_low_ns", "seen_ns", "unseen_ns", "unseen_high_ns")),
    "RIP": (RIP, ("kind", "flags", "cpl", "rip", "linear")),
    "COALESCED": (COALESCED, ("kind", "flags", "vcpu", "len", "t", "count", "pad", "address")),
    "HARDWARE": (HARDWARE, ("kind", "isa", "vcpu", "reason", "t", "count", "pad", "rip")),
}
