"""Writes that never exit: KVM's coalesced MMIO/PIO ring, counted beside the exits, exactly,
on both engines and in every tracing mode; and the ring's bookkeeping on hand-made bytes."""

from __future__ import annotations

import json
import struct

import pytest
from guests.qemu_bios import build_bios, qemu_command
from helpers import MODES, record_json, start_qemu

from kvmtop.abi.kvm import COALESCED_ENTRY as ENTRY
from kvmtop.abi.kvm import COALESCED_RING_HEAD as RING_HEAD
from kvmtop.abi.record_layout import C_PIO, C_WRAP, COALESCED, KIND_COALESCED
from kvmtop.aggregate.exits import ExitStats
from kvmtop.formats.jsonl_csv import jsonl_chunks
from kvmtop.formats.perfetto import PerfettoTrace
from kvmtop.formats.recording import RecordingWriter, open_recording
from kvmtop.formats.report import summary_json, summary_table
from kvmtop.minivmm.vmm import counted_command
from kvmtop.model.coalesced import RING_MAX, RingLook, iter_coalesced, unreadable_record
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import ExitBatch

RTC_WRITES = 100  # below the ring's 169 free entries: QEMU drains it at the first 0x71 read


def ring(first: int, last: int, entries: dict[int, tuple[int, int, int]]) -> bytearray:
    page = bytearray(4096)
    RING_HEAD.pack_into(page, 0, first, last)
    for i, (address, length, pio) in entries.items():
        ENTRY.pack_into(page, 8 + 24 * i, address, length, pio)
    return page


def looked(look: RingLook, page: bytearray) -> list[tuple[int, ...]]:
    out = bytearray()
    look.look(page, 3, 1000, out)
    return [f for f in COALESCED.iter_unpack(out)]


def test_a_look_counts_the_entries_appended_since_the_last_one_grouped_by_target() -> None:
    page = ring(5, 5, {})
    look = RingLook(page)  # what was there before is not counted
    assert looked(look, page) == []
    entries = {5: (0x70, 1, 1), 6: (0x70, 1, 1), 7: (0xD0000, 4, 0), 8: (0x70, 1, 1)}
    page = ring(5, 9, entries)
    assert looked(look, page) == [
        (KIND_COALESCED, C_PIO, 3, 1, 1000, 3, 0, 0x70),
        (KIND_COALESCED, 0, 3, 4, 1000, 1, 0, 0xD0000),
    ]
    assert looked(look, page) == []  # nothing new: nothing recorded


def test_the_ring_index_wraps_and_a_drain_of_unseen_entries_is_flagged_once() -> None:
    look = RingLook(ring(RING_MAX - 2, RING_MAX - 2, {}))
    entries = {RING_MAX - 2: (0x70, 1, 1), RING_MAX - 1: (0x70, 1, 1), 0: (0x70, 1, 1)}
    # the VMM drained all three (first == last) before the look: a whole turn could have passed
    fields = looked(look, ring(1, 1, {**entries, 1: (0x80, 1, 1)}))
    assert [(f[1], f[5]) for f in fields] == [(C_PIO | C_WRAP, 3)]
    # entries seen at the last look and drained since: no doubt
    fields = looked(look, ring(1, 3, {1: (0xD0000, 4, 0), 2: (0xD0000, 4, 0)}))
    assert [(f[1], f[5], f[7]) for f in fields] == [(0, 2, 0xD0000)]
    fields = looked(look, ring(3, 4, {3: (0xD0000, 4, 0)}))
    assert [(f[1], f[5]) for f in fields] == [(0, 1)]


