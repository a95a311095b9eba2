"""The aggregate: exact counts, rates, timelines, latency attribution, bounded memory."""

from __future__ import annotations

import random
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtop.abi.record_layout import EXIT_CYCLE
from kvmtop.aggregate.batch_summary import BUCKETS, bucket_bounds, bucket_of
from kvmtop.aggregate.exits import (
    EMPTY_HISTOGRAM,
    ExitStats,
    LatencyHistogram,
    MeanBound,
    ReasonStats,
    TopCounter,
    bound_text,
    mean_bound,
    reasons_by,
)
from kvmtop.formats.report import net_median_text
from kvmtop.model.events import ExitEvent, GuestRip, VcpuSeen
from kvmtop.model.messages import ExitBatch
from kvmtop.native import PURE_ENV, load

S = 1_000_000_000


@pytest.fixture(autouse=True, params=["native", "pure"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on the C summary and on its pure-Python twin."""
    if request.param == "pure":
        monkeypatch.setenv(PURE_ENV, "1")
    elif load("_summary") is None:
        pytest.skip("kvmtop.native._summary is not built")
    return str(request.param)


def io(vcpu: int, entry: int, exit_: int, port: int = 0x80, out: bool = True) -> ExitEvent:
    return ExitEvent(vcpu, 2, 0, entry, exit_, port, 1 | 1 << 8, int(out))


def test_counts_per_vcpu_and_reason_with_handling_time_on_the_previous_exit() -> None:
    stats = ExitStats()
    stats.add_batch(ExitBatch.of(
        (
            io(0, 10 * S, 10 * S + 100),  # guest 100 ns
            ExitEvent(0, 6, 0, 10 * S + 1100, 10 * S + 1400, 0xC0000, 4, 1),  # IO handled in 1000 ns
            ExitEvent(0, 5, 0, 10 * S + 1700, 10 * S + 2000),  # MMIO handled in 300 ns
            ExitEvent(1, 0, 4, 10 * S + 50, 10 * S + 60),  # EINTR on vCPU 1
        ),
        0,
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


def test_percentiles_come_from_buckets_an_eighth_of_their_value_wide() -> None:
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
    assert 1000 <= hist.median <= 1023  # 1000 is in [960, 1023], and no value is below 1000
    assert 49152 <= hist.p99 <= 53247  # 50,000 is in [49152, 53247]
    assert hist.percentile(1.0) == 1_000_000
    assert sum(hist.buckets) == 100 and len(hist.buckets) == BUCKETS
    assert LatencyHistogram(0, 0, 0, 0, (0,) * BUCKETS).p99 == 0
    octaves = hist.octaves()  # the log2 view the latency pane draws
    assert (octaves[9], octaves[15], octaves[19], sum(octaves)) == (98, 1, 1, 100)


def test_every_ns_falls_in_the_bucket_whose_bounds_hold_it() -> None:
    edges = [0, 1, 15, 16, 17, 31, 32, 1000, 2**39 - 1, 2**39, 2**40 - 1]
    for ns in edges + [random.Random(ns).randrange(2**40) for ns in range(2000)]:
        low, high = bucket_bounds(bucket_of(ns))
        assert low <= ns <= high and high - low <= max(0, low // 8)
    assert bucket_of(2**40) == bucket_of(2**60) == BUCKETS - 1
    assert [bucket_bounds(b)[0] for b in range(16, 19)] == [16, 18, 20]  # 2 ns wide at 16


def test_memory_stays_bounded_however_many_keys_and_exits() -> None:
    stats = ExitStats(top_capacity=64, recent_capacity=100)
    rng = random.Random(1)
    for chunk in range(10):
        batch = tuple(
            ExitEvent(rng.randrange(4), 6, 0, t, t + 5, rng.randrange(1 << 40), 4, 1)
            for t in range(chunk * 20_000 * 1000, (chunk + 1) * 20_000 * 1000, 1000)
        )
        stats.add_batch(ExitBatch.of(batch))
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


def test_top_counts_add_n_at_once_as_n_single_adds_also_beyond_capacity() -> None:
    one, many = TopCounter(3), TopCounter(3)
    for key, n in [("a", 5), ("b", 2), ("c", 7), ("d", 3), ("a", 1), ("e", 4)]:
        for _ in range(n):
            one.add(key)
        many.add(key, n)
        assert one.counts == many.counts and one.exact == many.exact


def vcpu_runs(draw: st.DrawFn) -> list[ExitEvent]:
    """Exits of 3 vCPUs, each vCPU's in time order, interleaved as a tracer sees them."""
    clock = [10 * S, 10 * S + 7, 10 * S + 13]
    out = []
    for _ in range(draw(st.integers(0, 120))):
        vcpu = draw(st.integers(0, 2))
        entry = clock[vcpu] + draw(st.sampled_from([0, 1, 500, 3 * 10**8]))
        exit_ns = entry + draw(st.sampled_from([0, 40, 9_000, 5 * S]))
        clock[vcpu] = exit_ns
        reason, errno = draw(st.sampled_from([(2, 0), (6, 0), (5, 0), (10, 4), (0, 14)]))
        a = draw(st.sampled_from([0x80, 0x3F8, 0xD0000]))
        flags = draw(st.sampled_from([0, 1, EXIT_CYCLE]))
        if errno:
            out.append(ExitEvent(vcpu, reason, errno, entry, exit_ns, flags=flags & EXIT_CYCLE))
        else:
            out.append(ExitEvent(vcpu, reason, 0, entry, exit_ns, a, 1 | 1 << 8, flags))
    return out


@settings(max_examples=60, deadline=None)
@given(events=st.composite(vcpu_runs)(), cuts=st.lists(st.integers(0, 120), max_size=6))
def test_a_batch_counts_as_its_exits_one_by_one(events: list[ExitEvent], cuts: list[int]) -> None:
    one_by_one = ExitStats(recent_capacity=5)
    for e in events:  # a batch of one exit: the per-exit semantics
        one_by_one.add_batch(ExitBatch.of([e], 10 * S))
    batched = ExitStats(recent_capacity=5)
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        batched.add_batch(ExitBatch.of(events[lo:hi], 10 * S))
    now = events[-1].exit_ns if events else 0
    assert batched.snapshot(now, recent=True, top=None) == one_by_one.snapshot(
        now, recent=True, top=None
    )


def test_recent_exits_are_the_latest_of_each_vcpu_across_batches() -> None:
    stats = ExitStats(recent_capacity=3)
    events = [io(i % 2, i * 100, i * 100 + 50, port=i) for i in range(20)]
    for lo in range(0, 20, 7):
        stats.add_batch(ExitBatch.of(events[lo : lo + 7], 5))
    recent = stats.vcpu_snapshot(1, 10**4)
    assert recent is not None and recent.recent == tuple(events[15:20:2])


def test_reasons_order_by_count_rate_or_the_vmms_median_or_total_handling_time() -> None:
    def handled_in(ns: int) -> LatencyHistogram:
        buckets = [0] * BUCKETS
        buckets[bucket_of(ns)] = 1
        return LatencyHistogram(1, ns, ns, ns, tuple(buckets))

    io = ReasonStats("KVM_EXIT_IO", 900, 10.0, EMPTY_HISTOGRAM, handled_in(2_000))
    mmio = ReasonStats("KVM_EXIT_MMIO", 50, 40.0, EMPTY_HISTOGRAM, handled_in(90_000))
    io = ReasonStats("KVM_EXIT_IO", 900, 10.0, EMPTY_HISTOGRAM,
                     LatencyHistogram(900, 900 * 2_000, 2_000, 2_000, io.handling.buckets))  # fmt: skip
    hlt = ReasonStats("KVM_EXIT_HLT", 50, 40.0, EMPTY_HISTOGRAM, handled_in(500))
    reasons = (io, hlt, mmio)
    assert reasons_by(reasons, "count") == (io, hlt, mmio)  # ties by label
    assert reasons_by(reasons, "rate") == (hlt, mmio, io)
    assert reasons_by(reasons, "VMM p50") == (mmio, io, hlt)
    assert reasons_by(reasons, "VMM total") == (io, mmio, hlt)  # 1.8 ms in all, then 90 µs


def test_a_net_median_is_known_only_where_fewer_than_half_the_estimates_were_cut_at_0() -> None:
    def net(values: list[int]) -> ReasonStats:
        buckets = [0] * BUCKETS
        for ns in values:
            buckets[bucket_of(ns)] += 1
        h = LatencyHistogram(len(values), sum(values), min(values), max(values), tuple(buckets))
        n = len(values)  # a narrow bound of the mean: it is known
        return ReasonStats("KVM_EXIT_MMIO", n, 1.0, EMPTY_HISTOGRAM, h, h,
                           net_low_total=sum(values) - n, net_high_total=sum(values) + n)  # fmt: skip

    mostly_cut = net([0, 0, 0, 500_000])  # a mean of 125 µs, three of four cut at 0
    assert mostly_cut.net_known and mostly_cut.net_cut_share == 0.75
    assert not mostly_cut.net_median_known  # its median, 0, is the cut
    assert net_median_text(mostly_cut) == "unknown"  # as the report says it
    few_cut = net([0, 90_000, 100_000, 110_000])
    assert few_cut.net_median_known and few_cut.handling_net.median > 80_000
    assert net_median_text(few_cut).endswith("µs")


def test_a_bounded_table_says_how_far_each_count_may_be_off_and_holds_the_truth() -> None:
    """Space-Saving beyond capacity: each count shown is an upper bound, at most ``error`` too
    high; keys counted from their first exit, never evicted, stay exact (error 0), and a table
    whose shown counts are all exact is said to be exact, though it evicted keys."""
    rng = random.Random(7)
    heavy = [0x70, 0x71, 0x3F8]
    ports = heavy * 400 + [0x1000 + rng.randrange(500) for _ in range(3000)]
    rng.shuffle(ports)
    ports = heavy + ports  # the heavy ones come first: counted exactly from then on
    truth = Counter(ports)
    stats = ExitStats(top_capacity=16)
    stats.add_events(io(0, i, i + 1, port=p) for i, p in enumerate(ports))
    snap = stats.snapshot(top=None)
    assert len(snap.io) == 16 and any(p.error for p in snap.io)
    for p in snap.io:
        assert p.count - p.error <= truth[p.port] <= p.count, (hex(p.port), p)
    top = stats.snapshot(top=3)
    assert {p.port for p in top.io} == set(heavy) and all(p.error == 0 for p in top.io)
    assert top.top_exact and not snap.top_exact


def test_the_mean_net_handling_lies_between_handling_less_the_most_and_the_least_held() -> None:
    # held 1 µs seen and 20..40 µs unseen (estimate 30)
    held = {"held_stops": 2, "held_seen_ns": 1_000, "held_unseen_ns": 30_000,
            "held_unseen_low_ns": 20_000, "held_unseen_high_ns": 40_000}  # fmt: skip
    events = [
        ExitEvent(0, 2, 0, 0, 1_000, 0x80, 1, 1),
        ExitEvent(0, 2, 0, 101_000, 102_000, 0x80, 1, 1, **held),  # handled 100 µs: net 59..79
        # handled 30 µs: net 0 at the estimate, -11..9 (the mean is bounded, not each exit)
        ExitEvent(0, 2, 0, 132_000, 133_000, 0x80, 1, 1, **held),
    ]
    stats = ExitStats()
    stats.add_batch(ExitBatch.of(events, 0))
    (io,) = stats.snapshot().reasons
    assert io.handling_net.count == 2 and io.handling_net.total_ns == 69_000 + 0
    bound = io.net_mean_bound
    assert bound == MeanBound((59_000 - 11_000) / 2, (79_000 + 9_000) / 2)  # 24..44 µs
    assert bound.known  # 20 µs wide, less than its low end
    assert bound_text(bound) == "24.0µs–44.0µs"


def test_a_bound_wider_than_its_low_end_or_with_no_basis_is_unknown() -> None:
    assert not mean_bound(2, 20_000, 90_000).known  # 10..45 µs: wider than 10
    assert mean_bound(2, -50_000, 90_000) == MeanBound(0.0, 45_000.0)  # a mean of times: >= 0
    assert bound_text(mean_bound(2, -50_000, 90_000)) == "unknown"
    assert mean_bound(0, 0, 0) is None and bound_text(None) == "unknown"


def test_an_exit_whose_stops_came_before_any_round_trip_counts_from_0() -> None:
    events = [
        ExitEvent(0, 2, 0, 0, 1_000, 0x80, 1, 1),
        ExitEvent(0, 2, 0, 101_000, 102_000, 0x80, 1, 1, held_stops=1, held_seen_ns=1_000),
    ]
    stats = ExitStats()
    stats.add_batch(ExitBatch.of(events, 0))
    (io,) = stats.snapshot().reasons
    assert io.net_mean_bound == MeanBound(0.0, 99_000.0)  # no most; the least, 0 unseen
    assert io.handling_net.mean == 99_000  # the estimate: nothing to take off


def test_exits_are_counted_to_a_moment_by_exit_time_whenever_their_batch_comes():
    """The title's two rates are over one interval: KVM's counters are sampled at a moment,
    the traced exits counted up to that moment by exit time, also those whose batch comes
    after it (the tracer delivers up to 0.2 s late) and not those received after it."""
    from kvmtop.model.messages import ExitBatch

    def exits(*times: int, reason: int = 2) -> ExitBatch:
        return ExitBatch.of([ExitEvent(0, reason, 0, t - 5, t, 0x80, 1, 1) for t in times])

    stats = ExitStats()
    stats.add_batch(exits(10, 20, 30))
    stats.add_batch(exits(40, 50, reason=6))  # two MMIO exits, the second after the moment
    stats.note_moment(45)  # noted with an exit after it received already
    assert stats.exits_until(45) == (4, 3)
    stats.add_batch(exits(44, 46, 60))  # late: one before the moment
    stats.add_batch(exits(41, 42))  # late: a whole batch before it
    assert stats.exits_until(45) == (7, 6)
    assert stats.exits_until(50) is None  # not a moment noted


def test_guest_code_counts_each_address_by_exits_and_by_the_handling_that_follows_it() -> None:
    at = {rip: GuestRip(rip, 0xF0000 + rip, 0) for rip in (0x1002, 0x1005)}
    stats = ExitStats()
    stats.add_batch(ExitBatch.of([
        ExitEvent(0, 2, 0, 1_000, 1_100, 0x80, 1 | 1 << 8, 1, rip=at[0x1002]),
        ExitEvent(1, 2, 0, 1_000, 1_200, 0x80, 1 | 1 << 8, 1, rip=at[0x1005]),
        ExitEvent(0, 2, 0, 1_400, 1_900, 0x80, 1 | 1 << 8, 1, rip=at[0x1002]),  # handled 300
    ], 0))  # fmt: skip
    stats.add_batch(ExitBatch.of([  # the next batch ends both handlings left open
        ExitEvent(0, 2, 0, 2_000, 2_100, 0x80, 1 | 1 << 8, 1, rip=at[0x1005]),  # handled 100
        ExitEvent(1, 5, 0, 1_700, 1_800),  # 0x1005's on vCPU 1 handled 500; no RIP of its own
        ExitEvent(1, 5, 0, 1_900, 2_000),  # not counted: its exit before has no RIP
    ], 0))  # fmt: skip
    snap = stats.snapshot()
    assert snap.rip_seen
    by_exits = {(r.rip, r.count, r.vmm_ns) for r in snap.rips}
    assert by_exits == {(0x1002, 2, 300 + 100), (0x1005, 2, 500)}  # 0x1005 on vCPU 0: still open
    assert [r.rip for r in snap.rips_by_time] == [0x1005, 0x1002]
    assert all(r.label == "KVM_EXIT_IO" and r.linear == 0xF0000 + r.rip and r.cpl == 0
               for r in snap.rips)  # fmt: skip
    vcpu1 = next(v for v in snap.vcpus if v.vcpu == 1).rips
    assert [(r.rip, r.count, r.vmm_ns) for r in vcpu1] == [(0x1005, 1, 500)]
