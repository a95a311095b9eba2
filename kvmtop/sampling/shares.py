"""Where each vCPU's time goes, estimated from looks at its ``struct kvm_run``: pure.

A look (:mod:`kvmtop.sampling.sampler`) sees ``exit_reason`` 0 while the vCPU is inside ``KVM_RUN`` (the
kernel resets it at entry), else the exit the VMM is handling, with its IO port or MMIO address.
Looks at a steady, jittered rate make the share of looks that saw a reason an unbiased estimate
of the share of time the VMM spent handling that reason; each share here carries its 95% Wilson
score interval from the number of looks. KVM's own counters (exact) give the exits; a reason's
VMM share times the interval over its exit count is its mean VMM time per exit, less the part of
each exit's ``KVM_RUN`` that looks also see a reason in (:mod:`kvmtop.sampling.entry_cost`), when timed.

What the VMM itself spent is bounded, not guessed (:func:`vmm_own_bound`): at least the low end
of the looks' share less the most KVM's part of every exit KVM counted can be, at most the high
end (KVM's part is never less than nothing). Where KVM's part was not timed, or KVM's counters
are not held, the low end is not known and the bound says so (``None``).

The looks themselves can move the truth: a look made on the CPU the vCPU's thread runs on keeps
that thread off it while the sampler runs, the VMM frozen in the state the look saw, and no look
sees that stretch (the sampler is busy making it). Beside one busy CPU, a C VMM's MMIO handling
came out 2-6 standard errors above the looks' share (the Python sampler's looks take about
25 µs of CPU each). The sampler counts its CPU time, and the watch the VMM's threads' wait for
a CPU, which caps it (a thread kept off its CPU waits for it): the bounds allow for that
(:class:`Stretch`): a state's time is at most its share plus the sampler's CPU after looks that
saw it, and at least its share of the time the sampler did not take.

With guest RIPs (``watch --rip``), the looks that saw the VMM handling an exit also saw the
guest's RIP at it: each RIP's share of a vCPU's looks (those since its RIPs were counted) is
the share of time the VMM spent on exits at that guest code, with the same bounds
(:class:`CodeShare`).

:class:`Tally` adds up what the sampler took (bounded: a fixed number of keys per vCPU), and
:func:`estimate` turns a tally and two counter samples into a :class:`WatchSnapshot`. No I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmtop.abi.arch import HOST
from kvmtop.abi.mmio_names import MmioNames
from kvmtop.decoder import exit_label
from kvmtop.model.vcpu_keys import VcpuKey
from kvmtop.sampling.entry_cost import EntryCost
from kvmtop.xlat_exit import ExitReason

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval
KEY_TORN = 0xFFFFFFFFFFFFFFFE  # a look the VMM's next entry raced: the reason, no key
KEY_OTHER = 0xFFFFFFFFFFFFFFFF  # a key beyond the sampler's table
MMIO_WRITE = 1 << 63  # in an MMIO key, beside the address: the look saw kvm_run.mmio.is_write
HISTORY = 60  # intervals of each vCPU's VMM share kept for a timeline
MAX_KEYS = 4096  # (reason, key) pairs a tally keeps per vCPU; more are counted as OTHER
# the KVM counter that counts the exits of a reason (to give a mean time per exit)
COUNTER_OF_REASON = {"KVM_EXIT_IO": "io_exits", "KVM_EXIT_MMIO": "mmio_exits"}
STRETCH_REASONS = 64  # as sampler.c: the sampler's CPU after looks at reasons from 63 up is one sum


@dataclass(frozen=True, slots=True)
class Share:
    """``hits`` of ``samples`` looks: the share, and its 95% Wilson score interval."""

    hits: int
    samples: int

    @property
    def value(self) -> float:
        return self.hits / self.samples if self.samples else 0.0

    @property
    def low(self) -> float:
        return self._bounds()[0]

    @property
    def high(self) -> float:
        return self._bounds()[1]

    @property
    def half_width(self) -> float:
        low, high = self._bounds()
        return (high - low) / 2

    def _bounds(self) -> tuple[float, float]:
        n = self.samples
        if not n:
            return 0.0, 1.0
        p = self.hits / n
        z2 = Z95 * Z95
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        # exactly 0 (1) when no (every) look hit, not a rounding error off it
        low = 0.0 if self.hits == 0 else max(0.0, centre - half)
        return low, 1.0 if self.hits == n else min(1.0, centre + half)

    def text(self) -> str:
        """``"46.2% ±0.4"``: the share and the half width of its interval, in percent."""
        return f"{100 * self.value:.1f}% ±{100 * self.half_width:.1f}"


@dataclass(frozen=True, slots=True)
class Bound:
    """A 95% bound of something the looks estimate, net of KVM's part of each exit."""

    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Stretch:
    """The most the sampler's own looks can have stretched a vCPU's time, as shares of it: all
    of it (``all``: the sampler's CPU time), and the state a bound is of (``seen``: its CPU time
    after the looks that saw that state)."""

    all: float = 0.0
    seen: float = 0.0


