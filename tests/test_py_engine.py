"""The engine's bound of what its stops cost, on hand-made round trips (no tracing): both engines
use this arithmetic (trace/py_engine.py, and native/hotloop.c to the integer)."""

from __future__ import annotations

from kvmtop.trace.py_engine import (
    NO_WINDOW,
    POLLED,
    ROUND_TRIP_CLASS,
    ROUND_TRIP_OTHERS,
    SLEPT,
    round_trip_costs,
    stop_cost,
    window_with_stop,
    window_with_unseen,
)


def test_a_stop_costs_at_most_its_class_s_slowest_quarter_and_runs_alone_bound_it_by_0():
    slept = [(40_000 + 1_000 * i, True, SLEPT) for i in range(ROUND_TRIP_CLASS)]
    polled = [(5_000 + 100 * i, True, POLLED) for i in range(ROUND_TRIP_CLASS)]
    least, estimate, most_slept, most_polled = round_trip_costs(slept + polled)
    assert least == 0  # a run's round trip holds KVM's part: no least from runs
    # too few others to leave KVM_RUN's out: the mean of all
    assert estimate == sum(ns for ns, _, _ in slept + polled) // 32
    assert most_slept == (52_000 + 53_000 + 54_000 + 55_000) // 4  # the slowest 4 of 16
    assert most_polled == (6_200 + 6_300 + 6_400 + 6_500) // 4


def test_a_class_with_too_few_round_trips_in_a_block_keeps_its_most() -> None:
    block = [(30_000, True, SLEPT)] * ROUND_TRIP_CLASS + [(1_000, True, POLLED)] * 3
    assert round_trip_costs(block, (0, 0, 0, 7_000))[2:] == (30_000, 7_000)
    assert round_trip_costs(block)[2:] == (30_000, 0)  # none before it: none yet


def test_the_least_and_estimate_leave_runs_out_where_there_are_enough_other_round_trips():
    others = [(3_000 + i, False, SLEPT) for i in range(ROUND_TRIP_OTHERS)]
    least, estimate, most, _ = round_trip_costs(
        [(2_000, True, SLEPT)] + others + [(70_000, True, SLEPT)] * 4
    )
    assert least == 3_000  # the shortest of the others, not the run's 2_000
    assert estimate == sum(ns for ns, _, _ in others) // len(others)  # 3_007
    slowest = sorted(ns for ns, _, _ in others)[15:] + [70_000] * 4  # the slowest 5 of 21
    assert most == sum(slowest) // 5


def test_a_stop_s_cost_follows_the_class_of_the_stop_that_ended_its_unseen_part() -> None:
    costs = (2_000, 20_000, 50_000, 8_000)
    assert stop_cost(costs, SLEPT) == (2_000, 20_000, 50_000)
    assert stop_cost(costs, POLLED) == (2_000, 8_000, 8_000)  # the estimate within the bound
    no_polled = (2_000, 20_000, 50_000, 0)  # a poll's caught none yet: at most a sleep's cost
    assert stop_cost(no_polled, POLLED) == (2_000, 20_000, 50_000)
    assert stop_cost((2_000, 20_000, 0, 8_000), SLEPT) == (2_000, 20_000, 0)  # no basis: no most


def test_a_window_sums_what_each_stop_cost_and_has_no_most_after_a_stop_with_no_basis() -> None:
    slept, polled = (2_000, 5_000, 9_000), (1_000, 1_500, 2_500)
    window = window_with_stop(NO_WINDOW, 700)
    assert window == (1, 700, 0, 0, 0)  # its unseen part comes with the next stop...
    window = window_with_unseen(window, slept)  # ...one kvmtop slept for
    window = window_with_unseen(window_with_stop(window, 300), polled)  # then one a poll caught
    assert window == (2, 1_000, 6_500, 3_000, 11_500)
    unmeasured = window_with_unseen(window_with_stop(NO_WINDOW, 700), (0, 0, 0))  # no basis yet
    assert unmeasured == (1, 700, 0, 0, 0)
    later = window_with_unseen(window_with_stop(unmeasured, 300), slept)
    assert later == (2, 1_000, 5_000, 2_000, 0)  # still no most
