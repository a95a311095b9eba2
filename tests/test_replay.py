"""Replay: the aggregate on show holds exactly the exits up to the clock, wherever a seek cuts."""

from __future__ import annotations

import time
from collections import Counter

from kvmtop.formats.recording import RecordingMeta, RecordingWriter
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import ExitBatch
from kvmtop.sources.replay import Replay

START = 2_000_000_000_000
MS = 1_000_000


def write_recording(path: str) -> list[ExitEvent]:
    """3 s of exits, one a ms on 2 vCPUs, each carrying DATA records; a long run in the middle."""
    events = [
        ExitEvent(
            i % 2, 2, 0, START + i * MS - 300, START + i * MS, 0x3F8, 1 | 1 << 8, 1, b"x" * 33
        )
        for i in range(1, 3000)
    ]
    events[1500] = ExitEvent(0, 5, 0, START - 5 * 10**9, events[1500].exit_ns)
    meta = RecordingMeta(pid=1, argv=("vm",), launched=False, start_ns=START, start_wall=1.7e9,
                         with_data=True)  # fmt: skip
    writer = RecordingWriter.create(path, meta, True)
    writer.write_batch(ExitBatch.of(events, START))
    writer.close()
    return events


def test_a_seek_cuts_a_batch_at_the_last_exit_before_the_clock(tmp_path) -> None:
    events = write_recording(str(tmp_path / "r.kvmtop"))
    replay = Replay(str(tmp_path / "r.kvmtop"), paused=True)
    try:
        for delta_s, at_ms in ((1.2345, 1234.5), (0.5, 1734.5), (-1.0, 734.5), (0.0005, 735.0)):
            replay.seek(delta_s)
            assert replay.wait_settled(10)
            held = [e for e in events if e.exit_ns <= START + at_ms * MS]
            snap = replay.snapshot()
            assert snap.total == len(held) and snap.last_ns == held[-1].exit_ns
            vcpu = replay.vcpu_snapshot(1)
            assert vcpu is not None and vcpu.recent[-1] == [e for e in held if e.vcpu == 1][-1]
    finally:
        replay.close()


def test_stops_per_second_as_it_plays_are_the_recordings_own_rate(tmp_path) -> None:
    """The fixed recording counts 2 stops per exit, in batches of 500 exits that the player
    reads 4,096 at a time: each second shows its own exits' stops, never 0 then a burst."""
    from guests.fixed_recording import START as FIXED_START
    from guests.fixed_recording import events as fixed_events
    from guests.fixed_recording import write_fixed_recording

    per_second = Counter((e.exit_ns - FIXED_START) // 10**9 for e in fixed_events())
    replay = Replay(write_fixed_recording(str(tmp_path / "fixed.kvmtop")), paused=True)
    try:
        for second in range(1, 31):
            replay.seek(1.0)
            assert replay.wait_settled(10)
            assert abs(replay.snapshot().stops_per_s - 2 * per_second[second - 1]) <= 1, second
        assert replay.snapshot().stops == 2 * sum(per_second.values())
    finally:
        replay.close()


def test_a_finished_recording_s_length_is_known_before_it_plays(tmp_path) -> None:
    """Its END record, read from the file's tail: "at 0:07 / 0:30" from the start, not "at
    0:07" until the player has read it through."""
    from guests.fixed_recording import write_fixed_recording

    replay = Replay(write_fixed_recording(str(tmp_path / "fixed.kvmtop")), paused=True)
    try:
        status = replay.status()
        assert replay.end_ns is None  # not read through
        assert status.length_s == 30.0 and not replay.truncated
        replay.seek(7.0)
        assert replay.wait_settled(10)
        status = replay.status()
        assert status.since_s == 7.0 and status.length_s == 30.0
        assert status.exits == replay.snapshot().total > 0  # the count where it is
    finally:
        replay.close()


def test_a_truncated_recording_says_so_before_and_after_it_plays(tmp_path) -> None:
    write_recording(str(tmp_path / "r.kvmtop"))  # no end marker: as if kvmtop was killed
    replay = Replay(str(tmp_path / "r.kvmtop"), paused=True)
    try:
        assert replay.truncated
        replay.seek_to(1.0)
        assert replay.wait_settled(10)
        assert replay.status().state == "replay ended, truncated"
    finally:
        replay.close()


def test_a_recording_shorter_than_a_tick_plays_to_its_end_after_end_then_home(tmp_path) -> None:
    """Home after End replays from the start at 1x: it reaches the last exit and says it ended
    (it once stopped a tick's worth of exits short of the end, and stayed there)."""
    events = [ExitEvent(0, 2, 0, START + i * 20_000 - 300, START + i * 20_000, 0x80, 1 | 1 << 8)
              for i in range(1, 1500)]  # 30 ms  # fmt: skip
    meta = RecordingMeta(pid=1, argv=("vm",), launched=False, start_ns=START, start_wall=1.7e9,
                         with_data=False)  # fmt: skip
    writer = RecordingWriter.create(str(tmp_path / "short.kvmtop"), meta, False)
    writer.write_batch(ExitBatch.of(events, START))
    writer.close()
    replay = Replay(str(tmp_path / "short.kvmtop"))
    try:
        replay.seek_to(1.0)
        assert replay.wait_settled(10) and replay.snapshot().total == len(events)
        replay.seek_to(0.0)
        assert replay.wait_settled(10)  # the clock runs on to the end, and the player with it
        time.sleep(0.2)
        assert replay.wait_settled(10) and replay.snapshot().total == len(events)
        assert replay.status().state.startswith("replay ended")  # (no end marker written)
    finally:
        replay.close()