def vmm_own_bound(share: Share, span_ns: float, exits: float | None, entry: EntryCost | str,
                  stretch: Stretch = Stretch()) -> Bound | None:  # fmt: skip
    """The VMM's own ns in ``span_ns`` of vCPU time whose looks gave ``share``, with ``exits``
    exits in that span: at least the share's low end of the time the sampler did not take less
    KVM's part of every exit at its most, at most its high end plus the sampler's stretch of
    it. None where the low end cannot be known (KVM's part not timed, or no count of the
    exits)."""
    if not isinstance(entry, EntryCost) or exits is None:
        return None
    low = share.low * max(0.0, 1.0 - stretch.all) * span_ns - exits * entry.at_most_ns
    return Bound(max(0.0, low), min(1.0, share.high + stretch.seen) * span_ns)


@dataclass(frozen=True, slots=True)
class SiteShare:
    """An IO port (and direction) or MMIO address, by the VMM's time on its exits."""

    reason: str
    key: int  # IO: port | out << 16; MMIO: the guest-physical address
    share: Share
    write: bool | None = None  # MMIO: the looks saw a write (None: IO)
    name: str = ""  # MMIO: what the address is (:mod:`kvmtop.abi.mmio_names`), "" when not known

    @property
    def direction(self) -> str:
        if self.reason == "KVM_EXIT_IO":
            return "out" if self.key >> 16 else "in"
        return "write" if self.write else "read"

    @property
    def prefix(self) -> str:
        """``"0x0080 out"``, ``"0xfeb02e60 read"``: the label before its name."""
        if self.reason == "KVM_EXIT_IO":
            return f"0x{self.key & 0xFFFF:04x} {self.direction}"
        return f"0x{self.key:x} {self.direction}"

    @property
    def site_name(self) -> str:
        if self.reason == "KVM_EXIT_IO":
            return HOST.PORT_NAMES.get(self.key & 0xFFFF, "")
        return self.name

    @property
    def label(self) -> str:
        name = self.site_name
        return f"{self.prefix} {name}" if name else self.prefix


@dataclass(frozen=True, slots=True)
class CodeShare:
    """Guest code the looks saw the VMM handling exits of ``reason`` at: its share of the looks
    made while the vCPU's RIPs were counted, with its 95% bound."""

    reason: str
    rip: int
    linear: int  # cs.base + rip outside 64-bit code
    cpl: int  # -1: not known
    share: Share


@dataclass(frozen=True, slots=True)
class CodeWatch:
    """A vCPU's (or the VM's) guest code at its exits, sampled: the top RIPs of each reason."""

    looks: int  # the looks since its RIPs were counted, but the unstable ones: the denominator
    unstable: int  # looks whose two reads of exit_reason and RIP differed: not kept
    live: bool  # counted (else waiting for a look inside KVM_RUN since kvm_valid_regs was set)
    top: tuple[CodeShare, ...]  # per reason (largest reason first), each its top RIPs


@dataclass(frozen=True, slots=True)
class VcpuWatch:
    label: str  # the vCPU id, or PID:VM:VCPU with several VMs (as the tracer's views)
    key: VcpuKey | None
    samples: int
    in_run: Share  # of the looks, inside KVM_RUN (the guest, or KVM handling the exit)
    vmm: Share  # out of KVM_RUN: the VMM handling an exit
    by_reason: dict[str, Share]  # the VMM's time by exit reason, largest first
    kvm_rates: dict[str, float]  # KVM's exact counters per second ("exits", "io_exits"...)
    mean_vmm_ns: dict[str, float]  # a reason's VMM time per exit, where KVM counts its exits,
    # net of KVM's entry cost when that was timed
    history: tuple[float, ...] = ()  # the VMM's share per interval, oldest first
    # the most of the VMM's share that can be KVM's own part of the exits (KVM's part at its
    # most times every exit KVM counted: not every exit reaches the VMM), where both are known
    kvm_part_at_most: float | None = None
    # the VMM's own share, net of KVM's part: its 95% bound; None where the low end is unknown
    vmm_own: Bound | None = None
    # a reason's VMM time per exit, net of KVM's part: its 95% bound, where KVM counts its exits
    mean_vmm_bounds: dict[str, Bound] = field(default_factory=dict)
    stale: int = 0  # looks that saw a reason while KVM said the vCPU was inside KVM_RUN
    code: CodeWatch | None = None  # guest RIPs at its exits (watch --rip), where asked
    # the most the sampler's looks can have stretched, as shares of this span: every state's
    # time (its CPU time), the VMM's, and each reason's (its CPU time after looks that saw it)
    sampler: float = 0.0
    sampler_vmm: float = 0.0
    sampler_by_reason: dict[str, float] = field(default_factory=dict)

    @property
    def exits_per_s(self) -> float | None:
        return self.kvm_rates.get("exits")

    def stretch(self, reason: str | None = None) -> Stretch:
        """What the looks may have stretched: of ``reason``'s time, or of the VMM's (None)."""
        if reason is None:
            return Stretch(self.sampler, self.sampler_vmm)
        return Stretch(self.sampler, self.sampler_by_reason.get(reason, 0.0))


