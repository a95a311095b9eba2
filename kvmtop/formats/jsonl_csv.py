"""Exits as lines for other tools: JSON Lines (one object per exit, and one per target of
writes that never exited: ``"coalesced": true``) and CSV (one row per exit).

Pure: batches in, text out, one piece per batch so that a stream stays a stream. Times are ns
since the recording's start (the attach). ``open_output`` is the one place that opens an export's
destination, so every exporter fails the same way.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from kvmtop.abi.mmio_names import MmioNames
from kvmtop.abi.record_layout import EXIT_CYCLE, EXIT_WRITE
from kvmtop.decoder import describe_exit, event_label, exit_details
from kvmtop.errors import OutputError
from kvmtop.formats.guest_symbols import GuestSymbols, symbol_of
from kvmtop.formats.recording import create_owner_only
from kvmtop.model.coalesced import CoalescedWrites, iter_coalesced
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import Attached, ExitBatch, VcpuKeys
from kvmtop.model.vcpu_keys import VcpuKey
from kvmtop.xlat_exit import ExitReason

WELL_KNOWN = MmioNames()  # an exit carries no argv: the well-known x86 ranges

CSV_COLUMNS = ("vcpu", "reason", "errno", "entry_ns", "exit_ns", "guest_ns", "one_stop",
               "write", "detail_a", "detail_b", "description", "data", "pid", "vm", "rip",
               "linear", "symbol")  # fmt: skip


def exit_record(event: ExitEvent, start_ns: int, key: VcpuKey | None = None,
                symbols: GuestSymbols | None = None) -> dict[str, object]:  # fmt: skip
    """One exit as a JSON object: vcpu (KVM's id), pid and vm (the VM's fd in that process)
    where known, reason, errno, times, the decoded details; ``one_stop`` when its times span
    the run and the VMM's handling; with --rip, the guest's ``rip``, ``linear`` address,
    ``cpl`` where known and ``symbol`` where named."""
    record: dict[str, object] = {"vcpu": event.vcpu if key is None else key.vcpu}
    if key is not None:
        record.update(pid=key.pid, vm=key.vm)
    record.update({
        "reason": event_label(event),
        "errno": event.errno,
        "entry_ns": event.entry_ns - start_ns,
        "exit_ns": event.exit_ns - start_ns,
    })  # fmt: skip
    record.update(exit_details(event))
    if event.reason == ExitReason.MMIO and not event.errno and (name := WELL_KNOWN.name(event.a)):
        record["mmio_name"] = name
    if event.flags & EXIT_CYCLE:
        record["one_stop"] = True
    if event.rip is not None:
        record.update(rip=event.rip.rip, linear=event.rip.linear)
        if event.rip.cpl >= 0:
            record["cpl"] = event.rip.cpl
        if (symbol := symbol_of(event.rip, symbols)) is not None:
            record["symbol"] = symbol
    return record


def coalesced_record(
    writes: CoalescedWrites, start_ns: int, key: VcpuKey | None
) -> dict[str, object]:
    """Writes KVM queued in its coalesced ring (no exit), seen at one look (``t_ns``)."""
    record: dict[str, object] = {
        "coalesced": True,
        "vcpu": writes.vcpu if key is None else key.vcpu,
    }
    if key is not None:
        record.update(pid=key.pid, vm=key.vm)
    if writes.unreadable:
        record["unreadable"] = True
    else:
        record["port" if writes.pio else "address"] = writes.address
        record.update(len=writes.length, count=writes.count)
    record["t_ns"] = writes.t_ns - start_ns
    if writes.wrap:
        record["wrap"] = True
    return record


def jsonl_chunk(
    events: Iterable[ExitEvent], start_ns: int, keys: VcpuKeys, coalesced: bytes = b"",
    base_ns: int = 0, symbols: GuestSymbols | None = None,
) -> str:  # fmt: skip
    lines = [exit_record(e, start_ns, keys.of(e.vcpu), symbols) for e in events]
    lines += [coalesced_record(w, start_ns, keys.of(w.vcpu))
              for w in iter_coalesced(coalesced, base_ns)]  # fmt: skip
    return "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)


def jsonl_chunks(batches: Iterable[ExitBatch], start_ns: int,
                 symbols: GuestSymbols | None = None) -> Iterator[str]:  # fmt: skip
    keys = VcpuKeys()
    for batch in batches:
        keys.see(batch)
        events = batch.events  # decoded here: one object per exit is what an export is
        if events or batch.coalesced:
            yield jsonl_chunk(events, start_ns, keys, batch.coalesced, batch.base_ns, symbols)


def csv_chunks(batches: Iterable[ExitBatch], start_ns: int,
               symbols: GuestSymbols | None = None) -> Iterator[str]:  # fmt: skip
    """A header row, then one row per exit. ``detail_a``/``detail_b`` are the recording's raw
    details (docs/recording-format.md); ``description`` says them in words."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    keys = VcpuKeys()
    for batch in batches:
        keys.see(batch)
        for e in batch.events:
            key = keys.of(e.vcpu)
            writer.writerow((
                e.vcpu if key is None else key.vcpu, event_label(e), e.errno,
                e.entry_ns - start_ns, e.exit_ns - start_ns, e.guest_ns,
                int(bool(e.flags & EXIT_CYCLE)), int(bool(e.flags & EXIT_WRITE)), e.a, e.b,
                describe_exit(e), e.data.hex(), "" if key is None else key.pid,
                "" if key is None else key.vm, "" if e.rip is None else e.rip.rip,
                "" if e.rip is None else e.rip.linear, symbol_of(e.rip, symbols) or "",
            ))  # fmt: skip
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue()  # the header of an empty recording


def open_output(path: str) -> TextIO:
    """``-``: stdout; else the file, created or truncated, readable by its owner only like the
    recording it comes from (OutputError if it cannot be)."""
    if path == "-":
        return sys.stdout
    try:
        return open(create_owner_only(path), "w", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None


def write_chunks(chunks: Iterable[str], out: TextIO, path: str) -> None:
    """Each chunk written and flushed as it comes; a full disk is an OutputError. A closed pipe
    (BrokenPipeError) is left to the caller: it is the reader's choice, not an error."""
    try:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None


class JsonlStream:
    """``record --jsonl``: each batch of a live session as JSON lines, flushed at once; times
    since the attach, as in the recording."""

    def __init__(self, path: str, symbols: GuestSymbols | None = None) -> None:
        self.path = path
        self.symbols = symbols
        self.out = open_output(path)  # before tracing starts: a bad path fails first
        self.start_ns = 0
        self.keys = VcpuKeys()

    def begin(self, attached: Attached) -> None:
        self.start_ns = attached.t_ns

    def write_batch(self, batch: ExitBatch) -> None:
        self.keys.see(batch)
        events = batch.events
        if events or batch.coalesced:
            chunk = jsonl_chunk(events, self.start_ns, self.keys, batch.coalesced, batch.base_ns,
                                self.symbols)  # fmt: skip
            write_chunks([chunk], self.out, self.path)

    def close(self) -> None:
        if self.out is not sys.stdout:
            self.out.close()
