"""Exits as a Chrome JSON trace (what ui.perfetto.dev and chrome://tracing open).

One process per VMM (each process a launched command started that ran vCPUs), one track per
vCPU (tid: the vCPU's number + 1, as viewers take tid 0 for the idle thread) holding a slice per run in the guest (``guest → IO``) and a slice per VMM handling period
(``VMM: IO 0x80 out``, from an exit to that vCPU's next entry), and a counter of each vCPU's exit
rate. Under one-stop tracing (EXIT_CYCLE) a run and its handling are not told apart: one slice
(``guest+VMM: IO 0x80 out``) spans both. The last exit of each vCPU has no handling slice: its
next entry is not in the recording.

Pure and streaming: text pieces out, holding only the last exit and the current rate bin of each
vCPU, however many exits the recording holds. Times are µs since the recording's start, written
exactly (a float would round them in long recordings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kvmtop.abi.arch import HOST
from kvmtop.abi.mmio_names import MmioNames, from_argv
from kvmtop.abi.record_layout import EXIT_CYCLE, EXIT_WRITE
from kvmtop.decoder import event_label, exit_details
from kvmtop.formats.guest_symbols import GuestSymbols, code_text
from kvmtop.formats.recording import RecordingMeta
from kvmtop.model.coalesced import CoalescedWrites, iter_coalesced
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import ExitBatch, VcpuKeys
from kvmtop.units import command_text
from kvmtop.xlat_exit import ExitReason, errno_name

RATE_BIN_NS = 10_000_000  # exit-rate counter: one value per 10 ms
HEX_ARGS = ("port", "address", "msr", "gpa", "rip", "linear", "pc", "hardware_reason")


def us(ns: int) -> str:
    """ns as µs with 3 decimals, exactly: 1234567 -> 1234.567."""
    whole, part = divmod(abs(ns), 1000)
    return f"{'-' if ns < 0 else ''}{whole}.{part:03d}"


def short_label(event: ExitEvent) -> str:
    """``IO``, ``INTR``, ``RUN_EFAULT``: the exit label without its prefix."""
    return event_label(event).removeprefix("KVM_EXIT_").removeprefix("KVM_")


def exit_title(event: ExitEvent) -> str:
    """``IO 0x80 out``, ``MMIO 0xc0000 write``, ``WRMSR 0x1b``, ``HLT``: the exit in a few words."""
    if event.errno:
        return short_label(event)
    write = bool(event.flags & EXIT_WRITE)
    if event.reason == ExitReason.IO:
        return f"IO 0x{event.a:x} {'out' if write else 'in'}"
    if event.reason == ExitReason.MMIO:
        return f"MMIO 0x{event.a:x} {'write' if write else 'read'}"
    if event.reason in (ExitReason.X86_RDMSR, ExitReason.X86_WRMSR):
        return f"{'WRMSR' if write else 'RDMSR'} 0x{event.a:x}"
    return short_label(event)


def slice_args(event: ExitEvent, names: MmioNames,
               symbols: GuestSymbols | None = None) -> dict[str, int | str | bool]:  # fmt: skip
    args = exit_details(event)
    if event.rip is not None:
        args["rip"], args["linear"] = event.rip.rip, event.rip.linear
        args["guest_code"] = code_text(event.rip, symbols)
    for key in HEX_ARGS:
        if key in args:
            args[key] = f"0x{args[key]:x}"
    if event.reason == ExitReason.IO and event.a in HOST.PORT_NAMES:
        args["port_name"] = HOST.PORT_NAMES[event.a]
    if event.reason == ExitReason.MMIO and not event.errno and (name := names.name(event.a)):
        args["mmio_name"] = name
    if event.errno:
        args["errno"] = errno_name(event.errno)
    return args


@dataclass(slots=True)
class _VcpuTrack:
    pid: int  # its process's
    last: ExitEvent | None = None  # its handling slice waits for the vCPU's next entry
    rate_bin: int = 0
    rate_count: int = 0
    rate_shown: float | None = None  # the counter's current value


class PerfettoTrace:
    """Turns batches into trace events; :meth:`chunks` is the whole document, piece by piece."""

    def __init__(self, meta: RecordingMeta, rate_bin_ns: int = RATE_BIN_NS,
                 symbols: GuestSymbols | None = None) -> None:  # fmt: skip
        self.meta = meta
        self.symbols = symbols  # with --rip: slices say the guest code (its symbol) that exited
        self._mmio_names = from_argv(meta.argv)  # MMIO named as the recorded command line tells
        self.rate_bin_ns = rate_bin_ns
        self._tracks: dict[int, _VcpuTrack] = {}
        self._keys = VcpuKeys()
        self._programs: dict[int, str] = {}  # pid -> its command line
        self._named: set[int] = {meta.pid}  # processes with a process_name event

    def chunks(self, batches: Iterable[ExitBatch]) -> Iterator[str]:
        other = {"pid": self.meta.pid, "argv": list(self.meta.argv),
                 "start_wall": self.meta.start_wall, "hostname": self.meta.hostname,
                 "kvmtop_version": self.meta.kvmtop_version}  # fmt: skip
        yield f'{{"displayTimeUnit":"ns","otherData":{json.dumps(other)},"traceEvents":[\n'
        name = command_text(self.meta.argv, 80) or f"pid {self.meta.pid}"
        yield self._meta_event("process_name", 0, {"name": name})
        for batch in batches:
            pieces: list[str] = []
            for proc in batch.processes:
                if proc.argv and not proc.ended:
                    self._programs[proc.pid] = command_text(proc.argv, 80)
            self._keys.see(batch)
            for seen in batch.vcpus:
                pieces += self._track(seen.vcpu)[1]
            for event in batch.events:
                pieces += self._exit(event)
            for writes in iter_coalesced(batch.coalesced, batch.base_ns):
                pieces += self._coalesced(writes)
            if pieces:
                yield ",\n" + ",\n".join(pieces)
        tail: list[str] = []
        for vcpu, track in sorted(self._tracks.items()):
            tail += self._close_bins(vcpu, track, track.rate_bin + 2)  # the rate falls to 0
        yield (",\n" + ",\n".join(tail) if tail else "") + "\n]}\n"

    def _meta_event(self, kind: str, tid: int, args: dict[str, object], pid: int = 0) -> str:
        return (f'{{"ph":"M","pid":{pid or self.meta.pid},"tid":{tid},"name":"{kind}",'
                f'"args":{json.dumps(args)}}}')  # fmt: skip

    def _track(self, vcpu: int) -> tuple[_VcpuTrack, list[str]]:
        """The vCPU's track state, and its metadata events the first time it is seen."""
        track = self._tracks.get(vcpu)
        if track is not None:
            return track, []
        key = self._keys.of(vcpu)
        pid = key.pid if key is not None else self.meta.pid
        track = self._tracks[vcpu] = _VcpuTrack(pid)
        names = []
        if pid not in self._named:
            self._named.add(pid)
            program = self._programs.get(pid, f"pid {pid}")
            names.append(self._meta_event("process_name", 0, {"name": program}, pid))
        title = f"vCPU {key.vcpu} (VM {key.vm})" if key is not None and vcpu != key.vcpu else (
            f"vCPU {vcpu}")  # fmt: skip
        names += [
            self._meta_event("thread_name", vcpu + 1, {"name": title}, pid),
            self._meta_event("thread_sort_index", vcpu + 1, {"sort_index": vcpu}, pid),
        ]
        return track, names

    def _slice(self, name: str, cat: str, event: ExitEvent, start: int, end: int) -> str:
        pid = self._tracks[event.vcpu].pid
        return (f'{{"ph":"X","pid":{pid},"tid":{event.vcpu + 1},'
                f'"ts":{us(start - self.meta.start_ns)},"dur":{us(end - start)},'
                f'"name":{json.dumps(name, ensure_ascii=False)},"cat":"{cat}",'
                f'"args":{json.dumps(slice_args(event, self._mmio_names, self.symbols))}}}')  # fmt: skip

    def _exit(self, event: ExitEvent) -> list[str]:
        track, out = self._track(event.vcpu)
        last = track.last
        if last is not None and event.entry_ns >= last.exit_ns:
            out.append(self._slice(f"VMM: {exit_title(last)}{self._at(last)}", "vmm", last,
                                   last.exit_ns, event.entry_ns))  # fmt: skip
        if event.flags & EXIT_CYCLE:
            out.append(self._slice(f"guest+VMM: {exit_title(event)}{self._at(event)}", "guest+vmm", event,
                                   event.entry_ns, event.exit_ns))  # fmt: skip
            track.last = None
        else:
            out.append(self._slice(f"guest → {short_label(event)}{self._at(event)}", "guest", event,
                                   event.entry_ns, event.exit_ns))  # fmt: skip
            track.last = event
        rate_bin = max(track.rate_bin, (event.exit_ns - self.meta.start_ns) // self.rate_bin_ns)
        if rate_bin != track.rate_bin:
            out += self._close_bins(event.vcpu, track, rate_bin)
        track.rate_count += 1
        return out

    def _at(self, event: ExitEvent) -> str:
        """`` @ symbol+0x1c`` (or the address): the guest code that made the exit (--rip)."""
        return "" if event.rip is None else f" @ {code_text(event.rip, self.symbols)}"

    def _coalesced(self, writes: CoalescedWrites) -> list[str]:
        """An instant on the vCPU's track: the writes its VM's ring took without an exit."""
        if writes.unreadable:
            return []
        track, out = self._track(writes.vcpu)
        where = f"port 0x{writes.address:x}" if writes.pio else f"0x{writes.address:x}"
        args = {"count": writes.count, "len": writes.length, "pio": writes.pio}
        out.append(f'{{"ph":"i","s":"t","pid":{track.pid},"tid":{writes.vcpu + 1},'
                   f'"ts":{us(writes.t_ns - self.meta.start_ns)},'
                   f'"name":"coalesced (no exit): {where} x{writes.count}","cat":"coalesced",'
                   f'"args":{json.dumps(args)}}}')  # fmt: skip
        return out

    def _close_bins(self, vcpu: int, track: _VcpuTrack, next_bin: int) -> list[str]:
        """The counter values of the bin that ends and, if ``next_bin`` leaves a gap, the zero
        of the empty bins: a counter holds its value until the next one."""
        out = []
        values = [(track.rate_bin, track.rate_count * 1e9 / self.rate_bin_ns)]
        if next_bin > track.rate_bin + 1:
            values.append((track.rate_bin + 1, 0.0))
        for rate_bin, rate in values:
            if rate != track.rate_shown:
                shown = int(rate) if rate.is_integer() else round(rate, 3)
                out.append(
                    f'{{"ph":"C","pid":{track.pid},"name":"vCPU {vcpu}",'
                    f'"ts":{us(rate_bin * self.rate_bin_ns)},"args":{{"exits/s":{shown}}}}}'
                )
                track.rate_shown = rate
        track.rate_bin, track.rate_count = next_bin, 0
        return out
