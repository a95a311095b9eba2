"""KVM's counters as Prometheus metric families: pure, from the kernel's stats descriptors and a
sample (:mod:`kvmtop.commands.exporter` serves them).

Metric names come from the kernel's stats descriptors, in base units: ``exits`` is
``kvm_vcpu_exits_total``; ``halt_wait_ns`` (seconds, exponent -9) counts seconds. A histogram
(``halt_wait_hist``) is ``kvm_vcpu_halt_wait_seconds``; the counter of the same measure
(``halt_wait_ns``) is its ``_sum``, not a family of its own (they would share a name).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from kvmtop.abi.binary_stats import CUMULATIVE, StatDesc, Values
from kvmtop.counters.vm_stats import StatsSample
from kvmtop.sampling.shares import WatchSnapshot

_go_float = cast(Callable[[float], str], floatToGoString)  # le as Go prints it: 1e-09, +Inf

VCPU_LABELS = ("pid", "vm", "vcpu")
REASON_LABELS = (*VCPU_LABELS, "reason")
VM_LABELS = ("pid", "vm")

# A kernel name's unit suffix, replaced by the base unit Prometheus names end with.
_UNIT_SUFFIXES = {
    "seconds": ("_ns", "_us", "_ms", "_seconds", "_s"),
    "bytes": ("_bytes",),
    "cycles": ("_cycles",),
}


# --- metric families from samples (pure) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricPlan:
    """How one kernel stat is exposed: ``family`` is the name without ``_total``."""

    family: str
    kind: str  # "counter", "gauge" or "histogram"
    desc: StatDesc
    sum_desc: StatDesc | None = None  # a histogram's sum: the counter of the same measure


def _measure(desc: StatDesc) -> str:
    """The stat's name without its unit or ``_hist`` suffix: ``halt_wait_ns`` -> ``halt_wait``."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", desc.name)
    name = name.removesuffix("_hist") if desc.histogram else name
    for suffix in _UNIT_SUFFIXES.get(desc.unit, ()):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name.removesuffix(suffix)
    return name


def _family_name(scope: str, desc: StatDesc) -> str:
    unit = desc.unit if desc.unit in _UNIT_SUFFIXES else ""
    return f"kvm_{scope}_{_measure(desc)}" + (f"_{unit}" if unit else "")


@functools.lru_cache(maxsize=16)
def plan_metrics(scope: str, descs: tuple[StatDesc, ...]) -> tuple[MetricPlan, ...]:
    """Every stat of a ``scope`` ("vcpu" or "vm") as a counter, gauge or histogram."""
    counters = {(_measure(d), d.unit): d for d in descs if d.kind == CUMULATIVE and not d.histogram}
    summed = set()
    plans = []
    for d in descs:
        if d.histogram:
            total = counters.get((_measure(d), d.unit))
            if total is not None:
                summed.add(total.name)
            plans.append(MetricPlan(_family_name(scope, d), "histogram", d, total))
    for d in descs:
        if not d.histogram and d.name not in summed:
            kind = "counter" if d.kind == CUMULATIVE else "gauge"
            plans.append(MetricPlan(_family_name(scope, d), kind, d))
    return tuple(plans)


def cumulative_buckets(desc: StatDesc, counts: tuple[int, ...]) -> list[tuple[str, float]]:
    """Prometheus buckets (le, count of values <= le). KVM's bucket i holds whole raw values
    from ``bucket_low(i)`` below ``bucket_low(i + 1)``; its last bucket holds everything above."""
    out = []
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        last = i == len(counts) - 1
        le = float("inf") if last else desc.in_unit(desc.bucket_low(i + 1) - 1)
        out.append((_go_float(le), float(seen)))
    return out


class SampledTotals:
    """A VM's samples of its vCPUs' ``kvm_run`` (``exporter --sampled``), added up over the
    watcher's snapshots: per vCPU id the looks, and per (vCPU id, exit reason) the looks that
    saw the VMM handling it and the seconds they stand for (each snapshot's share of its span,
    so the sum only grows, as a counter must)."""

    def __init__(self) -> None:
        self.samples: dict[int, int] = {}
        self.hits: dict[tuple[int, str], int] = {}
        self.vmm_seconds: dict[tuple[int, str], float] = {}

    def add(self, snap: WatchSnapshot) -> None:
        for v in snap.vcpus:
            vcpu = v.key.vcpu if v.key is not None else int(v.label)
            self.samples[vcpu] = self.samples.get(vcpu, 0) + v.samples
            for reason, share in v.by_reason.items():
                key = (vcpu, reason)
                self.hits[key] = self.hits.get(key, 0) + share.hits
                self.vmm_seconds[key] = self.vmm_seconds.get(key, 0.0) + share.value * snap.seconds