@dataclass(frozen=True, slots=True)
class WatchSnapshot:
    pid: int
    seconds: float  # the span the looks cover
    rate_hz: float  # the rate asked for
    looks: int  # the sampler's rounds over all vCPUs in that span
    vcpus: tuple[VcpuWatch, ...]
    vm: VcpuWatch  # every vCPU's looks together
    top_ports: tuple[SiteShare, ...]
    top_addresses: tuple[SiteShare, ...]
    reset_seen: bool  # a look (the watch's, so far) saw exit_reason 0: the kernel resets it
    note: str = ""  # what is not shown, and why ("KVM's counters: ...", "counters only: ...")
    counters: bool = False  # KVM's counters are held (exits/s are exact)
    entry: EntryCost | str = "not timed"  # KVM's own part of each exit in the looks, or why not
    stopped: bool = False  # the VMM was stopped by a signal at the snapshot
    rip: bool = False  # guest RIPs were asked for (watch --rip)
    code_note: str = ""  # with rip: which vCPUs give none, and why


CodeKey = tuple[int, int, int, int]  # reason, rip, linear, cpl


@dataclass(slots=True)
class _VcpuTally:
    samples: int = 0
    in_run: int = 0  # stale looks included
    keys: dict[tuple[int, int], int] = field(default_factory=dict)
    stale: int = 0
    code: _CodeTally | None = None  # guest RIPs, where asked
    stretch: dict[int, int] = field(default_factory=dict)  # the sampler's CPU ns after its looks


@dataclass(slots=True)
class _CodeTally:
    looks: int = 0
    unstable: int = 0
    live: bool = False
    rips: dict[CodeKey, int] = field(default_factory=dict)

    def add(self, looks: int, unstable: int, rips: Iterable[tuple[int, int, int, int, int]],
            live: bool) -> None:  # fmt: skip
        self.looks += looks
        self.unstable += unstable
        self.live = self.live or live
        for reason, rip, linear, cpl, n in rips:
            k = (reason, rip, linear, cpl)
            if k not in self.rips and len(self.rips) >= MAX_KEYS:
                k = (reason, KEY_OTHER, KEY_OTHER, -1)
            self.rips[k] = self.rips.get(k, 0) + n


class Tally:
    """What the sampler took, added up per vCPU (by index): bounded by :data:`MAX_KEYS`."""

    def __init__(self, vcpus: int) -> None:
        self.looks = 0
        self.ns = 0
        self.cpu_ns = 0  # the sampler's own CPU time
        self.vmm_wait_ns: int | None = None  # the VMM's threads' wait for a CPU (None: not known)
        self.vcpus = [_VcpuTally() for _ in range(vcpus)]
        self.reset_seen = False

    def add(self, taken: Any) -> None:
        """A sampler's ``take()``: (ns, looks, per vCPU (samples, in_run, (reason, key, n)...,
        stale, code, (reason, cpu_ns)...), cpu_ns), code None or (looks, unstable, (reason, rip,
        linear, cpl, n)..., live) (:data:`kvmtop.sampling.sampler.Taken`)."""
        ns, looks, vcpus, cpu_ns = taken
        self.ns += ns
        self.looks += looks
        self.cpu_ns += cpu_ns
        for tally, (samples, in_run, keys, stale, code, stretch) in zip(self.vcpus, vcpus,
                                                                        strict=False):  # fmt: skip
            for reason, n in stretch:
                reason = min(reason, STRETCH_REASONS - 1)
                tally.stretch[reason] = tally.stretch.get(reason, 0) + n
            tally.samples += samples
            tally.in_run += in_run
            tally.stale += stale
            if code is not None:
                tally.code = tally.code or _CodeTally()
                tally.code.add(*code)
            # a stale look (a vCPU blocked in KVM_RUN) says nothing of the reset
            self.reset_seen = self.reset_seen or in_run > stale
            for reason, key, n in keys:
                k = (reason, key)
                if k not in tally.keys and len(tally.keys) >= MAX_KEYS:
                    k = (reason, KEY_OTHER)
                tally.keys[k] = tally.keys.get(k, 0) + n


