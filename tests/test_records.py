"""The packed exit records: packing and decoding agree, counts and cuts land on whole exits."""

from __future__ import annotations

from helpers import START, events_strategy
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtop.abi.record_layout import EXIT, EXIT_WRITE, KIND_DATA, KIND_EXIT, KIND_LONG, RECORD_SIZE
from kvmtop.model.events import ExitEvent, VcpuSeen
from kvmtop.model.messages import ExitBatch
from kvmtop.model.records import cut_after, exit_count, iter_events, kinds, pack_events, rebase

BASE = START  # the events' times are START plus up to 10**12 ns


@settings(max_examples=100, deadline=None)
@given(events=events_strategy)
def test_events_packed_decode_to_the_same_events(events: list[ExitEvent]) -> None:
    records = pack_events(events, BASE)
    assert list(iter_events(records, BASE)) == events
    assert exit_count(records) == len(events)
    batch = ExitBatch.of(events, BASE, (VcpuSeen(1, 2, 3),), lost=1, stops=4)
    assert batch.records == records and batch.events == tuple(events)
    assert batch.exits == len(events)
    assert batch.last_exit_ns == (events[-1].exit_ns if events else None)


@settings(max_examples=50, deadline=None)
@given(events=events_strategy, shift=st.integers(-(10**12), 10**12))
def test_rebased_records_hold_the_same_exits(events: list[ExitEvent], shift: int) -> None:
    records = pack_events(events, BASE)
    assert rebase(records, BASE, BASE + shift) == pack_events(events, BASE + shift)


def test_long_runs_and_data_follow_their_exit() -> None:
    long_run = ExitEvent(0, 6, 0, BASE, BASE + 5 * 10**9, 0xD0000, 4, EXIT_WRITE, b"x" * 31)
    records = pack_events([long_run], BASE)
    assert kinds(records) == bytes([KIND_EXIT, KIND_LONG, KIND_DATA, KIND_DATA])
    orphan = bytes([KIND_DATA, 1]) + bytes(30)  # before any EXIT: no exit's
    assert list(iter_events(orphan + records, BASE)) == [long_run]


def test_a_cut_keeps_each_exit_whole_with_the_exits_up_to_the_time() -> None:
    events = [
        ExitEvent(i % 2, 2, 0, BASE + i * 100 - 10, BASE + i * 100, 0x3F8, 257, 1, b"ab" * (i % 3))
        for i in range(10)
    ]
    records = pack_events(events, BASE)
    for t_rel in (-1, 0, 1, 99, 100, 450, 900, 10**6):
        cut = cut_after(records, t_rel)
        assert cut % RECORD_SIZE == 0
        before = list(iter_events(records[:cut], BASE))
        after = list(iter_events(records[cut:], BASE))
        assert before == [e for e in events if e.exit_ns - BASE <= t_rel]
        assert before + after == events
        assert cut == len(records) or records[cut] == KIND_EXIT


def test_an_exit_record_is_the_recording_layout() -> None:
    records = pack_events([ExitEvent(3, 2, 0, BASE + 10, BASE + 50, 0x80, 1 | 1 << 8, 1)], BASE)
    assert EXIT.unpack(records) == (KIND_EXIT, 1, 3, 2, 50, 40, 257, 0x80)
