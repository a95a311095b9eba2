"""KVM's own work at each exit that samples of ``kvm_run`` count as the VMM's, on this host.

A look sees an exit reason from the moment KVM sets it until KVM resets it at the next
``KVM_RUN``, and KVM resets it only once its entry work is done (loading the vCPU, completing an
emulated instruction): so besides the VMM's handling, the samples hold that head of each
``KVM_RUN`` and the tail after KVM set the reason. Both are a property of the host, not of the
VM: kvmtop times them once on a VM of its own (``kvmtop.native._sampler.entry_cost``), in a few batches
some ms apart, and keeps the median over batches of each batch's median (the runs its threads
were preempted in, on a busy host, are the outliers; a busy moment spoils a batch, not the
figure: on a host whose CPUs are all busy, 1 batch in 3 to 1 in 2 is spoilt, so more are tried,
up to :data:`MAX_BATCHES`), so that a VMM time per exit can be told net of them. Where they cannot be timed
(no native module, no ``/dev/kvm`` for kvmtop, one CPU) the reason says why. Only a timing is
kept: a host too busy to time it now (its CPUs all taken, so the watching thread rarely runs
beside the vCPU's) is tried again at the next call.

The timing is of one VM in one pattern (exits back to back, on one CPU), and another VM's part
is not the same: on one quiet host, with the timing at 7.4-7.6 µs, VMMs that handle their exits
differently showed 1.6 µs (a C VMM spinning 20 µs per exit), 16 µs (one handling none) and
21 µs (MMIO exits of a mix); a VMM whose thread sleeps between exits, or moves between CPUs,
adds a few µs (a C VMM sleeping 1 ms: 8.6 µs per run, 15.6 µs moved each time, against 7.9
back to back); a Python VMM's own clock around its ioctl call counts the interpreter's call as
KVM's, 5-25 µs after a sleep, so it is no truth for this figure; the timing itself moved
from 3.6 to 12.9 µs between days. So the bounds take KVM's part of any exit to lie between
nothing and :data:`AT_MOST_FACTOR` times the timing, never at the timed point.
"""

from __future__ import annotations

import os
import statistics
import time
from array import array
from dataclasses import dataclass

from kvmtop import native

RUNS = 600  # a batch: about 6 ms of KVM_RUN on a host whose runs take 10 µs
BATCHES = 5  # batches timed whole wanted...
MIN_BATCHES = 3  # ...and the fewest the figure may come from
MAX_BATCHES = 25  # batches tried at most (about 1 s on a busy host)
GAP_S = 0.02  # between batches
MIN_TIMED = 100  # runs of a batch the watching thread must have seen whole (it shares the CPUs)
AT_MOST_FACTOR = 3.0  # a VM's part of an exit, at most, over the timed one (see above)


@dataclass(frozen=True, slots=True)
class EntryCost:
    """Nanoseconds per exit inside ``KVM_RUN`` while ``exit_reason`` still reads non-zero (the
    medians of the timed runs)."""

    head_ns: float  # from the call of KVM_RUN to KVM's reset of exit_reason
    tail_ns: float  # from KVM's setting the next exit's reason to KVM_RUN's return
    timed: int  # the runs these figures are of

    @property
    def ns(self) -> float:
        return self.head_ns + self.tail_ns

    @property
    def at_most_ns(self) -> float:
        """The most the bounds allow KVM's part of one exit of any VM to be."""
        return AT_MOST_FACTOR * self.ns

    def text(self) -> str:
        return (f"{self.ns / 1e3:.1f} µs (entry {self.head_ns / 1e3:.1f}, "
                f"return {self.tail_ns / 1e3:.1f})")  # fmt: skip

    def as_json(self) -> dict[str, float | int]:
        return {"ns": round(self.ns), "head_ns": round(self.head_ns),
                "tail_ns": round(self.tail_ns), "runs": self.timed,
                "at_most_ns": round(self.at_most_ns)}  # fmt: skip


_timed: EntryCost | None = None  # this process's timing, once there is one


def measure() -> EntryCost | str:
    """This host's entry cost, timed once per process; else why it could not be (this time)."""
    global _timed
    if _timed is None:
        result = _time(RUNS, BATCHES, MAX_BATCHES)
        if isinstance(result, str):
            return result
        _timed = result
    return _timed


def _time(runs: int, batches: int, tries: int) -> EntryCost | str:
    # a fact of the host, not a path of the engine: timed with KVMTOP_PURE set too
    _sampler = native.built("_sampler")
    if _sampler is None:
        return "not timed: kvmtop.native._sampler is not built"
    if len(os.sched_getaffinity(0)) < 2:
        return "not timed: it takes two CPUs (one runs a vCPU, one watches it)"
    heads: list[float] = []
    tails: list[float] = []
    timed = 0
    for batch in range(max(batches, tries)):
        if len(heads) == batches:
            break
        if batch:
            time.sleep(GAP_S)
        try:
            head_bytes, tail_bytes, _run_ns = _sampler.entry_cost(runs)
        except OSError as exc:
            return f"not timed: kvmtop cannot run a VM of its own (/dev/kvm: {exc.strerror or exc})"
        batch_heads, batch_tails = array("I", head_bytes), array("I", tail_bytes)
        if len(batch_heads) >= min(runs, MIN_TIMED):
            heads.append(statistics.median(batch_heads))
            tails.append(statistics.median(batch_tails))
            timed += len(batch_heads)
    if len(heads) < min(batches, MIN_BATCHES):
        return (f"not timed: too few of {(batch + 1) * runs} runs were seen whole "
                "(a busy host)")  # fmt: skip
    return EntryCost(statistics.median(heads), statistics.median(tails), timed)