def _reason_shares(keys: Mapping[tuple[int, int], int], samples: int) -> dict[str, Share]:
    hits: dict[str, int] = {}
    for (reason, _key), n in keys.items():
        label = exit_label(reason, 0)
        hits[label] = hits.get(label, 0) + n
    return {label: Share(n, samples) for label, n in sorted(hits.items(), key=lambda kv: -kv[1])}


def _stretch_by_reason(stretch: Mapping[int, int], span_ns: float, cap: float
                       ) -> dict[str, float]:  # fmt: skip
    """The sampler's CPU after looks at each reason, at most ``cap``, as shares of ``span_ns``."""
    ns_by_label: dict[str, float] = {}
    for reason, ns in stretch.items():
        label = exit_label(reason, 0)
        ns_by_label[label] = ns_by_label.get(label, 0.0) + ns
    return {label: min(ns, cap) / span_ns if span_ns > 0 else 0.0
            for label, ns in ns_by_label.items()}  # fmt: skip


def _mean_vmm_ns(by_reason: Mapping[str, Share], rates: Mapping[str, float], vcpus: int,
                 entry: EntryCost | str, sampler: float, sampler_by_reason: Mapping[str, float]
                 ) -> tuple[dict[str, float], dict[str, Bound]]:  # fmt: skip
    """VMM time per exit: its share of each vCPU-second, times the vCPUs the share is of, over
    its exits per second (summed over those vCPUs), less KVM's own part of each exit as timed;
    and its bound (KVM's part anywhere from nothing to its most, the sampler's stretch too)."""
    entry_ns = entry.ns if isinstance(entry, EntryCost) else 0.0
    means, bounds = {}, {}
    for label, share in by_reason.items():
        per_s = rates.get(COUNTER_OF_REASON.get(label, ""), 0.0)
        if per_s > 0:
            means[label] = max(0.0, share.value * vcpus * 1e9 / per_s - entry_ns)
            stretch = Stretch(sampler, sampler_by_reason.get(label, 0.0))
            own = vmm_own_bound(share, vcpus * 1e9, per_s, entry, stretch)
            if own is not None:
                bounds[label] = Bound(own.low / per_s, own.high / per_s)
    return means, bounds


def _vcpu_watch(label: str, key: VcpuKey | None, tally: _VcpuTally, rates: Mapping[str, float],
                history: Iterable[float] = (), vcpus: int = 1,
                entry: EntryCost | str = "not timed", top: int = 8,
                sampler_ns: tuple[int, int, int | None] = (0, 0, None)) -> VcpuWatch:  # fmt: skip
    """One vCPU's estimates, or (``vcpus`` > 1) the VM's: the looks of that many vCPUs;
    ``sampler_ns``: the sampler's CPU time, the span it is of, and the VMM's threads' wait for
    a CPU in it (None: not known), which caps every stretch: a thread the sampler keeps off its
    CPU waits for it."""
    n = tally.samples
    cpu_ns, span_ns, wait_ns = sampler_ns
    cap = float("inf") if wait_ns is None else wait_ns
    # at most one vCPU thread is kept off its CPU at a time: the VM's share is over its vCPUs
    sampler = min(1.0, min(cpu_ns, cap) / span_ns / vcpus) if span_ns > 0 else 0.0
    sampler_by_reason = _stretch_by_reason(tally.stretch, span_ns * vcpus, cap)
    seen_ns = min(sum(tally.stretch.values()), cap)
    sampler_vmm = seen_ns / span_ns / vcpus if span_ns > 0 else 0.0
    by_reason = _reason_shares(tally.keys, n)
    means, mean_bounds = _mean_vmm_ns(by_reason, rates, vcpus, entry, sampler, sampler_by_reason)
    vmm = Share(n - tally.in_run, n)
    exits = rates.get("exits")
    own = vmm_own_bound(vmm, vcpus * 1e9, exits, entry, Stretch(sampler, sampler_vmm))
    at_most = entry.at_most_ns if isinstance(entry, EntryCost) else 0.0
    kvm_part = min(vmm.value, exits * at_most / 1e9 / vcpus) if exits and at_most else None
    return VcpuWatch(label, key, n, Share(tally.in_run, n), vmm, by_reason, dict(rates), means,
                     tuple(history), kvm_part,
                     Bound(own.low / 1e9 / vcpus, own.high / 1e9 / vcpus) if own else None,
                     mean_bounds, tally.stale, _code_watch(tally.code, top), sampler,
                     sampler_vmm, sampler_by_reason)  # fmt: skip