def test_coalesced_records_go_through_a_recording_and_its_report(tmp_path) -> None:
    path = str(tmp_path / "c.kvmtop")
    start = 10**12
    exits = ExitBatch.of([ExitEvent(0, 2, 0, start + 10, start + 20, 0x71, 1)], start)
    coalesced = bytearray()
    look = RingLook(ring(0, 0, {}))
    look.look(ring(0, 7, {i: (0x70, 1, 1) for i in range(7)}), 0, 20, coalesced)
    coalesced += unreadable_record(1, 30)
    writer = RecordingWriter.create(path, _meta(start), with_data=False)
    writer.write_batch(ExitBatch(exits.records, start, coalesced=bytes(coalesced)))
    writer.close()
    recording = open_recording(path)
    stats = ExitStats()
    batches = list(recording.batches())
    for batch in batches:
        stats.add_batch(batch)
    writes = [w for b in batches for w in iter_coalesced(b.coalesced, b.base_ns)]
    assert [(w.vcpu, w.pio, w.address, w.count, w.t_ns) for w in writes][0] == (
        0,
        True,
        0x70,
        7,
        start + 20,
    )
    assert writes[1].unreadable and writes[1].count == 0
    snap = stats.snapshot()
    assert snap.total == 1 and snap.coalesced.total == 7 and snap.coalesced.unreadable == (1,)
    report = summary_json(snap, {})
    assert report["coalesced"]["writes"] == [{"port": 0x70, "len": 1, "count": 7}]
    assert report["vcpus"]["0"]["coalesced"] == [{"port": 0x70, "len": 1, "count": 7}]
    text = summary_table(snap, {})
    assert "COALESCED (NO EXIT)" in text and "0x0070 out size 1           7  RTC index" in text
    assert "not readable for vCPU(s) 1" in text
    lines = [json.loads(line) for line in "".join(jsonl_chunks(batches, start)).splitlines()]
    assert lines[1:] == [
        {"coalesced": True, "vcpu": 0, "port": 0x70, "len": 1, "count": 7, "t_ns": 20},
        {"coalesced": True, "vcpu": 1, "unreadable": True, "t_ns": 30},
    ]
    trace = json.loads("".join(PerfettoTrace(recording.meta).chunks(batches)))
    (instant,) = [e for e in trace["traceEvents"] if e.get("cat") == "coalesced"]
    assert instant["name"] == "coalesced (no exit): port 0x70 x7" and instant["ts"] == 0.02


def _meta(start: int):
    from kvmtop.formats.recording import RecordingMeta

    return RecordingMeta(1, ("vmm",), False, start, 0.0, False)


@pytest.mark.kvm
@pytest.mark.parametrize("mode", MODES)
def test_minivmm_coalesced_mmio_writes_are_counted_exactly_beside_the_one_that_exits(
    tmp_path, engine, mode
) -> None:
    """200 byte writes to a coalesced zone: KVM queues 169 (its ring is full at 169 of 170),
    the 170th exits as MMIO, minivmm drains the ring, the last 30 queue again."""
    own = tmp_path / "own.json"
    argv = counted_command(outs=0, mmio_writes=200, coalesced=True, report_json=str(own))
    report = record_json(tmp_path, *MODES[mode], "--", *argv)
    assert report["exits"] == {"KVM_EXIT_MMIO": 1, "KVM_EXIT_IO": 1}
    assert report["coalesced"]["writes"] == [{"address": 0xC0000, "len": 1, "count": 199}]
    assert report["coalesced"]["total"] == json.loads(own.read_text())["coalesced"] == 199
    assert report["coalesced"]["unreadable_vcpus"] == [] and report["coalesced"]["read"]
    # two stops look at each KVM_RUN return, before the VMM drained: never in doubt
    assert (report["coalesced"]["wraps"] == 0) == (mode == "two stops")


def rtc_bios(tmp_path, spin: int = 0) -> str:
    path = tmp_path / "rtc.bin"
    path.write_bytes(build_bios(RTC_WRITES, 0, spin, port=0x70, ins=RTC_WRITES, in_port=0x71))
    return str(path)


def assert_rtc_counts(report: dict) -> None:
    """QEMU coalesces the RTC index port 0x70 (KVM_CAP_COALESCED_PIO) and drains the ring when
    the data port 0x71 is accessed: the index writes never exit, the data reads all do."""
    assert report["exits"]["KVM_EXIT_IO"] == RTC_WRITES + 1  # and the debug-exit port
    assert {"port": 0x71, "direction": "in", "size": 1, "count": RTC_WRITES} in report["io"]
    assert not [p for p in report["io"] if p["port"] == 0x70]
    assert report["coalesced"]["writes"] == [{"port": 0x70, "len": 1, "count": RTC_WRITES}]
    assert report["vcpus"]["0"]["coalesced"] == [{"port": 0x70, "len": 1, "count": RTC_WRITES}]


