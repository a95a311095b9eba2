"""The summary of an aggregate, as a terminal table, JSON or CSV. Reads snapshots only."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping

from kvmtop.abi.arch import HOST
from kvmtop.abi.mmio_names import MmioNames
from kvmtop.aggregate.exits import (
    CoalescedCount,
    CoalescedSnapshot,
    ExitStats,
    LatencyHistogram,
    ReasonStats,
    StatsSnapshot,
    VcpuSnapshot,
    bound_text,
    top_error,
)
from kvmtop.aggregate.guest_code import RipCount
from kvmtop.formats.guest_symbols import GuestSymbols, code_text
from kvmtop.formats.recording import Recording, open_recording
from kvmtop.model.coalesced import RING_MAX
from kvmtop.units import duration


def duration_s(snapshot: StatsSnapshot, meta: Mapping[str, object] | None = None) -> float:
    """How long the VM was traced (``meta["traced_s"]``: attach to detach), which rates are
    over; without it, the first exit to the last."""
    traced = meta.get("traced_s") if meta is not None else None
    if isinstance(traced, int | float) and traced > 0:
        return float(traced)
    if snapshot.first_ns is None or snapshot.last_ns is None:
        return 0.0
    return (snapshot.last_ns - snapshot.first_ns) / 1e9


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _latency(h: LatencyHistogram) -> dict[str, int]:
    return {
        "count": h.count,
        "total_ns": h.total_ns,
        "min_ns": h.min_ns,
        "p50_ns": h.median,
        "p99_ns": h.p99,
        "max_ns": h.max_ns,
    }


def _net_json(r: ReasonStats) -> dict[str, object]:
    """Net handling, and where its mean lies (docs/engine.md); ``mean_known``: false where that
    is wider than its own low end, and the views say "unknown"."""
    bound = r.net_mean_bound
    assert bound is not None
    return {
        **_latency(r.handling_net),
        "mean_low_ns": round(bound.low_ns),
        "mean_high_ns": round(bound.high_ns),
        "mean_known": bound.known,
    }


def _reasons_json(reasons: tuple[ReasonStats, ...], seconds: float) -> dict[str, object]:
    return {
        r.label: {
            "count": r.count,
            "rate": round(_rate(r.count, seconds), 3),
            "guest": _latency(r.guest),
            "handling": _latency(r.handling),
            # handling less the time kvmtop's stops held the vCPU thread (two stops only)
            **({"handling_net": _net_json(r)} if r.handling_net.count else {}),
        }
        for r in reasons
    }


GUEST_CODE_TOP = 10  # guest code addresses per vCPU and reason in the report


def _rip_json(r: RipCount, symbols: GuestSymbols | None) -> dict[str, object]:
    symbol = symbols.name(r.linear) if symbols is not None else None
    return (
        {"reason": r.label, "rip": r.rip, "linear": r.linear, "count": r.count}
        | ({"cpl": r.cpl} if r.cpl >= 0 else {})
        | ({"vmm_ns": r.vmm_ns} if r.vmm_ns >= 0 else {})
        | ({"symbol": symbol} if symbol is not None else {})
        | ({"count_error": r.error} if r.error else {})
    )


def _per_reason(rips: tuple[RipCount, ...], n: int) -> list[RipCount]:
    """The first ``n`` of each reason, in the table's order."""
    taken: dict[str, int] = {}
    out = []
    for r in rips:
        if taken.get(r.label, 0) < n:
            taken[r.label] = taken.get(r.label, 0) + 1
            out.append(r)
    return out


def _guest_code_json(by_exits: tuple[RipCount, ...], by_time: tuple[RipCount, ...],
                     symbols: GuestSymbols | None) -> dict[str, object]:  # fmt: skip
    """--rip: each reason's top guest code by exits and by the VMM's time handling them."""
    return {
        "by_exits": [_rip_json(r, symbols) for r in _per_reason(by_exits, GUEST_CODE_TOP)],
        "by_vmm_time": [_rip_json(r, symbols) for r in _per_reason(by_time, GUEST_CODE_TOP)],
    }


