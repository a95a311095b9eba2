"""Replay: the aggregate on show holds exactly the exits up to the clock, wherever a seek cuts."""

from __future__ import annotations

from kvmtop.events import ExitBatch, ExitEvent
from kvmtop.recording import RecordingMeta, RecordingWriter
from kvmtop.replay import Replay

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
