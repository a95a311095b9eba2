"""The aggregate: exact counts, rates, timelines, latency attribution, bounded memory."""

from __future__ import annotations

import random
import sys

from kvmtop.events import ExitBatch, ExitEvent, VcpuSeen
from kvmtop.stats import LOG2_BUCKETS, ExitStats, LatencyHistogram

S = 1_000_000_000


def io(vcpu: int, entry: int, exit_: int, port: int = 0x80, out: bool = True) -> ExitEvent:
    return ExitEvent(vcpu, 2, 0, entry, exit_, port, 1 | 1 << 8, int(out))


def test_counts_per_vcpu_and_reason_with_handling_time_on_the_previous_exit() -> None:
    stats = ExitStats()
    stats.add_batch(ExitBatch(
        (
            io(0, 10 * S, 10 * S + 100),  # guest 100 ns
            ExitEvent(0, 6, 0, 10 * S + 1100, 10 * S + 1400, 0xC0000, 4, 1),  # IO handled in 1000 ns
            ExitEvent(0, 5, 0, 10 * S + 1700, 10 * S + 2000),  # MMIO handled in 300 ns
            ExitEvent(1, 0, 4, 10 * S + 50, 10 * S + 60),  # EINTR on vCPU 1
        ),
        (VcpuSeen(0, 777, 0), VcpuSeen(1, 0, 0)),
        stops=8,
    ))  # fmt: skip
    snap = stats.snapshot(11 * S)
    assert snap.total == 4 and snap.stops == 8 and snap.lost == 0
    assert {r.label: r.count for r in snap.reasons} == {
        "KVM_EXIT_IO": 1, "KVM_EXIT_MMIO": 1, "KVM_EXIT_HLT": 1, "KVM_EXIT_INTR": 1,
    }  # fmt: skip
    v0 = snap.vcpus[0]
    assert (v0.vcpu, v0.tid, v0.total) == (0, 777, 3)
    by_label = {r.label: r for r in v0.reasons}
    assert by_label["KVM_EXIT_IO"].guest.max_ns == 100
    assert (
        by_label["KVM_EXIT_IO"].handling.count == 1
        and by_label["KVM_EXIT_IO"].handling.max_ns == 1000
    )
    assert by_label["KVM_EXIT_MMIO"].handling.max_ns == 300
    assert by_label["KVM_EXIT_HLT"].handling.count == 0  # not handled yet
    assert [(p.port, p.direction, p.size, p.count) for p in snap.io] == [(0x80, "out", 1, 1)]
    assert [(m.address, m.length, m.write, m.count) for m in snap.mmio] == [(0xC0000, 4, True, 1)]
    assert snap.vcpus[1].tid is None and snap.vcpus[1].total == 1


def test_rates_and_timeline_use_the_last_whole_second() -> None:
    stats = ExitStats()
    events = [io(0, t, t + 1) for t in range(100 * S, 101 * S, S // 50)]  # 50 in second 100
    events += [ExitEvent(0, 5, 0, t, t + 1) for t in range(101 * S, 102 * S, S // 20)]  # 20 HLT
    stats.add_events(events)
    snap = stats.snapshot(102 * S + S // 2)
    v = snap.vcpus[0]
    assert v.rate == 20.0
    assert v.timeline[-3:] == (50, 20, 0) and len(v.timeline) == 60
    assert v.timeline_dominant[-3:] == ("KVM_EXIT_IO", "KVM_EXIT_HLT", None)
    assert v.timeline_by_reason["KVM_EXIT_IO"][-3:] == (50, 0, 0)
    assert {r.label: r.rate for r in snap.reasons} == {"KVM_EXIT_IO": 0.0, "KVM_EXIT_HLT": 20.0}
    later = stats.snapshot(300 * S)  # two minutes on: everything has left the timeline
    assert sum(later.vcpus[0].timeline) == 0 and later.vcpus[0].rate == 0


def test_percentiles_come_from_log2_buckets_within_a_bucket_width() -> None:
    stats = ExitStats()
    values = [1000] * 98 + [50_000, 1_000_000]
    stats.add_events(io(0, i * 10**7, i * 10**7 + v) for i, v in enumerate(values))
    hist = stats.snapshot().reasons[0].guest
    assert (hist.count, hist.min_ns, hist.max_ns, hist.total_ns) == (
        100,
        1000,
        1_000_000,
        sum(values),
    )
    assert 512 <= hist.median <= 2047 and hist.median >= hist.min_ns
    assert 32768 <= hist.p99 <= 65535
    assert hist.percentile(1.0) == 1_000_000
    assert sum(hist.buckets) == 100 and len(hist.buckets) == LOG2_BUCKETS
    assert LatencyHistogram(0, 0, 0, 0, (0,) * LOG2_BUCKETS).p99 == 0


def test_memory_stays_bounded_however_many_keys_and_exits() -> None:
    stats = ExitStats(top_capacity=64, recent_capacity=100)
    rng = random.Random(1)
    for chunk in range(10):
        batch = tuple(
            ExitEvent(rng.randrange(4), 6, 0, t, t + 5, rng.randrange(1 << 40), 4, 1)
            for t in range(chunk * 20_000 * 1000, (chunk + 1) * 20_000 * 1000, 1000)
        )
        stats.add_batch(ExitBatch(batch))
    snap = stats.snapshot(top=None)
    assert snap.total == 200_000
    assert len(snap.mmio) == 64 and not snap.top_exact  # capped, and it says so
    assert all(len(v.mmio) == 64 for v in snap.vcpus)
    assert all(len(stats.vcpu_snapshot(v.vcpu, snap.now_ns).recent) == 100 for v in snap.vcpus)
    assert sys.getsizeof(stats._mmio.counts) < 10_000


def test_top_counts_are_exact_below_capacity() -> None:
    stats = ExitStats(top_capacity=8)
    stats.add_events(
        io(0, i, i + 1, port=p) for i, p in enumerate([0x70] * 5 + [0x71] * 3 + [0x3F8])
    )
    snap = stats.snapshot()
    assert [(p.port, p.count) for p in snap.io] == [(0x70, 5), (0x71, 3), (0x3F8, 1)]
    assert snap.top_exact
