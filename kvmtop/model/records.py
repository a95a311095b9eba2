"""The packed 32-byte records exits travel in: the recording's record layout
(docs/recording-format.md), and packing and decoding them.

An :class:`~kvmtop.model.messages.ExitBatch` carries its exits as these records, the tracer produces
them, the recording writes them verbatim and the aggregate reads them in bulk; an ExitEvent is
made from them only where one exit at a time is wanted (export, the recent-exits pane). Pure:
bytes in, values out; no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from kvmtop.abi.record_layout import (
    DATA,
    DATA_CHUNK,
    EXIT,
    EXIT_CYCLE,
    F_CYCLE,
    F_DATA,
    F_FAILED,
    F_LONG,
    GUEST_NS_MAX,
    HELD,
    KIND_DATA,
    KIND_EXIT,
    KIND_HELD,
    KIND_LONG,
    KIND_NAME,
    KIND_PROCESS,
    KIND_RIP,
    KIND_VCPU,
    LONG,
    NAME,
    NAME_PIECES,
    P_ENDED,
    P_EXITED,
    PROCESS,
    R_SEGMENTS,
    RECORD_SIZE,
    RIP,
    SAME_BITS,
    T_EXIT,
    UNSEEN_LOW_MAX,
    VCPU,
)
from kvmtop.model.events import ExitEvent, GuestRip, ProcessSeen, VcpuSeen
from kvmtop.model.vcpu_keys import VcpuKey

NOT_HELD = (0, 0, 0, 0, 0)  # stops, seen, unseen, unseen_low, unseen_high


def pack_exit(out: bytearray, event: ExitEvent, base_ns: int) -> None:
    """Append ``event`` as an EXIT record, with its LONG and DATA records, times since
    ``base_ns``."""
    guest = event.exit_ns - event.entry_ns
    flags = (event.flags & SAME_BITS) | (F_CYCLE if event.flags & EXIT_CYCLE else 0)
    b = event.b
    if event.errno:
        flags |= F_FAILED
        b = event.errno
    if event.data:
        flags |= F_DATA
    if not 0 <= guest <= GUEST_NS_MAX:
        flags |= F_LONG
    out += EXIT.pack(
        KIND_EXIT, flags, event.vcpu, event.reason, event.exit_ns - base_ns,
        guest if not flags & F_LONG else 0xFFFFFFFF, b, event.a,
    )  # fmt: skip
    if flags & F_LONG:
        out += LONG.pack(KIND_LONG, max(0, guest))
    data = event.data
    for i in range(0, len(data), DATA_CHUNK):
        chunk = data[i : i + DATA_CHUNK]
        out += DATA.pack(KIND_DATA, len(chunk), chunk)
    if event.held_stops:
        out += HELD.pack(KIND_HELD, min(event.held_stops, 0xFFFF),
                         min(event.held_unseen_low_ns, UNSEEN_LOW_MAX), event.held_seen_ns,
                         event.held_unseen_ns, event.held_unseen_high_ns)  # fmt: skip
    rip = event.rip
    if rip is not None:
        known = rip.cpl >= 0
        out += RIP.pack(KIND_RIP, R_SEGMENTS if known else 0, max(rip.cpl, 0), rip.rip, rip.linear)


def unpack_rip(record: bytes | memoryview) -> GuestRip:
    """A RIP record (version 4)."""
    _kind, flags, cpl, rip, linear = RIP.unpack(record)
    return GuestRip(rip, linear, cpl if flags & R_SEGMENTS else -1)


def pack_events(events: Iterable[ExitEvent], base_ns: int) -> bytes:
    out = bytearray()
    for event in events:
        pack_exit(out, event, base_ns)
    return bytes(out)


def _event(
    fields: tuple[int, ...], guest: int, data: bytes, held: tuple[int, ...], base_ns: int,
    rip: GuestRip | None,
) -> ExitEvent:  # fmt: skip
    _kind, flags, vcpu, reason, t_exit, _guest, b, a = fields
    exit_ns = base_ns + t_exit
    cycle = EXIT_CYCLE if flags & F_CYCLE else 0
    if flags & F_FAILED:  # b holds the errno; the details of a failed run mean nothing
        return ExitEvent(vcpu, reason, b, exit_ns - guest, exit_ns, 0, 0, cycle, b"",
                         *held, rip=rip)  # fmt: skip
    return ExitEvent(vcpu, reason, 0, exit_ns - guest, exit_ns, a, b,
                     (flags & SAME_BITS) | cycle, data, *held, rip=rip)  # fmt: skip


def iter_events(records: bytes | bytearray | memoryview, base_ns: int) -> Iterator[ExitEvent]:
    """The exits in ``records`` (EXIT records, each with the LONG, DATA, HELD, RIP records after
    it), as ExitEvents with absolute times. Parts before the first EXIT belong to no exit and
    are passed over."""
    pending: tuple[int, ...] | None = None
    guest = 0
    data = b""
    held = NOT_HELD
    rip: GuestRip | None = None
    for fields in EXIT.iter_unpack(records):
        kind = fields[0]
        if kind == KIND_EXIT:
            if pending is not None:
                yield _event(pending, guest, data, held, base_ns, rip)
            pending, guest, data, held, rip = fields, fields[5], b"", NOT_HELD, None
        elif pending is None:
            continue
        elif kind == KIND_LONG:
            guest = LONG.unpack(EXIT.pack(*fields))[1]
        elif kind == KIND_DATA:
            n, raw = DATA.unpack(EXIT.pack(*fields))[1:]
            data += raw[:n]
        elif kind == KIND_HELD:
            _k, stops, low, seen, unseen, high = HELD.unpack(EXIT.pack(*fields))
            held = (stops, seen, unseen, low, high)
        elif kind == KIND_RIP:
            rip = unpack_rip(EXIT.pack(*fields))
    if pending is not None:
        yield _event(pending, guest, data, held, base_ns, rip)


def pack_vcpu(seen: VcpuSeen, t_rel: int) -> bytes:
    key = seen.key
    pid, vm, vcpu = (key.pid, key.vm, key.vcpu) if key is not None else (0, 0, 0)
    return VCPU.pack(KIND_VCPU, seen.vcpu, seen.tid, t_rel, pid, vm, vcpu)


def unpack_vcpu(record: bytes | memoryview, base_ns: int) -> VcpuSeen:
    """A VCPU record; one from version 1 (no pid) has no key."""
    _kind, number, tid, t, pid, vm, vcpu = VCPU.unpack(record)
    return VcpuSeen(number, tid, base_ns + t, VcpuKey(pid, vm, vcpu) if pid else None)


def pack_process(proc: ProcessSeen, t_rel: int) -> bytes:
    """A PROCESS record and the NAME records of its argv (NUL-separated, cut at 120 bytes)."""
    flags = (P_ENDED if proc.ended else 0) | (P_EXITED if proc.exit_status is not None else 0)
    status = proc.exit_status if proc.exit_status is not None else -1
    out = bytearray(PROCESS.pack(KIND_PROCESS, flags, proc.pid, t_rel, proc.ppid, status))
    if not proc.ended:
        name = "\0".join(proc.argv).encode(errors="replace")[: NAME_PIECES * DATA_CHUNK]
        for i in range(0, len(name), DATA_CHUNK):
            piece = name[i : i + DATA_CHUNK]
            out += NAME.pack(KIND_NAME, len(piece), piece)
    return bytes(out)


def unpack_process(record: bytes | memoryview, names: list[bytes], base_ns: int) -> ProcessSeen:
    """A PROCESS record and the payloads of the NAME records after it."""
    _kind, flags, pid, t, ppid, status = PROCESS.unpack(record)
    argv = tuple(b"".join(names).decode(errors="replace").split("\0")) if names else ()
    exit_status = status if flags & P_EXITED else None
    return ProcessSeen(pid, ppid, argv, base_ns + t, bool(flags & P_ENDED), exit_status)


def name_piece(record: bytes | memoryview) -> bytes:
    _kind, n, raw = NAME.unpack(record)
    return raw[:n]


def kinds(records: bytes | bytearray | memoryview) -> bytes:
    """Byte 0 of every record: one byte per record."""
    return bytes(memoryview(records)[0::RECORD_SIZE])


def exit_count(records: bytes | bytearray | memoryview) -> int:
    return kinds(records).count(KIND_EXIT)


def first_t_exit(records: bytes | bytearray | memoryview) -> int | None:
    """The t_exit of the first EXIT record (None: there is none)."""
    i = kinds(records).find(KIND_EXIT)
    return None if i < 0 else T_EXIT.unpack_from(records, i * RECORD_SIZE + 8)[0]


def last_t_exit(records: bytes | bytearray | memoryview) -> int | None:
    """The t_exit of the last EXIT record (None: there is none)."""
    i = kinds(records).rfind(KIND_EXIT)
    return None if i < 0 else T_EXIT.unpack_from(records, i * RECORD_SIZE + 8)[0]


def cut_after(records: bytes | bytearray | memoryview, t_rel: int) -> int:
    """The byte offset of the first EXIT record with t_exit > ``t_rel`` (the records' length
    if none), for records in time order: the records before it are the exits up to ``t_rel``,
    each with its LONG and DATA records."""
    kind_of = kinds(records)

    def t_at(i: int) -> int:  # the t_exit of the exit record i belongs to
        start = kind_of.rfind(KIND_EXIT, 0, i + 1)
        return -(2**63) if start < 0 else T_EXIT.unpack_from(records, start * RECORD_SIZE + 8)[0]

    return bisect.bisect_right(range(len(kind_of)), t_rel, key=t_at) * RECORD_SIZE


def rebase(records: bytes, from_ns: int, to_ns: int) -> bytes:
    """The same records with times relative to ``to_ns`` instead of ``from_ns``."""
    if from_ns == to_ns:
        return records
    out = bytearray(records)
    shift = from_ns - to_ns
    kind_of = kinds(records)
    i = kind_of.find(KIND_EXIT)
    while i >= 0:
        offset = i * RECORD_SIZE + 8
        T_EXIT.pack_into(out, offset, T_EXIT.unpack_from(out, offset)[0] + shift)
        i = kind_of.find(KIND_EXIT, i + 1)
    return bytes(out)
