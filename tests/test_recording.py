"""The recording file: round trips, crash tolerance, and clear errors for bad files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat

import pytest
from guests.fixed_recording import write_fixed_recording
from guests.many_vms import many_vms_batch
from helpers import START, events_strategy
from hypothesis import given, settings

from kvmtop.aggregate.exits import ExitStats, MeanBound
from kvmtop.errors import RecordingError
from kvmtop.formats.recording import (
    HEADER,
    RECORD_SIZE,
    RecordingMeta,
    RecordingWriter,
    open_recording,
)
from kvmtop.model.events import ExitEvent, ProcessSeen, VcpuSeen
from kvmtop.model.messages import Detached, ExitBatch
from kvmtop.model.records import iter_events


def meta(with_data: bool = False) -> RecordingMeta:
    return RecordingMeta(pid=42, argv=("qemu", "-m", "16"), launched=False, start_ns=START,
                         start_wall=1.7e9, with_data=with_data)  # fmt: skip


def write(
    path: str, batches: list[ExitBatch], end: Detached | None = None, with_data: bool = False
) -> None:
    writer = RecordingWriter.create(path, meta(with_data), with_data)
    for batch in batches:
        writer.write_batch(batch)
    if end is not None:
        writer.write_detached(end)
    writer.close()


def read(path: str) -> tuple[list[ExitEvent], list[VcpuSeen], int, int, object]:
    rec = open_recording(path)
    events, seen, lost, stops = [], [], 0, 0
    for batch in rec.batches(max_events=7):
        events += batch.events
        seen += batch.vcpus
        lost += batch.lost
        stops += batch.stops
    return events, seen, lost, stops, rec


@settings(max_examples=60, deadline=None)
@given(events=events_strategy)
def test_every_field_survives_a_round_trip(tmp_path_factory, events: list[ExitEvent]) -> None:
    path = str(tmp_path_factory.mktemp("rec") / "r.kvmtop")
    seen = (VcpuSeen(3, 1234, START + 10),)
    write(path, [ExitBatch.of(events, START, seen, lost=2, stops=9)], Detached(42, "exited", START + 99, 1),
          with_data=True)  # fmt: skip
    got, got_seen, lost, stops, rec = read(path)
    assert got == events
    assert got_seen == list(seen) and (lost, stops) == (2, 9)
    assert rec.complete and rec.torn_bytes == 0
    assert rec.end == Detached(42, "exited", START + 99, 1)


def test_a_file_cut_anywhere_reads_back_every_whole_record(tmp_path) -> None:
    events = [
        ExitEvent(0, 2, 0, START + i * 100, START + i * 100 + 50, 0x80, 1 | 1 << 8, 1)
        for i in range(20)
    ]
    full = str(tmp_path / "full.kvmtop")
    write(full, [ExitBatch.of(events, START)], Detached(42, "detached", START + 10**6))
    blob = open(full, "rb").read()
    body = HEADER.size + len(blob[HEADER.size :]) - 21 * RECORD_SIZE  # header + metadata length
    cut = str(tmp_path / "cut.kvmtop")
    for size in range(body, len(blob)):
        with open(cut, "wb") as f:
            f.write(blob[:size])
        got, _, _, _, rec = read(cut)
        whole = (size - body) // RECORD_SIZE
        assert got == events[: min(whole, 20)], size
        assert rec.torn_bytes == (size - body) % RECORD_SIZE
        assert not rec.complete


def test_recordings_are_private_even_over_an_existing_file(tmp_path) -> None:
    path = tmp_path / "r.kvmtop"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    write(str(path), [])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated"),
        (b"\x89KVM", "truncated"),
        (b"hello world, this is not it", "not a kvmtop recording"),
        (b"\x89KVMTOP\n\x07\x00\x00\x00\x02\x00\x00\x00{}", "version 7 recording"),
        (b"\x89KVMTOP\n\x01\x00\x00\x00\x10\x00\x00\x00{}", "truncated"),
        (b"\x89KVMTOP\n\x01\x00\x00\x00\x02\x00\x00\x00[]", "metadata cannot be read"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.kvmtop"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=message):
        open_recording(str(path))


def test_unknown_record_kind_is_reported_with_its_offset(tmp_path) -> None:
    path = str(tmp_path / "r.kvmtop")
    write(path, [ExitBatch.of((ExitEvent(0, 2, 0, START, START + 1),), START)])
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\x63" + bytes(31))
    with pytest.raises(RecordingError, match=f"corrupt at byte {size}: unknown record kind 99"):
        read(path)


def test_missing_and_unreadable_files(tmp_path) -> None:
    with pytest.raises(RecordingError, match="No such file"):
        open_recording(str(tmp_path / "nope"))
    with pytest.raises(RecordingError, match="directory"):
        open_recording(str(tmp_path))
    with pytest.raises(RecordingError, match="cannot create recording"):
        RecordingWriter.create(str(tmp_path / "no" / "dir" / "r"), meta(), False)


def test_an_exit_costs_32_bytes(tmp_path) -> None:
    path = str(tmp_path / "r.kvmtop")
    events = tuple(
        ExitEvent(1, 6, 0, START + i, START + i + 9000, 0xC0000, 1, 1) for i in range(1000)
    )
    write(path, [ExitBatch.of(events, START)])
    empty = str(tmp_path / "e.kvmtop")
    write(empty, [])
    assert (os.path.getsize(path) - os.path.getsize(empty)) / 1000 == 32


def test_recording_to_a_device_never_changes_its_mode(tmp_path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo, 0o644)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that opening it to write succeeds
    try:
        write(str(fifo), [])
        assert stat.S_IMODE(os.stat(fifo).st_mode) == 0o644
    finally:
        os.close(reader)


def body(path: str) -> bytes:
    return open(path, "rb").read()[open_recording(path)._body :]


def test_the_writer_writes_the_bytes_it_always_wrote(tmp_path) -> None:
    """Digests of files written before exits travelled as records: the format is unchanged."""
    fixed = write_fixed_recording(str(tmp_path / "fixed.kvmtop"))
    assert hashlib.sha256(body(fixed)).hexdigest() == (
        "5d3b6db6450e9e95ba26fc7c2959b63ffc1babe279faca441d06bae27445efc0"
    )
    start = 1_000_000_000_000
    mixed = [  # data, a long run, one-stop, failed runs, a negative guest time
        ExitEvent(0, 2, 0, start + 10, start + 110, 0x3F8, 1 | 1 << 8, 1, b"A"),
        ExitEvent(1, 6, 0, start + 20, start + 20 + 5 * 10**9, 0xFEE00000, 4, 1, bytes(range(40))),
        ExitEvent(0, 10, 4, start + 500, start + 900, flags=4),
        ExitEvent(1, 0, 14, start + 5 * 10**9 + 100, start + 5 * 10**9 + 200),
        ExitEvent(0, 5, 0, start + 1000, start + 990),
        ExitEvent(0, 29, 0, start - 50, start + 3000, 0x1B, 0, 1 | 4, b"12345678"),
    ]
    meta = RecordingMeta(pid=7, argv=("x",), launched=False, start_ns=start, start_wall=1.0,
                         with_data=True)  # fmt: skip
    path = str(tmp_path / "mixed.kvmtop")
    for base in (start, 0):  # the same bytes from records on the recording's base, or re-based
        writer = RecordingWriter.create(path, meta, True)
        writer.write_batch(
            ExitBatch.of(mixed, base, (VcpuSeen(0, 11, start + 1),), lost=1, stops=12)
        )
        writer.write_detached(Detached(7, "exited", start + 6 * 10**9, 0))
        writer.close()
        assert hashlib.sha256(body(path)).hexdigest() == (
            "97f4dd4e8fb13d9dd46473f2df11bbdf24308931a9fb14537d2589cc744fff1b"
        )
        assert writer.total == 6


def test_batches_pass_the_files_records_through_whole_exits_at_a_time(tmp_path) -> None:
    """More than one read of the file (1 MiB), exits with DATA records across its ends."""
    events = [
        ExitEvent(i % 3, 2, 0, START + i * 10, START + i * 10 + 5, 0x3F8, 1 | 1 << 8, 1, b"d" * 40)
        for i in range(15_000)
    ]
    path = str(tmp_path / "r.kvmtop")
    write(path, [ExitBatch.of(events[:9000], START), ExitBatch.of(events[9000:], START)],
          with_data=True)  # fmt: skip
    batches = list(open_recording(path).batches(max_events=4096))
    assert [b.exits for b in batches] == [4096, 4096, 4096, 2712]
    assert all(b.base_ns == START for b in batches)
    assert b"".join(b.records for b in batches) == body(path)
    assert [e for b in batches for e in b.events] == events


def test_vcpus_keep_their_process_and_vm_and_processes_their_names(tmp_path) -> None:
    path = str(tmp_path / "r.kvmtop")
    ended = ProcessSeen(200, 100, ("vmm-b",), START + 99, ended=True, exit_status=3)
    long_argv = ProcessSeen(300, 100, tuple(f"--option-{i}" for i in range(40)), START + 5)
    first = many_vms_batch()
    write(path, [first, ExitBatch(b"", START, processes=(long_argv, ended))])
    recording = open_recording(path)
    batches = list(recording.batches())
    assert [seen for b in batches for seen in b.vcpus] == list(first.vcpus)
    processes = [p for b in batches for p in b.processes]
    assert processes[:2] == list(first.processes)
    assert processes[-1] == ProcessSeen(200, 100, (), START + 99, True, 3)  # (its name came first)
    assert " ".join(processes[2].argv).startswith("--option-0 --option-1")
    assert len("\0".join(processes[2].argv)) == 120  # cut, not lost
    assert sum(b.exits for b in batches) == 9


def test_a_version_2_recording_reads_without_net_handling_and_a_held_record_round_trips(
    tmp_path,
) -> None:
    path = str(tmp_path / "v2.kvmtop")
    events = [ExitEvent(0, 2, 0, START + 100 * i, START + 100 * i + 5, 0x80, 1, 1,
                        held_stops=i, held_seen_ns=i, held_unseen_ns=2 * i) for i in range(4)]  # fmt: skip
    write(path, [ExitBatch.of(events, START, [VcpuSeen(0, 77, START)])])
    (batch,) = open_recording(path).batches()
    assert list(iter_events(batch.records, batch.base_ns)) == events  # HELD: exits 1..3
    stats = ExitStats()
    stats.add_batch(batch)
    (io,) = stats.snapshot().reasons
    assert io.handling.count == io.handling_net.count == 3
    assert io.handling_net.max_ns == 95 - 3 and io.handling_net.min_ns == 95 - 9
    held_free = [dataclasses.replace(e, held_stops=0, held_seen_ns=0, held_unseen_ns=0)
                 for e in events]  # fmt: skip
    write(path, [ExitBatch.of(held_free, START, [VcpuSeen(0, 77, START)])])
    with open(path, "r+b") as f:  # version 2: the same, without HELD records
        f.seek(8)
        f.write((2).to_bytes(2, "little"))
    stats = ExitStats()
    for batch in open_recording(path).batches():
        stats.add_batch(batch)
    (io,) = stats.snapshot().reasons
    assert io.handling.count == 3 and io.handling_net.count == 0


def test_a_held_record_from_before_the_bound_reads_back_with_no_bound(tmp_path) -> None:
    path = str(tmp_path / "old-held.kvmtop")
    events = [ExitEvent(0, 2, 0, START + 1_000 * i, START + 1_000 * i + 5, 0x80, 1, 1,
                        held_stops=i, held_seen_ns=10, held_unseen_ns=20) for i in range(3)]  # fmt: skip
    write(path, [ExitBatch.of(events, START, [VcpuSeen(0, 77, START)])])  # bytes 4-7, 24-31: 0
    stats = ExitStats()
    for batch in open_recording(path).batches():
        stats.add_batch(batch)
    (io,) = stats.snapshot().reasons
    assert io.handling_net.mean == 995 - 30  # the estimate as it was
    assert io.net_mean_bound == MeanBound(0.0, 995 - 10) and not io.net_mean_bound.known


def test_a_version_1_recording_still_reads(tmp_path) -> None:
    path = str(tmp_path / "v1.kvmtop")
    events = [ExitEvent(1, 2, 0, START + i, START + i + 5, 0x80, 1, 1) for i in range(7)]
    write(path, [ExitBatch.of(events, START, [VcpuSeen(1, 77, START)])])
    with open(path, "r+b") as f:  # a version 1 file has the same layout, without keys
        f.seek(8)
        f.write((1).to_bytes(2, "little"))
    (batch,) = open_recording(path).batches()
    assert batch.vcpus == (VcpuSeen(1, 77, START, None),) and batch.exits == 7
    with open(path, "r+b") as f:
        f.seek(8)
        f.write((5).to_bytes(2, "little"))
    with pytest.raises(
        RecordingError, match="version 5 recording; this kvmtop reads versions 1 to 4"
    ):
        open_recording(path)