def _code_watch(tally: _CodeTally | None, top: int) -> CodeWatch | None:
    """The top ``top`` RIPs of each reason (a reason with more looks first)."""
    if tally is None:
        return None
    by_reason: dict[int, list[tuple[CodeKey, int]]] = {}
    for k, n in tally.rips.items():
        if k[1] != KEY_OTHER:
            by_reason.setdefault(k[0], []).append((k, n))
    rows: list[CodeShare] = []
    for reason, counts in sorted(by_reason.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        for (_r, rip, linear, cpl), n in sorted(counts, key=lambda kn: (-kn[1], kn[0]))[:top]:
            rows.append(CodeShare(exit_label(reason, 0), rip, linear, cpl, Share(n, tally.looks)))
    return CodeWatch(tally.looks, tally.unstable, tally.live, tuple(rows))


def _sites(
    tallies: Iterable[_VcpuTally], samples: int, reason: int, top: int, names: MmioNames
) -> tuple[SiteShare, ...]:
    hits: dict[int, int] = {}
    for tally in tallies:
        for (r, key), n in tally.keys.items():
            if r == reason and key not in (KEY_TORN, KEY_OTHER):
                hits[key] = hits.get(key, 0) + n
    ranked = sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    label = exit_label(reason, 0)
    if reason != ExitReason.MMIO:
        return tuple(SiteShare(label, key, Share(n, samples)) for key, n in ranked)
    return tuple(
        SiteShare(label, key & ~MMIO_WRITE, Share(n, samples), bool(key & MMIO_WRITE),
                  names.name(key & ~MMIO_WRITE))
        for key, n in ranked
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class WatchedVcpu:
    """A vCPU the watch maps: its label, key and the counters' name for it (its vCPU id)."""

    label: str
    key: VcpuKey | None
    vcpu_id: int


def estimate(pid: int, rate_hz: float, tally: Tally, vcpus: tuple[WatchedVcpu, ...],
             vcpu_rates: Mapping[int, Mapping[str, float]], vm_rates: Mapping[str, float],
             histories: Mapping[int, deque[float]] | None = None, top: int = 8,
             note: str = "", counters: bool = False, entry: EntryCost | str = "not timed",
             stopped: bool = False, names: MmioNames | None = None) -> WatchSnapshot:  # fmt: skip
    """The estimates of one tally: per vCPU (``vcpu_rates`` by vCPU id, KVM's per-second rates),
    for the whole VM (``vm_rates``: the vCPU counters summed), and the busiest sites (MMIO
    addresses named by ``names``: the VMM's command line, the well-known x86 ranges)."""
    names = names or MmioNames()
    histories = histories or {}
    sampler_ns = (tally.cpu_ns, tally.ns, tally.vmm_wait_ns)
    rows = tuple(
        _vcpu_watch(
            v.label,
            v.key,
            t,
            vcpu_rates.get(v.vcpu_id, {}),
            histories.get(i, ()),
            1,
            entry,
            top,
            sampler_ns,
        )  # fmt: skip
        for i, (v, t) in enumerate(zip(vcpus, tally.vcpus, strict=True))
    )
    whole = _VcpuTally(sum(t.samples for t in tally.vcpus), sum(t.in_run for t in tally.vcpus),
                       stale=sum(t.stale for t in tally.vcpus))  # fmt: skip
    for t in tally.vcpus:
        for k, n in t.keys.items():
            whole.keys[k] = whole.keys.get(k, 0) + n
        for reason, n in t.stretch.items():
            whole.stretch[reason] = whole.stretch.get(reason, 0) + n
        if t.code is not None:
            whole.code = whole.code or _CodeTally()
            whole.code.add(t.code.looks, t.code.unstable,
                           ((*k, n) for k, n in t.code.rips.items()), t.code.live)  # fmt: skip
    return WatchSnapshot(
        pid, tally.ns / 1e9, rate_hz, tally.looks, rows,
        _vcpu_watch("all", None, whole, vm_rates, (), len(rows), entry, top, sampler_ns),
        _sites(tally.vcpus, whole.samples, int(ExitReason.IO), top, names),
        _sites(tally.vcpus, whole.samples, int(ExitReason.MMIO), top, names),
        tally.reset_seen, note, counters, entry, stopped,
    )  # fmt: skip
