"""The summary: vCPUs of several VMs told apart in every form, and a head line that says what
was measured."""

from __future__ import annotations

import csv
import io
import json

from guests.many_vms import START, many_vms_batch

from kvmtop.aggregate.exits import ExitStats
from kvmtop.formats.jsonl_csv import csv_chunks, jsonl_chunks
from kvmtop.formats.perfetto import PerfettoTrace
from kvmtop.formats.recording import RecordingMeta
from kvmtop.formats.report import summary_csv, summary_json, summary_table
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import ExitBatch
from kvmtop.units import command_text


def stats_of(*batches: ExitBatch) -> ExitStats:
    stats = ExitStats()
    for batch in batches:
        stats.add_batch(batch)
    return stats


def test_one_vm_keeps_plain_vcpu_ids_as_keys() -> None:
    events = [
        ExitEvent(v, 2, 0, START + i, START + i + 5, 0x80, 1, 1) for i, v in enumerate([0, 1, 1])
    ]
    summary = summary_json(stats_of(ExitBatch.of(events, START)).snapshot(), {})
    assert list(summary["vcpus"]) == ["0", "1"] and summary["vcpus"]["1"]["total"] == 2


def test_three_vms_each_with_vcpu_0_are_three_vcpus_everywhere() -> None:
    batch = many_vms_batch()
    snapshot = stats_of(batch).snapshot()
    assert snapshot.many_vms and [v.label for v in snapshot.vcpus] == [
        "100:4:0",
        "100:7:0",
        "200:5:0",
    ]
    assert [v.name for v in snapshot.vcpus][2] == "vCPU 0 of VM 5 in pid 200 (vmm-b)"

    vcpus = summary_json(snapshot, {})["vcpus"]
    assert {k: (v["pid"], v["vm"], v["vcpu"], v["total"]) for k, v in vcpus.items()} == {
        "100:4:0": (100, 4, 0, 3), "100:7:0": (100, 7, 0, 3), "200:5:0": (200, 5, 0, 3),
    }  # fmt: skip
    assert vcpus["100:7:0"]["process"] == "vmm-a"

    rows = list(csv.reader(io.StringIO(summary_csv(snapshot))))
    assert {r[0] for r in rows[1:]} == {"100:4:0", "100:7:0", "200:5:0", "all"}
    table = summary_table(snapshot, {"pid": 100, "argv": ["vmm-a"]})
    assert "on 3 vCPU(s) of 3 VMs" in table and "200:5:0  KVM_EXIT_IO" in table

    lines = [
        json.loads(line) for chunk in jsonl_chunks([batch], START) for line in chunk.splitlines()
    ]
    assert {(e["pid"], e["vm"], e["vcpu"]) for e in lines} == {
        (100, 4, 0),
        (100, 7, 0),
        (200, 5, 0),
    }
    exported = list(csv.DictReader(io.StringIO("".join(csv_chunks([batch], START)))))
    assert {(e["pid"], e["vm"], e["vcpu"]) for e in exported} == {
        ("100", "4", "0"),
        ("100", "7", "0"),
        ("200", "5", "0"),
    }

    meta = RecordingMeta(pid=100, argv=("vmm-a",), launched=True, start_ns=START, start_wall=0.0,
                         with_data=False)  # fmt: skip
    trace = json.loads("".join(PerfettoTrace(meta).chunks([batch])))["traceEvents"]
    slices = {(e["pid"], e["tid"]) for e in trace if e["ph"] == "X"}
    assert len(slices) == 3 and {pid for pid, _ in slices} == {100, 200}
    names = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    assert names == {100: "vmm-a", 200: "vmm-b"}


def test_the_head_line_says_what_was_measured() -> None:
    events = [
        ExitEvent(0, 2, 0, START + i * 70_000, START + i * 70_000 + 5, 0x80, 1, 1) for i in range(5)
    ]
    stats = stats_of(ExitBatch.of(events, START, stops=6))
    argv = ["qemu-system-x86_64", *(f"-option{i}" for i in range(30))]
    table = summary_table(
        stats.snapshot(), {"pid": 7, "argv": argv, "mode": "1 ptrace stop per exit"}
    )
    head = table.splitlines()
    assert head[0] == f"pid 7  {' '.join(argv)}"  # whole: nothing of what ran is hidden
    assert head[1].startswith("5 exits in 0.28 ms on 1 vCPU(s)")
    assert head[2] == "traced with 1 ptrace stop per exit: 1.20 stops per exit measured"
    assert summary_json(stats.snapshot(), {})["stops_per_exit"] == 1.2