@dataclass(frozen=True, slots=True)
class VmReading:
    """One VM's counters at a scrape, with what names it."""

    pid: int
    vm: str  # QEMU's -name, else the command name
    vcpu_descs: tuple[StatDesc, ...]
    vm_descs: tuple[StatDesc, ...]
    sample: StatsSample
    sampled: SampledTotals | None = None  # with ``--sampled``


def _new_family(plan: MetricPlan, labels: tuple[str, ...]) -> Metric:
    d = plan.desc
    unit = f" ({d.unit})" if d.unit else ""
    text = f"KVM's {d.name}{unit}"
    if plan.kind == "counter":
        return CounterMetricFamily(plan.family, text, labels=labels)
    if plan.kind == "gauge":
        return GaugeMetricFamily(plan.family, text, labels=labels)
    if plan.sum_desc is not None:
        text += f"; sum from {plan.sum_desc.name}"
    return HistogramMetricFamily(plan.family, text, labels=labels)


def _add(family: Metric, plan: MetricPlan, labels: list[str], values: Values) -> None:
    raw = values.get(plan.desc.name)
    if isinstance(family, HistogramMetricFamily):
        if not isinstance(raw, tuple):
            return
        total = values.get(plan.sum_desc.name) if plan.sum_desc is not None else None
        total_s = plan.sum_desc.in_unit(total) if isinstance(total, int) and plan.sum_desc else None
        family.add_metric(labels, cumulative_buckets(plan.desc, raw), total_s)
    elif isinstance(raw, int) and isinstance(family, CounterMetricFamily | GaugeMetricFamily):
        family.add_metric(labels, plan.desc.in_unit(raw))


def build_families(readings: Iterable[VmReading]) -> list[Metric]:
    """One family per kernel stat, with a metric per vCPU (or VM) of every reading."""
    families: dict[str, tuple[Metric, MetricPlan]] = {}

    def family(plan: MetricPlan, labels: tuple[str, ...]) -> Metric:
        if plan.family not in families:
            families[plan.family] = (_new_family(plan, labels), plan)
        return families[plan.family][0]

    for r in readings:
        pid = str(r.pid)
        for plan in plan_metrics("vcpu", r.vcpu_descs):
            for vcpu, values in sorted(r.sample.vcpus.items()):
                _add(family(plan, VCPU_LABELS), plan, [pid, r.vm, str(vcpu)], values)
        for plan in plan_metrics("vm", r.vm_descs):
            _add(family(plan, VM_LABELS), plan, [pid, r.vm], r.sample.vm)
    return [f for f, _plan in families.values()] + sampled_families(readings)


def sampled_families(readings: Iterable[VmReading]) -> list[Metric]:
    """The sampled families, of the readings that have samples (none without ``--sampled``)."""
    sampled = [(r, r.sampled) for r in readings if r.sampled is not None]
    if not sampled:
        return []
    seconds = CounterMetricFamily(
        "kvm_vcpu_vmm_seconds",
        "Seconds the VMM spent handling the vCPU's exits of a reason, "
        "sampled from its kvm_run (estimate: see kvm_vcpu_vmm_samples)",
        labels=REASON_LABELS,
    )
    hits = CounterMetricFamily(
        "kvm_vcpu_vmm_samples",
        "Looks at the vCPU's kvm_run that saw the VMM handling an exit of the reason",
        labels=REASON_LABELS,
    )
    looks = CounterMetricFamily(
        "kvm_vcpu_samples", "Looks at the vCPU's kvm_run (inside KVM_RUN or not)",
        labels=VCPU_LABELS)  # fmt: skip
    for r, totals in sampled:
        for (vcpu, reason), value in sorted(totals.vmm_seconds.items()):
            labels = [str(r.pid), r.vm, str(vcpu), reason]
            seconds.add_metric(labels, value)
            hits.add_metric(labels, totals.hits[(vcpu, reason)])
        for vcpu, n in sorted(totals.samples.items()):
            looks.add_metric([str(r.pid), r.vm, str(vcpu)], n)
    return [seconds, hits, looks]


# --- the fleet ----------------------------------------------------------------------------------
