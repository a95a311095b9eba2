"""The poll chooser, fed with made-up stop timings: Python's (the reference) and the C engine's."""

from __future__ import annotations

import importlib
import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from kvmtop.trace import stop_wait
from kvmtop.trace.stop_wait import EXPLOIT_MAX, PROBE_EPOCHS, PollChooser

WINDOW = 50_000
START = 1_000_000_000


def c_chooser(max_ns: int) -> Any:
    try:
        module = importlib.import_module("kvmtop.native._hotloop")
    except ImportError:
        pytest.skip(
            "kvmtop.native._hotloop is not built (no C compiler or Python headers at install)"
        )
    return module.PollChooser(max_ns)


@pytest.fixture(params=["pure", "native"])
def make_chooser(request: pytest.FixtureRequest) -> Callable[[int], Any]:
    return PollChooser if request.param == "pure" else c_chooser


IDLE_HOST = 0  # no task waited for a CPU (PSI "some" avg10, in hundredths of a percent)
CONTENDED_HOST = 7500  # tasks waited for a CPU 75% of the time


def drive(
    chooser: Any, gap: Callable[[bool], int], stops: int, pressure: int = IDLE_HOST
) -> list[bool]:
    """Each stop comes ``gap(polled)`` after the one before, on a host of that CPU pressure;
    whether each wait polled."""
    now = chooser.last_ns or START
    polled = []
    for _ in range(stops):
        polling = chooser.poll_ns != 0
        polled.append(polling)
        now += gap(polling)
        if chooser.seen(now):
            chooser.pressure(pressure)
    return polled


def share(polled: list[bool]) -> float:
    return sum(polled) / len(polled)


def test_polls_when_polling_epochs_are_faster(make_chooser: Callable[[int], Any]) -> None:
    polled = drive(make_chooser(WINDOW), lambda polling: 20_000 if polling else 50_000, 200_000)
    assert share(polled[-100_000:]) > 0.9
    assert polled[-1]


def test_sleeps_when_polling_epochs_are_slower(make_chooser: Callable[[int], Any]) -> None:
    polled = drive(make_chooser(WINDOW), lambda polling: 40_000 if polling else 20_000, 200_000)
    assert share(polled[-100_000:]) < 0.1
    assert not polled[-1]


def test_a_small_gain_is_not_worth_polling(make_chooser: Callable[[int], Any]) -> None:
    polled = drive(make_chooser(WINDOW), lambda polling: 27_000 if polling else 30_000, 200_000)
    assert share(polled[-100_000:]) < 0.1


def test_compares_again_while_a_choice_holds(make_chooser: Callable[[int], Any]) -> None:
    polled = drive(make_chooser(WINDOW), lambda polling: 40_000 if polling else 20_000, 400_000)
    starts = sum(1 for a, b in zip(polled, polled[1:], strict=False) if b and not a)
    # an epoch lasts at least EPOCH_NS; a period, at most EXPLOIT_MAX epochs and a comparison
    epoch_stops = stop_wait.EPOCH_NS // 20_000
    most_stops_apart = (EXPLOIT_MAX + PROBE_EPOCHS) * epoch_stops * 2
    assert starts >= len(polled) // most_stops_apart


def test_follows_a_host_whose_costs_turn_round(make_chooser: Callable[[int], Any]) -> None:
    chooser = make_chooser(WINDOW)
    first = drive(chooser, lambda polling: 20_000 if polling else 50_000, 200_000)
    then = drive(chooser, lambda polling: 40_000 if polling else 20_000, 400_000)
    assert first[-1]
    assert share(then[-200_000:]) < 0.1
    back = drive(chooser, lambda polling: 20_000 if polling else 50_000, 200_000)
    assert share(back[-100_000:]) > 0.9


def test_never_polls_with_a_zero_window(make_chooser: Callable[[int], Any]) -> None:
    polled = drive(make_chooser(0), lambda polling: 1_000 if polling else 50_000, 100_000)
    assert not any(polled)


def test_a_quiet_vmm_is_never_polled(make_chooser: Callable[[int], Any]) -> None:
    """Stops 1 ms apart: no window could catch them, so no epoch of polling is tried."""
    polled = drive(make_chooser(WINDOW), lambda polling: 900_000 if polling else 1_000_000, 20_000)
    assert not any(polled)


def test_a_contended_host_is_not_polled(make_chooser: Callable[[int], Any]) -> None:
    """Polling would be faster, but tasks wait for a CPU: polling would take it from them."""
    faster_polling = lambda polling: 20_000 if polling else 50_000  # noqa: E731
    polled = drive(make_chooser(WINDOW), faster_polling, 200_000, CONTENDED_HOST)
    assert not any(polled)


def test_a_host_that_frees_its_cpus_is_polled_again(make_chooser: Callable[[int], Any]) -> None:
    chooser = make_chooser(WINDOW)
    faster_polling = lambda polling: 20_000 if polling else 50_000  # noqa: E731
    drive(chooser, faster_polling, 50_000, CONTENDED_HOST)
    polled = drive(chooser, faster_polling, 100_000, IDLE_HOST)
    assert share(polled[-50_000:]) > 0.9


def test_without_pressure_figures_the_comparison_decides(
    make_chooser: Callable[[int], Any],
) -> None:
    faster_polling = lambda polling: 20_000 if polling else 50_000  # noqa: E731
    polled = drive(make_chooser(WINDOW), faster_polling, 100_000, -1)
    assert share(polled[-50_000:]) > 0.9


def test_pauses_of_the_vmm_do_not_decide(make_chooser: Callable[[int], Any]) -> None:
    """A 50 ms pause of the VMM now and then falls in either way's epochs: polling still wins."""
    pauses = random.Random(7)

    def gap(polling: bool) -> int:
        if pauses.random() < 0.0005:
            return 50_000_000
        return 20_000 if polling else 50_000

    polled = drive(make_chooser(WINDOW), gap, 200_000)
    assert share(polled[-100_000:]) > 0.8


def test_the_engine_chooses_as_the_reference_does() -> None:
    noise = random.Random(11)
    pure, native = PollChooser(WINDOW), c_chooser(WINDOW)
    now = START
    switches = 0
    for _ in range(100_000):
        gap = noise.randrange(5_000, 120_000)
        polling = pure.poll_ns != 0
        now += gap * 2 // 3 if polling else gap  # polling faster, both noisy
        asked = pure.seen(now)
        assert native.seen(now) == asked
        if asked:  # contended now and then
            pressure = noise.choice((-1, IDLE_HOST, 2499, 2500, CONTENDED_HOST))
            pure.pressure(pressure)
            native.pressure(pressure)
        assert (pure.poll_ns, pure.last_ns) == (native.poll_ns, native.last_ns)
        switches += polling != (pure.poll_ns != 0)
    assert switches > 2


def test_the_pressure_is_read_in_hundredths_of_a_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    text = b"some avg10=25.07 avg60=3.10 avg300=0.00 total=123456\nfull avg10=0.00 total=0\n"
    read, write = os.pipe()
    os.write(write, text)
    os.close(write)
    monkeypatch.setattr(stop_wait.os, "open", lambda path, flags: read)
    assert stop_wait.read_pressure() == 2507
