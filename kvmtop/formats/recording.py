"""The recording file: streaming, versioned, append-only, 32 bytes per exit (64 with HELD).

A header (magic, version, flags, JSON metadata) and then fixed 32-byte records, so a file cut
short anywhere reads back to its last whole record. The layout is documented in
docs/recording-format.md. Data values (IO/MMIO/MSR) can hold guest secrets: they are written
only when asked for, and every file is created readable by its owner only. Pure file I/O; never
touches a tracee.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import platform
import socket
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from kvmtop import __version__
from kvmtop.abi.record_layout import (
    COUNTERS,
    END,
    EXIT_PARTS,
    KIND_COALESCED,
    KIND_COUNTERS,
    KIND_END,
    KIND_EXIT,
    KIND_HARDWARE,
    KIND_NAME,
    KIND_PROCESS,
    KIND_VCPU,
    RECORD_SIZE,
)
from kvmtop.errors import OutputError, RecordingError
from kvmtop.model.coalesced import rebase_coalesced
from kvmtop.model.events import VcpuSeen
from kvmtop.model.messages import Attached, Detached, ExitBatch
from kvmtop.model.records import (
    kinds,
    last_t_exit,
    name_piece,
    pack_process,
    pack_vcpu,
    rebase,
    unpack_process,
    unpack_vcpu,
)

MAGIC = b"\x89KVMTOP\n"  # the high byte and newline catch text-mode and truncated transfers
# 2: VCPU records say the process and VM; PROCESS and NAME records; 3: HELD, COALESCED; 4: RIP
VERSION = 4
READS = (1, 2, 3, 4)
HEADER = struct.Struct("<8sHHI")  # magic, version, flags, metadata length
HEADER_DATA = 0x0001  # IO/MMIO data values are recorded
WHY_CODES = {"detached": 0, "exited": 1}


@dataclass(frozen=True, slots=True)
class RecordingMeta:
    pid: int
    argv: tuple[str, ...]
    launched: bool
    start_ns: int  # record times are relative to this monotonic ns
    start_wall: float  # the same instant as Unix time
    with_data: bool
    arch: str = platform.machine()
    hostname: str = ""
    kernel: str = ""
    kvmtop_version: str = __version__
    mode: str = ""  # how the exits were seen (tracing_mode); "" in recordings made before it
    rip: bool = False  # guest RIPs were asked for (--rip): exits carry RIP records where safe


def meta_for(attached: Attached, with_data: bool, rip: bool = False) -> RecordingMeta:
    lag = (time.monotonic_ns() - attached.t_ns) / 1e9
    return RecordingMeta(
        pid=attached.pid,
        argv=attached.argv,
        launched=attached.launched,
        start_ns=attached.t_ns,
        start_wall=time.time() - lag,
        with_data=with_data,
        rip=rip,
        hostname=socket.gethostname(),
        kernel=platform.release(),
        mode=attached.engine_note
        or tracing_mode(
            attached.launched, attached.one_stop, attached.notify, attached.filter_note
        ),  # fmt: skip
    )


def tracing_mode(launched: bool, one_stop: bool, notify: bool, filter_note: str) -> str:
    """How the exits were seen, for the summary and the report. ``filter_note``: why a cheaper
    way of stopping is not in place (for a launch, whose seccomp filter was asked for)."""
    if notify:
        return "no ptrace stop per exit (kvmtop's seccomp filter notifies its listener)"
    if one_stop:
        note = f"; no user notification: {filter_note}" if filter_note else ""
        return f"1 ptrace stop per exit (kvmtop's seccomp filter{note})"
    if launched and filter_note:
        return "2 ptrace stops per exit (the seccomp filter could not be installed)"
    if launched:
        return "2 ptrace stops per KVM_RUN and per syscall of a vCPU thread"
    return ("2 ptrace stops per KVM_RUN and per syscall of a vCPU thread (attached; started by "
            "kvmtop, `record -- CMD`, it would take none per exit, 1 with --no-notify)")  # fmt: skip


class RecordingWriter:
    """Appends batches to a new recording. Each batch is one write(), so a kill loses at most
    the batch in flight (the tracer sends one at least every 100 ms)."""

    def __init__(self, fd: int, path: str, meta: RecordingMeta) -> None:
        self._fd = fd
        self.path = path
        self.meta = meta
        self.total = 0

    @classmethod
    def create(
        cls, path: str, meta: RecordingMeta, with_data: bool, keep_old: bool = False
    ) -> RecordingWriter:
        """A new recording at ``path``; with ``keep_old`` an existing file becomes ``path.old``,
        unless it is a recording of no exits (which would push a good ``.old`` out)."""
        try:
            if keep_old and os.path.exists(path) and not _holds_no_exits(path):
                os.replace(path, path + ".old")
            fd = create_owner_only(path)
        except OSError as exc:
            raise RecordingError(f"cannot create recording {path}: {exc.strerror}") from None
        blob = json.dumps(asdict(meta)).encode()
        writer = cls(fd, path, meta)
        writer._write(
            HEADER.pack(MAGIC, VERSION, HEADER_DATA if with_data else 0, len(blob)) + blob
        )
        return writer

    def _write(self, data: bytes | bytearray) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise OutputError(f"cannot write recording {self.path}: {exc.strerror}") from None

    def _rel(self, ns: int) -> int:
        return ns - self.meta.start_ns

    def write_batch(self, batch: ExitBatch) -> None:
        """PROCESS records of processes begun, VCPU records, the batch's exit records as they
        are, PROCESS records of processes ended, then a COUNTERS record."""
        out = bytearray()
        for proc in batch.processes:
            if not proc.ended:
                out += pack_process(proc, self._rel(proc.t_ns))
        for seen in batch.vcpus:
            out += pack_vcpu(seen, self._rel(seen.t_ns))
        out += rebase(batch.records, batch.base_ns, self.meta.start_ns)
        out += rebase_coalesced(batch.coalesced, batch.base_ns - self.meta.start_ns)
        for proc in batch.processes:
            if proc.ended:
                out += pack_process(proc, self._rel(proc.t_ns))
        if batch.lost or batch.stops or batch.dropped:
            last = last_t_exit(batch.records)
            t = self._rel(batch.base_ns + last if last is not None else time.monotonic_ns())
            dropped = batch.dropped or ((0, 0),)
            for i, (cpu, n) in enumerate(dropped):  # the first also carries lost and stops
                out += COUNTERS.pack(KIND_COUNTERS, batch.lost if not i else 0,
                                     batch.stops if not i else 0, t, min(n, 0xFFFFFFFF), cpu)  # fmt: skip
        self.total += batch.exits
        if out:
            self._write(out)

    def write_detached(self, detached: Detached) -> None:
        status = -1 if detached.exit_status is None else detached.exit_status
        why = WHY_CODES.get(detached.why, 2)
        self._write(END.pack(KIND_END, why, 0, status, self._rel(detached.t_ns), self.total))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Recording:
    """A recording opened for reading. Iterate :meth:`batches`; afterwards ``complete``,
    ``torn_bytes`` and ``end`` say how the file ended."""

    def __init__(self, path: str, meta: RecordingMeta, body_offset: int) -> None:
        self.path = path
        self.meta = meta
        self._body = body_offset
        self.complete = False
        self.torn_bytes = 0
        self.end: Detached | None = None

    def end_marker_ns(self) -> int | None:
        """Without reading it through: when tracing ended (monotonic ns), if the file ends in a
        whole END record, as a finished recording does (:attr:`complete` says it for sure once
        :meth:`batches` has read it); else None."""
        try:
            body = os.path.getsize(self.path) - self._body
            if body < RECORD_SIZE or body % RECORD_SIZE:
                return None
            with open(self.path, "rb") as f:
                f.seek(self._body + body - RECORD_SIZE)
                rec = f.read(RECORD_SIZE)
        except OSError:
            return None
        if len(rec) < END.size or rec[0] != KIND_END:
            return None
        return self.meta.start_ns + END.unpack_from(rec)[4]

    def meta_dict(self) -> dict[str, object]:
        out = asdict(self.meta)
        out["argv"] = list(self.meta.argv)
        out["file"] = self.path
        out["complete"] = self.complete
        return out

    def batches(self, max_events: int = 4096) -> Iterator[ExitBatch]:
        """Every whole record, as batches of at most ``max_events`` exits whose records are
        the file's, passed through (``base_ns`` is the recording's ``start_ns``)."""
        start = self.meta.start_ns
        body = bytearray()  # the exit records of the batch being gathered
        exits = 0
        seen: list[VcpuSeen] = []
        procs: list[tuple[memoryview | bytes, list[bytes]]] = []  # PROCESS records, their NAMEs
        lost = stops = 0
        coalesced = bytearray()  # COALESCED records: writes that never exited
        dropped: dict[int, int] = {}  # CPU: events the kernel dropped

        def batch() -> ExitBatch:
            processes = tuple(unpack_process(rec, names, start) for rec, names in procs)
            return ExitBatch(bytes(body), start, tuple(seen), lost, stops, processes,
                             bytes(coalesced), tuple(dropped.items()))  # fmt: skip

        offset = self._body
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise RecordingError(f"cannot read recording {self.path}: {exc.strerror}") from None
        with f:
            f.seek(offset)
            carry = b""
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                data = carry + chunk
                whole = len(data) - len(data) % RECORD_SIZE
                carry = data[whole:]
                view = memoryview(data)[:whole]
                kind_of = kinds(view)
                parts = kind_of.translate(EXIT_PARTS)  # 0: a record of an exit
                i, n = 0, len(kind_of)
                while i < n:
                    kind = kind_of[i]
                    if parts[i] == 0:  # a run of exit records: passed on whole, in batches
                        j = parts.find(1, i)
                        j = n if j < 0 else j
                        while i < j:
                            cut = _nth_exit(kind_of, i, j, max_events - exits + 1)
                            body += view[i * RECORD_SIZE : cut * RECORD_SIZE]
                            exits += kind_of.count(KIND_EXIT, i, cut)
                            i = cut
                            if cut < j:  # that exit begins the next batch
                                yield batch()
                                body, exits, seen, lost, stops = bytearray(), 0, [], 0, 0
                                coalesced = bytearray()
                                dropped = {}
                                procs = []
                        continue
                    rec = view[i * RECORD_SIZE : (i + 1) * RECORD_SIZE]
                    if kind == KIND_VCPU:
                        seen.append(unpack_vcpu(rec, start))
                    elif kind == KIND_PROCESS:
                        procs.append((bytes(rec), []))
                    elif kind == KIND_NAME and procs:
                        procs[-1][1].append(name_piece(rec))
                    elif kind == KIND_COUNTERS:
                        _, n_lost, n_stops, _t, n_dropped, cpu = COUNTERS.unpack(rec)
                        lost += n_lost
                        stops += n_stops
                        if n_dropped:
                            dropped[cpu] = dropped.get(cpu, 0) + n_dropped
                    elif kind in (KIND_COALESCED, KIND_HARDWARE):
                        coalesced += rec  # (records of no exit, in one shape)
                    elif kind == KIND_END:
                        _, why, _pad, status, t, _total = END.unpack(rec)
                        why_text = {v: k for k, v in WHY_CODES.items()}.get(why, "ended")
                        self.end = Detached(
                            self.meta.pid, why_text, start + t, None if status < 0 else status
                        )
                        self.complete = True
                    else:
                        at = offset + i * RECORD_SIZE
                        raise RecordingError(
                            f"{self.path} is corrupt at byte {at}: unknown record kind {kind}"
                        )
                    i += 1
                offset += whole
            self.torn_bytes = len(carry)
        if body or seen or lost or stops or procs or coalesced or dropped:
            yield batch()


def _nth_exit(kind_of: bytes, i: int, j: int, k: int) -> int:
    """The index of the k-th (from 1) EXIT record among records i..j-1, or j if fewer."""
    if kind_of.count(KIND_EXIT, i, j) < k:
        return j
    return bisect.bisect_left(range(i, j), k, key=lambda p: kind_of.count(KIND_EXIT, i, p + 1)) + i


def check_writable(path: str) -> None:
    """Fail early, before tracing starts, if ``path`` cannot be created; touches nothing."""
    target = path if os.path.exists(path) else (os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        raise RecordingError(f"cannot create recording {path}: it is a directory")
    if not os.access(target, os.W_OK):
        why = "Permission denied" if os.path.exists(target) else "No such file or directory"
        raise RecordingError(f"cannot create recording {path}: {why}")


def create_owner_only(path: str) -> int:
    """``path`` created or truncated for writing, mode 0600: a recording, and whatever is made
    of one, can carry what the guest did."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    if stat.S_ISREG(os.fstat(fd).st_mode):  # never chmod /dev/null or a FIFO
        os.fchmod(fd, 0o600)  # also when the file existed with a wider mode
    return fd