def summary_json(snapshot: StatsSnapshot, meta: Mapping[str, object],
                 symbols: GuestSymbols | None = None) -> dict[str, object]:  # fmt: skip
    seconds = duration_s(snapshot, meta)
    hardware = dict(snapshot.hardware_by_vcpu)
    code = snapshot.rip_seen
    return {
        "exits": {r.label: r.count for r in snapshot.reasons},
        # Keyed by vCPU id when the session had one VM (as always), by PID:VM:VCPU when more
        "vcpus": {
            v.label: {
                "exits": {r.label: r.count for r in v.reasons},
                "total": v.total,
                "tid": v.tid,
                "reasons": _reasons_json(v.reasons, seconds),
                "coalesced": _coalesced_json(v.coalesced, snapshot.mmio_names),
                "hardware_exits": dict(hardware.get(v.vcpu, ())),
                **_identity(v),
            }
            | ({"guest_code": _guest_code_json(v.rips, v.rips_by_time, symbols)} if code else {})
            for v in snapshot.vcpus
        },
        "io": [
            {"port": p.port, "direction": p.direction, "size": p.size, "count": p.count}
            | ({"count_error": p.error} if p.error else {})
            for p in snapshot.io
        ],
        "mmio": [
            {"address": m.address, "len": m.length, "write": m.write, "count": m.count}
            | ({"name": m.name} if m.name else {})
            | ({"count_error": m.error} if m.error else {})
            for m in snapshot.mmio
        ],
        "total": snapshot.total,
        "lost": snapshot.lost,
        "dropped_events": {str(cpu): n for cpu, n in snapshot.dropped},
        "hardware_exits": dict(snapshot.hardware),
        "stops": snapshot.stops,
        "stops_per_exit": round(snapshot.stops / snapshot.total, 3) if snapshot.total else None,
        "duration_s": round(seconds, 6),
        "reasons": _reasons_json(snapshot.reasons, seconds),
        "top_exact": snapshot.top_exact,
        "coalesced": {
            "total": snapshot.coalesced.total,
            "read": snapshot.coalesced.read,
            "kernel": snapshot.coalesced.kernel,
            "wraps": snapshot.coalesced.wraps,
            "unreadable_vcpus": list(snapshot.coalesced.unreadable),
            "writes": _coalesced_json(snapshot.coalesced.top, snapshot.mmio_names),
        },
        "meta": meta,
    } | (
        {"guest_code": _guest_code_json(snapshot.rips, snapshot.rips_by_time, symbols)}
        if code
        else {}
    )


def _coalesced_json(
    writes: tuple[CoalescedCount, ...], names: MmioNames
) -> list[dict[str, object]]:
    """Writes KVM queued in its coalesced ring (no exit): port IO (``port``) or MMIO (with its
    ``name`` where one is known)."""
    return [
        {"port" if c.pio else "address": c.address, "len": c.length, "count": c.count}
        | ({"name": names.name(c.address)} if not c.pio and names.name(c.address) else {})
        for c in writes
    ]


def coalesced_text(c: CoalescedCount, names: MmioNames | None = None) -> str:
    """One address or port's coalesced writes, as the IO and MMIO tables name theirs."""
    if c.pio:
        return f"0x{c.address:04x} out size {c.length}  {c.count:>10}  {port_name(c.address)}"
    name = (names or MmioNames()).name(c.address)
    return f"0x{c.address:012x} write len {c.length}  {c.count:>10}  {name}".rstrip()


def coalesced_notes(snapshot: CoalescedSnapshot) -> list[str]:
    """What the coalesced counts leave out, said once."""
    notes = []
    if snapshot.unreadable:
        vcpus = ", ".join(str(v) for v in snapshot.unreadable[:8])
        notes.append(f"coalesced ring not readable for vCPU(s) {vcpus} (kvm_run read remotely): "
                     "their writes that never exit are not counted")  # fmt: skip
    if snapshot.wraps:
        notes.append(f"the VMM drained the ring between two of kvmtop's looks {snapshot.wraps} "
                     f"time(s): exact unless more than {RING_MAX} writes came between two exits")  # fmt: skip
    return notes


def _identity(v: VcpuSnapshot) -> dict[str, object]:
    """Which vCPU of which VM of which process (recordings from before: the id alone)."""
    if v.key is None:
        return {"vcpu": v.vcpu}
    return {"vcpu": v.key.vcpu, "pid": v.key.pid, "vm": v.key.vm, "process": v.process}


def _row_groups(snapshot: StatsSnapshot) -> list[tuple[str, tuple[ReasonStats, ...], int]]:
    """(name, reasons, total): each vCPU's, then the whole VM's as ``all``."""
    groups = [(v.label, v.reasons, v.total) for v in snapshot.vcpus]
    groups.append(("all", snapshot.reasons, snapshot.total))
    return groups


def _ns(ns: int) -> str:
    return duration(ns, sep=" ")


def port_name(port: int) -> str:
    return str(HOST.PORT_NAMES.get(port, ""))


