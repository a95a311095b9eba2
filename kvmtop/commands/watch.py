"""``kvmtop watch -p PID``: where each vCPU's time goes, without tracing the VMM.

Every interval: per vCPU KVM's exact exits/s, and from samples of its ``kvm_run`` the share of
time inside ``KVM_RUN`` and in the VMM, by exit reason, with 95% bounds; the busiest IO ports and
MMIO addresses by the VMM's time. ``--rip``: also the guest code the VMM's exits come from, per
vCPU and reason (named with ``--guest-symbols``). ``--json``: one object per interval. The VMM
is stopped only for the moment KVM's counters take (:mod:`kvmtop.sampling.watcher`).
"""

from __future__ import annotations

import json
import platform
import select
import time
from typing import Any, TextIO

from kvmtop.commands.stats import CLEAR, SignalStop
from kvmtop.formats.guest_symbols import GuestSymbols, code_text, symbol_of
from kvmtop.sampling.entry_cost import EntryCost
from kvmtop.sampling.shares import Bound, CodeShare, Share, SiteShare, VcpuWatch, WatchSnapshot
from kvmtop.sampling.watcher import Watcher
from kvmtop.units import duration, human


def run_watch(pid: int, rate_hz: float, interval: float, count: int | None, as_json: bool,
              out: TextIO, err: TextIO, rip: bool = False,
              symbols: GuestSymbols | None = None) -> int:  # fmt: skip
    """Until ``count`` reports, Ctrl-C/SIGTERM or the VMM's end; with ``rip``, the kvm_valid_regs
    the watch set go back to 0 at each of those ends (the Watcher's close)."""
    with SignalStop() as signals, Watcher(pid, rate_hz, cancel=signals.event, rip=rip) as watcher:
        shown = 0
        while not signals.stopping and (count is None or shown < count):
            deadline = time.monotonic() + interval
            while not signals.stopping and watcher.alive and time.monotonic() < deadline:
                exit_fd = watcher.exit_fd
                wait = min(0.1, max(0.0, deadline - time.monotonic()))
                if exit_fd is not None:
                    select.select([exit_fd], [], [], wait)
            alive = watcher.alive
            snap = watcher.snapshot()
            if as_json:
                print(json.dumps(snapshot_json(snap, symbols)), file=out, flush=True)
            else:
                print((CLEAR if out.isatty() else "") + snapshot_text(snap, symbols), file=out,
                      flush=True)  # fmt: skip
            shown += 1
            if not alive:
                print(f"kvmtop: pid {pid} exited", file=err)
                break
    return 0


def _share_json(share: Share) -> dict[str, Any]:
    return {"share": round(share.value, 6), "low": round(share.low, 6),
            "high": round(share.high, 6), "hits": share.hits}  # fmt: skip


def _bound_json(bound: Bound | None, digits: int) -> dict[str, float] | None:
    return None if bound is None else {"low": round(bound.low, digits),
                                       "high": round(bound.high, digits)}  # fmt: skip


def _vcpu_json(v: VcpuWatch) -> dict[str, Any]:
    return {
        "samples": v.samples,
        "in_run": _share_json(v.in_run),
        "stale_looks": v.stale,
        "vmm": _share_json(v.vmm),
        "vmm_own": _bound_json(v.vmm_own, 6),
        "vmm_by_reason": {label: _share_json(s) for label, s in v.by_reason.items()},
        "kvm_rates": {k: round(x, 3) for k, x in sorted(v.kvm_rates.items())},
        "mean_vmm_ns": {k: round(x) for k, x in v.mean_vmm_ns.items()},
        "mean_vmm_ns_bound": {k: _bound_json(b, 0) for k, b in v.mean_vmm_bounds.items()},
        "kvm_part_at_most": None if v.kvm_part_at_most is None else round(v.kvm_part_at_most, 6),
        # the most the sampler's looks can have stretched (shares of the span; in the bounds):
        # every state's time, the VMM's, each reason's
        "sampler_stretch_at_most": round(v.sampler, 6),
        "sampler_stretch_vmm_at_most": round(v.sampler_vmm, 6),
        "sampler_stretch_by_reason_at_most": {
            k: round(x, 6) for k, x in v.sampler_by_reason.items()
        },  # fmt: skip
        **({"key": {"pid": v.key.pid, "vm": v.key.vm, "vcpu": v.key.vcpu}} if v.key else {}),
    }


def _site_json(s: SiteShare) -> dict[str, Any]:
    site: dict[str, Any] = {"label": s.label, "reason": s.reason, "key": s.key}
    if s.reason == "KVM_EXIT_MMIO":
        site |= {"address": s.key, "direction": s.direction, "name": s.name}
    return site | _share_json(s.share)


def _code_json(code: CodeShare, symbols: GuestSymbols | None) -> dict[str, Any]:
    return {"rip": code.rip, "linear": code.linear, "cpl": code.cpl,
            "symbol": symbol_of(code, symbols), "looks": code.share.hits,
            **{k: v for k, v in _share_json(code.share).items() if k != "hits"}}  # fmt: skip


def guest_code_json(snap: WatchSnapshot, symbols: GuestSymbols | None) -> dict[str, Any] | None:
    """--rip: per vCPU (and for the VM, ``all``) and reason, the top guest code by the VMM's
    sampled time; ``looks`` of each vCPU is the shares' denominator."""
    if not snap.rip:
        return None
    out: dict[str, Any] = {"note": snap.code_note, "vcpus": {}}
    for v in (*snap.vcpus, snap.vm):
        if v.code is None:
            continue
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for code in v.code.top:
            by_reason.setdefault(code.reason, []).append(_code_json(code, symbols))
        out["vcpus"][v.label] = {"looks": v.code.looks, "unstable_looks": v.code.unstable,
                                 "counted": v.code.live, "by_reason": by_reason}  # fmt: skip
    return out