def _holds_no_exits(path: str) -> bool:
    """A readable recording without one exit (``record -- true``); anything else is kept."""
    try:
        return not any(batch.exits for batch in open_recording(path).batches())
    except RecordingError:
        return False


def open_recording(path: str) -> Recording:
    """Open and check the header; RecordingError with a one-line reason if it is not usable."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                if head and not MAGIC.startswith(head[: len(MAGIC)]):
                    raise RecordingError(f"{path} is not a kvmtop recording")
                raise RecordingError(f"{path} is truncated: its header is incomplete")
            magic, version, _flags, meta_len = HEADER.unpack(head)
            if magic != MAGIC:
                raise RecordingError(f"{path} is not a kvmtop recording")
            if version not in READS:
                raise RecordingError(
                    f"{path} is a version {version} recording; this kvmtop reads versions "
                    f"{READS[0]} to {READS[-1]}"
                )
            blob = f.read(meta_len)
    except IsADirectoryError:
        raise RecordingError(f"cannot read recording {path}: it is a directory") from None
    except OSError as exc:
        raise RecordingError(f"cannot read recording {path}: {exc.strerror}") from None
    if len(blob) < meta_len:
        raise RecordingError(f"{path} is truncated: its header is incomplete")
    try:
        fields = json.loads(blob)
        fields["argv"] = tuple(fields["argv"])
        known = {f.name for f in dataclasses.fields(RecordingMeta)}  # newer writers may add keys
        meta = RecordingMeta(**{k: v for k, v in fields.items() if k in known})
    except (ValueError, TypeError, KeyError):
        raise RecordingError(f"{path} is corrupt: its metadata cannot be read") from None
    return Recording(path, meta, HEADER.size + meta_len)