@pytest.mark.qemu
@pytest.mark.parametrize("mode", MODES)
def test_qemu_rtc_index_writes_are_coalesced_and_counted_in_launch_modes(
    tmp_path, engine, mode
) -> None:
    report = record_json(tmp_path, *MODES[mode], "--", *qemu_command(rtc_bios(tmp_path)))
    assert_rtc_counts(report)


@pytest.mark.qemu
def test_qemu_rtc_index_writes_are_coalesced_and_counted_when_attached(
    tmp_path, engine, processes
) -> None:
    vmm = start_qemu(processes, rtc_bios(tmp_path, spin=3_000_000))
    report = record_json(tmp_path, "-p", str(vmm.pid))
    assert_rtc_counts(report)
    assert report["coalesced"]["wraps"] == 0
    assert vmm.wait(30) == 1


@pytest.mark.kvm
def test_kvm_s_tracepoints_count_every_write_kvm_handled_in_the_kernel(tmp_path, tracepoints):
    """The tracepoint engine sees no ring: it counts each port or MMIO write that was not
    followed by its exit (KVM took it in the kernel), so the same 199 writes as the ring's."""
    own = tmp_path / "own.json"
    argv = counted_command(outs=0, mmio_writes=200, coalesced=True, report_json=str(own))
    report = record_json(tmp_path, "--", *argv)
    assert report["exits"] == {"KVM_EXIT_MMIO": 1, "KVM_EXIT_IO": 1}
    assert report["coalesced"]["writes"] == [{"address": 0xC0000, "len": 1, "count": 199}]
    assert report["coalesced"]["total"] == json.loads(own.read_text())["coalesced"] == 199
    assert report["coalesced"]["kernel"] and report["coalesced"]["wraps"] == 0


@pytest.mark.qemu
def test_kvm_s_tracepoints_tell_the_rtc_index_writes_from_the_data_reads_that_exit(
    tmp_path, tracepoints, processes
) -> None:
    """`out 0x70` (KVM takes it) then `in 0x71` (an exit) in one run: the write is KVM's,
    the exit an IN of 0x71, launched and attached."""
    report = record_json(tmp_path, "--", *qemu_command(rtc_bios(tmp_path)))
    assert_rtc_counts(report)
    vmm = start_qemu(processes, rtc_bios(tmp_path, spin=3_000_000))
    assert_rtc_counts(record_json(tmp_path, "-p", str(vmm.pid)))
    assert vmm.wait(30) == 1


def test_a_batch_without_coalesced_records_changes_nothing() -> None:
    stats = ExitStats()
    stats.add_batch(ExitBatch.of([ExitEvent(0, 2, 0, 10, 20, 0x80, 1)]))
    snap = stats.snapshot()
    assert snap.coalesced.total == 0 and not snap.coalesced.read and snap.coalesced.top == ()
    assert "COALESCED" not in summary_table(snap, {})
    assert struct.calcsize("<BBHIqIIQ") == 32


@pytest.mark.kvm
def test_where_kvm_run_is_read_remotely_the_ring_is_said_unreadable_once_and_nothing_counted(
    engine, monkeypatch
) -> None:
    from kvmtop.host import vcpu_maps
    from kvmtop.model.messages import Detached
    from kvmtop.tracer_thread import Tracer

    def refused(_pidfd: int, _fd: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(vcpu_maps, "pidfd_getfd", refused)
    tracer = Tracer()
    tracer.start()
    stats = ExitStats()
    try:
        tracer.launch(counted_command(outs=0, mmio_writes=200, coalesced=True)).result(10)
        while not isinstance(message := tracer.out.get(timeout=60), Detached):
            if isinstance(message, ExitBatch):
                stats.add_batch(message)
    finally:
        tracer.stop()
    snap = stats.snapshot()
    assert {r.label: r.count for r in snap.reasons} == {"KVM_EXIT_MMIO": 1, "KVM_EXIT_IO": 1}
    assert snap.coalesced.unreadable == (0,) and snap.coalesced.total == 0
    assert not snap.coalesced.read and snap.lost == 0