def snapshot_json(snap: WatchSnapshot, symbols: GuestSymbols | None = None) -> dict[str, Any]:
    """One interval: the sampled shares (with their 95% Wilson bounds and hit counts) and KVM's
    exact per-second counters, per vCPU and for the VM; with --rip, the guest code."""
    return {
        "pid": snap.pid,
        "seconds": round(snap.seconds, 6),
        "rate_hz": snap.rate_hz,
        "looks": snap.looks,
        "reset_seen": snap.reset_seen,
        "stopped": snap.stopped,
        "kernel": platform.release(),
        "counters": snap.counters,
        "note": snap.note,
        "kvm_entry": snap.entry.as_json() if isinstance(snap.entry, EntryCost) else None,
        **({} if isinstance(snap.entry, EntryCost) else {"kvm_entry_note": snap.entry}),
        "vcpus": {v.label: _vcpu_json(v) for v in snap.vcpus},
        "vm": _vcpu_json(snap.vm),
        "top_ports": [_site_json(s) for s in snap.top_ports],
        "top_addresses": [_site_json(s) for s in snap.top_addresses],
        **({"guest_code": guest_code_json(snap, symbols)} if snap.rip else {}),
    }


def entry_line(entry: EntryCost | str) -> str:
    """What the VMM shares hold besides the VMM: KVM's work at each exit before it resets (and
    after it sets) exit_reason."""
    if isinstance(entry, EntryCost):
        return (
            f"KVM's own part of each exit: {entry.text()}, timed on a VM of kvmtop's own; "
            f"another VM's may be\nanything up to {entry.at_most_ns / 1e3:.1f} µs: the VMM's "
            "shares include it, THE VMM'S OWN bounds it out"
        )
    return (f"KVM's own part of each exit, in the VMM's shares: {entry}; "
            "the VMM's own time is not bounded below")  # fmt: skip


def bound_text(bound: Bound | None) -> str:
    """``"41-47%"``: a share's 95% bound net of KVM's part; ``"?"`` where not known."""
    if bound is None:
        return "?"
    return f"{100 * bound.low:.0f}-{100 * bound.high:.0f}%"


def guest_code_lines(snap: WatchSnapshot, symbols: GuestSymbols | None) -> list[str]:
    """--rip: per vCPU and reason, the guest code the VMM's sampled time went to."""
    if not snap.rip:
        return []
    named = f" (symbols: {symbols.source})" if symbols is not None else ""
    lines = ["", f"TOP GUEST CODE BY VMM TIME (sampled at the exits, --rip){named}"]
    if snap.code_note:
        lines.append(f"  {snap.code_note}")
    for v in (*snap.vcpus, snap.vm):
        if v.code is None:
            continue
        if not v.code.live:
            lines.append(f"{v.label:>12}  (no look has seen it enter KVM_RUN since its "
                         "kvm_valid_regs was set: no RIP counted yet)")  # fmt: skip
        for code in v.code.top:
            lines.append(f"{v.label:>12}  {code.reason:<24} {code.share.text():>13}  "
                         f"{code_text(code, symbols)}")  # fmt: skip
    return lines


def snapshot_text(snap: WatchSnapshot, symbols: GuestSymbols | None = None) -> str:
    per_s = snap.looks / snap.seconds if snap.seconds else 0.0
    lines = [
        f"pid {snap.pid}  watched, not traced: {len(snap.vcpus)} vCPU(s), {snap.seconds:.2f} s, "
        f"{human(per_s)} looks/s ({human(snap.rate_hz)} asked)",
        "exits/s: KVM's counters (exact); shares of time: sampled, ± its 95% bound",
    ]
    if snap.reset_seen:
        lines.append(f"kernel {platform.release()}: exit_reason reset at KVM_RUN entry (seen)")
    if snap.note:
        lines.append(snap.note)
    lines.append(entry_line(snap.entry))
    lines += ["", f"{'VCPU':>12}  {'EXITS/s':>9}  {'IN KVM_RUN':>13}  {'IN THE VMM':>13}  "
                  "THE VMM'S OWN (net of KVM's part, 95%)"]  # fmt: skip
    for v in (*snap.vcpus, snap.vm):
        rate = human(v.exits_per_s) if v.exits_per_s is not None else "-"
        stale = f"  ({v.stale} looks: in KVM_RUN, stale reason)" if v.stale else ""
        lines.append(f"{v.label:>12}  {rate:>9}  {v.in_run.text():>13}  {v.vmm.text():>13}  "
                     f"{bound_text(v.vmm_own):>8}{stale}")  # fmt: skip
    if any(v.vmm_own is None for v in snap.vcpus):
        lines.append("  ?: not known without KVM's counters and KVM's part timed")
    lines += ["", "VMM TIME BY EXIT REASON (sampled)"]
    for v in (*snap.vcpus, snap.vm):
        for label, share in v.by_reason.items():
            bound = v.mean_vmm_bounds.get(label)
            per_exit = (f"  {duration(round(bound.low))}-{duration(round(bound.high))}/exit"
                        if bound is not None else "")  # fmt: skip
            lines.append(f"{v.label:>12}  {label:<24} {share.text():>13}{per_exit}")
    for title, sites in (("TOP IO PORTS BY VMM TIME", snap.top_ports),
                         ("TOP MMIO ADDRESSES BY VMM TIME", snap.top_addresses)):  # fmt: skip
        if sites:
            lines += ["", title]
            lines += [f"  {s.label:<28} {s.share.text():>13}" for s in sites]
    return "\n".join(lines + guest_code_lines(snap, symbols))