def seconds_text(seconds: float) -> str:
    """A span with the digits it needs: "12.345 s", "360 ms", "0.36 ms"."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.3f} s"
    return f"{seconds * 1e3:.3g} ms"


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _head(snapshot: StatsSnapshot, meta: Mapping[str, object]) -> list[str]:
    seconds = duration_s(snapshot, meta)
    argv_value = meta.get("argv")
    argv = " ".join(str(a) for a in argv_value) if isinstance(argv_value, list | tuple) else ""
    vms = {(v.key.pid, v.key.vm) for v in snapshot.vcpus if v.key is not None}
    on = f"{len(snapshot.vcpus)} vCPU(s)" + (f" of {len(vms)} VMs" if len(vms) > 1 else "")
    lines = [
        f"pid {meta.get('pid')}  {argv}",  # whole: a report is read for what ran
        f"{snapshot.total} exits in {seconds_text(seconds)} on {on}"
        f"  (lost {snapshot.lost}, ptrace stops {snapshot.stops})",
    ]
    if meta.get("mode"):
        per_exit = (f": {snapshot.stops / snapshot.total:.2f} stops per exit measured"
                    if snapshot.total else "")  # fmt: skip
        lines.append(f"traced with {meta['mode']}{per_exit}")
    if snapshot.dropped:
        per_cpu = ", ".join(f"CPU {cpu}: {n}" for cpu, n in snapshot.dropped)
        lines.append(f"the kernel dropped {sum(n for _c, n in snapshot.dropped)} tracepoint "
                     f"events ({per_cpu}): their exits are missing from the counts")  # fmt: skip
    if not snapshot.vcpus:
        lines.append(
            "no vCPU was seen: the command made no VM (see its own messages above)"
            if meta.get("launched")
            else "no vCPU ran while kvmtop traced the VMM"
        )
    return lines


def net_median_text(r: ReasonStats) -> str:
    """The net median, where the net mean is known (a per-exit net is an estimate, floored at 0:
    where its mean cannot be told, neither can its median)."""
    if not r.handling_net.count:
        return "-"
    return _ns(r.handling_net.median) if r.net_median_known else "unknown"


def guest_code_lines(snapshot: StatsSnapshot, symbols: GuestSymbols | None) -> list[str]:
    """--rip: per vCPU and reason, the guest code that made the most exits."""
    if not snapshot.rip_seen:
        return []
    named = f" (symbols: {symbols.source})" if symbols is not None else ""
    lines = [f"TOP GUEST CODE: per vCPU and reason, by exits{named}"]
    w = max(4, *(len(v.label) for v in snapshot.vcpus))
    for v in snapshot.vcpus:
        for r in _per_reason(v.rips, 5):
            vmm = _ns(r.vmm_ns) if r.vmm_ns >= 0 else "-"
            lines.append(f"  {v.label:>{w}}  {r.label:<22} {r.count:>10}  VMM {vmm:>10}  "
                         f"{code_text(r, symbols)}")  # fmt: skip
    lines.append("")
    return lines


def summary_table(snapshot: StatsSnapshot, meta: Mapping[str, object],
                  symbols: GuestSymbols | None = None) -> str:  # fmt: skip
    seconds = duration_s(snapshot, meta)
    lines = _head(snapshot, meta)
    groups = _row_groups(snapshot)
    w = max(4, *(len(name) for name, _, _ in groups))
    split = any(r.handling.count for _, reasons, _ in groups for r in reasons)
    # one stop per exit: each time runs from a KVM_RUN entry to the vCPU's next
    run = "GUEST" if split or snapshot.total <= len(snapshot.vcpus) else "RUN+VMM"
    header = f"{'VCPU':>{w}}  {'REASON':<24} {'COUNT':>10} {'SHARE':>7} {'RATE/s':>10}  {run + ' p50':>10} {'p99':>10}  {'VMM p50':>10} {'p99':>10}"
    net = any(r.handling_net.count for _, reasons, _ in groups for r in reasons)
    if net:
        header += f"  {'NET p50':>10}  {'NET MEAN WITHIN':>17}"
    lines += ["", header, "-" * len(header)]
    if run != "GUEST":
        lines[-2:-2] = ["RUN+VMM: from a KVM_RUN to the vCPU's next one, the guest's run and the "
                        "VMM's handling together (one stop per exit does not tell them apart)"]  # fmt: skip
    for name, reasons, total in groups:
        for r in reasons:
            share = 100.0 * r.count / total if total else 0.0
            lines.append(
                f"{name:>{w}}  {r.label:<24} {r.count:>10} {share:>6.1f}% {_rate(r.count, seconds):>10.1f}  "
                f"{_ns(r.guest.median):>10} {_ns(r.guest.p99):>10}  "
                f"{_ns(r.handling.median) if r.handling.count else '-':>10} "
                f"{_ns(r.handling.p99) if r.handling.count else '-':>10}"
                + (
                    f"  {net_median_text(r):>10}"
                    f"  {bound_text(r.net_mean_bound, ' ') if r.handling_net.count else '-':>17}"
                    if net
                    else ""
                )
            )
        if reasons:
            lines.append("")
    if snapshot.io:
        lines.append("TOP IO PORTS")
        for p in snapshot.io[:10]:
            lines.append(
                f"  0x{p.port:04x} {p.direction:<3} size {p.size}  {p.count:>10}  {port_name(p.port)}"
            )
        lines.append("")
    if snapshot.mmio:
        lines.append("TOP MMIO ADDRESSES")
        for m in snapshot.mmio[:10]:
            kind = "write" if m.write else "read"
            lines.append(
                f"  0x{m.address:012x} {kind:<5} len {m.length}  {m.count:>10}  {m.name}".rstrip()
            )
        lines.append("")
    if snapshot.hardware:
        lines.append("HARDWARE EXITS (kvm_exit): every exit of the guest, KVM's own and the VMM's")
        lines += [f"  {name:<28} {n:>10}" for name, n in snapshot.hardware[:12]]
        lines.append("")
    if snapshot.coalesced.top or snapshot.coalesced.unreadable:
        lines.append(
            "HANDLED BY KVM (NO EXIT): writes KVM took in the kernel (its coalesced ring, "
            "in-kernel devices, ioeventfds)" if snapshot.coalesced.kernel
            else "COALESCED (NO EXIT): writes KVM queued for the VMM without an exit"
        )  # fmt: skip
        lines += [
            f"  {coalesced_text(c, snapshot.mmio_names)}" for c in snapshot.coalesced.top[:10]
        ]
        lines += [f"  ({note})" for note in coalesced_notes(snapshot.coalesced)]
        lines.append("")
    lines += guest_code_lines(snapshot, symbols)
    error = top_error(snapshot.io[:10], snapshot.mmio[:10])
    if error:  # only where a count shown is in fact uncertain
        lines.append(f"(IO/MMIO tables hit their size bound: a count shown may be high by up to "
                     f"{error})")  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


SUMMARY_CSV_COLUMNS = (
    "vcpu", "reason", "count", "share_pct", "rate_per_s",
    "guest_min_ns", "guest_p50_ns", "guest_p99_ns", "guest_max_ns",
    "vmm_count", "vmm_min_ns", "vmm_p50_ns", "vmm_p99_ns", "vmm_max_ns",
    "vmm_net_count", "vmm_net_min_ns", "vmm_net_p50_ns", "vmm_net_p99_ns", "vmm_net_max_ns",
    "vmm_net_mean_low_ns", "vmm_net_mean_high_ns",
)  # fmt: skip


def _latency_cells(h: LatencyHistogram) -> list[int | str]:
    """min, p50, p99, max; empty cells when nothing was measured (one-stop tracing's VMM)."""
    return [h.min_ns, h.median, h.p99, h.max_ns] if h.count else ["", "", "", ""]


def _bound_cells(r: ReasonStats) -> list[int | str]:
    """Where the mean net handling lies; empty cells where kvmtop cannot say."""
    bound = r.net_mean_bound
    return [round(bound.low_ns), round(bound.high_ns)] if bound and bound.known else ["", ""]


def summary_csv(snapshot: StatsSnapshot, meta: Mapping[str, object] | None = None) -> str:
    """The summary table as CSV: one row per vCPU and reason, then the whole VM's (``all``)."""
    seconds = duration_s(snapshot, meta)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_CSV_COLUMNS)
    groups = _row_groups(snapshot)
    for name, reasons, total in groups:
        for r in reasons:
            share = round(100.0 * r.count / total, 3) if total else 0.0
            rate = round(_rate(r.count, seconds), 3)
            writer.writerow([name, r.label, r.count, share, rate, *_latency_cells(r.guest),
                             r.handling.count, *_latency_cells(r.handling),
                             r.handling_net.count, *_latency_cells(r.handling_net),
                             *_bound_cells(r)])  # fmt: skip
    return buffer.getvalue()


def load_recording_stats(path: str) -> tuple[Recording, ExitStats]:
    recording = open_recording(path)
    stats = ExitStats()
    stats.see_command(recording.meta.argv)
    for batch in recording.batches():
        stats.add_batch(batch)
    return recording, stats


def traced_s(recording: Recording, stats: ExitStats) -> float | None:
    """Attach to detach (or, in a file cut short, to its last exit), in seconds."""
    end = recording.end.t_ns if recording.end is not None else stats.last_ns
    return (end - recording.meta.start_ns) / 1e9 if end is not None else None
