"""The engine's bound of what its stops cost, on hand-made round trips (no tracing): both engines
use this arithmetic (hot_state.py, and native/hotloop.c to the integer)."""

from __future__ import annotations

from kvmtop.hot_state import (
    NO_WINDOW,
    ROUND_TRIP_OTHERS,
    round_trip_costs,
    window_with_stop,
)


def test_a_stop_costs_at_least_the_shortest_round_trip_and_at_most_the_slowest_quarter_s_mean():
    block = [(2_000, False), (10_000, False), (30_000, True), (6_000, False)]  # a run's: 30_000
    least, estimate, most = round_trip_costs(block)
    assert (least, most) == (2_000, 30_000)
    assert estimate == 48_000 // 4  # too few others to leave KVM_RUN's out: the mean of all


def test_the_estimate_leaves_runs_out_where_there_are_enough_other_round_trips() -> None:
    others = [(3_000 + i, False) for i in range(ROUND_TRIP_OTHERS)]
    least, estimate, most = round_trip_costs(others + [(70_000, True)] * 4)
    assert least == 3_000
    assert estimate == sum(ns for ns, _ in others) // len(others)  # 3_007
    slowest = sorted(ns for ns, _ in others)[15:] + [70_000] * 4  # the slowest 5 of 20
    assert most == sum(slowest) // 5


def test_a_window_sums_what_each_stop_cost_and_has_no_most_after_a_stop_with_no_basis() -> None:
    costs = (2_000, 5_000, 9_000)
    window = window_with_stop(window_with_stop(NO_WINDOW, 700, costs), 300, costs)
    assert window == (2, 1_000, 10_000, 4_000, 18_000)
    unmeasured = window_with_stop(NO_WINDOW, 700, (0, 0, 0))  # before any round trip
    assert unmeasured == (1, 700, 0, 0, 0)
    assert window_with_stop(unmeasured, 300, costs) == (2, 1_000, 5_000, 2_000, 0)  # still none