def test_a_command_is_cut_between_arguments_and_says_how_many_are_left_out() -> None:
    argv = ["qemu-system-x86_64", "-enable-kvm", "-bios", "/tmp/b.bin", "-nodefaults", "-m", "16"]
    assert command_text(argv, 200) == " ".join(argv)
    assert command_text(argv, 50) == "qemu-system-x86_64 -enable-kvm -bios … (+4 more)"
    for width in range(1, 60):  # every argument shown whole, the program's always
        words = command_text(argv, width).split(" … ")[0].split()
        assert words == argv[: len(words)] and words[0] == argv[0]
        assert len(command_text(argv, width)) <= max(width, len(argv[0]) + len(" … (+6 more)"))


def test_one_stop_per_exit_labels_its_times_as_the_run_and_the_handling_together() -> None:
    from kvmtop.abi.record_layout import EXIT_CYCLE

    def table(flags: int) -> str:
        events = [ExitEvent(0, 2, 0, START + i * 70_000, START + (i + 1) * 70_000, 0x80, 1,
                            1 | flags) for i in range(5)]  # fmt: skip
        return summary_table(stats_of(ExitBatch.of(events, START, stops=5)).snapshot(), {})

    assert "RUN+VMM p50" in table(EXIT_CYCLE) and "GUEST p50" not in table(EXIT_CYCLE)
    assert "GUEST p50" in table(0) and "RUN+VMM" not in table(0)


def test_a_command_that_made_no_vcpu_is_told_so() -> None:
    table = summary_table(ExitStats().snapshot(), {"pid": 7, "argv": ["false"], "launched": True})
    assert "0 exits in 0.000 s on 0 vCPU(s)" in table
    assert "no vCPU was seen: the command made no VM" in table


def test_rates_are_over_the_time_traced_not_between_the_first_and_last_exit() -> None:
    """Two exits 1 µs apart in a second of tracing: 2 exits/s, not 2 million."""
    events = [
        ExitEvent(0, 2, 0, START + i * 1000, START + i * 1000 + 5, 0x80, 1, 1) for i in range(2)
    ]
    snapshot = stats_of(ExitBatch.of(events, START)).snapshot()
    meta = {"pid": 7, "argv": ["qemu"], "traced_s": 1.0}
    assert summary_table(snapshot, meta).splitlines()[1].startswith("2 exits in 1.000 s")
    summary = summary_json(snapshot, meta)
    assert summary["duration_s"] == 1.0 and summary["reasons"]["KVM_EXIT_IO"]["rate"] == 2.0
    rows = list(csv.DictReader(io.StringIO(summary_csv(snapshot, meta))))
    assert rows[0]["rate_per_s"] == "2.0"
    assert summary_json(snapshot, {})["duration_s"] == 0.000001  # without it: first to last


def test_the_net_handling_says_where_its_mean_lies_and_unknown_where_it_cannot() -> None:
    def report(high_ns: int) -> tuple[dict, str]:
        events = [
            ExitEvent(0, 2, 0, 0, 1_000, 0x80, 1, 1),
            ExitEvent(0, 2, 0, 101_000, 102_000, 0x80, 1, 1, held_stops=2, held_seen_ns=1_000,
                      held_unseen_ns=30_000, held_unseen_low_ns=20_000,
                      held_unseen_high_ns=high_ns),
        ]  # fmt: skip
        snapshot = stats_of(ExitBatch.of(events, 0)).snapshot()
        return summary_json(snapshot, {})["reasons"]["KVM_EXIT_IO"], summary_table(snapshot, {})

    io, table = report(40_000)
    assert io["handling_net"]["mean_low_ns"] == 59_000
    assert io["handling_net"]["mean_high_ns"] == 79_000 and io["handling_net"]["mean_known"]
    assert "59.0 µs–79.0 µs" in table
    assert "69.0 µs" in table  # the median, where the mean is known
    io, table = report(0)  # no most: from 0, and unknown
    assert (io["handling_net"]["mean_low_ns"], io["handling_net"]["mean_known"]) == (0, False)
    row = next(line for line in table.splitlines() if "KVM_EXIT_IO" in line)
    assert row.split()[-2:] == ["unknown", "unknown"]  # its median too: it once read 0 ns
