"""Exports: a Perfetto trace, CSV and JSON Lines that say exactly what the recording holds, and a
live JSON Lines stream that counts every exit of a real guest and ends cleanly when its reader
goes away."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import tracemalloc
from collections import Counter
from collections.abc import Iterator

import pytest
from guests.fixed_recording import START, events, write_fixed_recording
from guests.qemu_bios import qemu_command
from helpers import KVMTOP, assert_one_line_error, kvmtop, start_qemu

from kvmtop.abi.record_layout import EXIT_CYCLE
from kvmtop.formats.jsonl_csv import jsonl_chunks
from kvmtop.formats.perfetto import PerfettoTrace, us
from kvmtop.formats.recording import RecordingMeta, RecordingWriter, open_recording
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import Detached, ExitBatch

FIXED = events()


@pytest.fixture
def fixed(tmp_path) -> str:
    return write_fixed_recording(str(tmp_path / "fixed.kvmtop"))


def perfetto(path: str, *extra: str) -> dict:
    result = kvmtop("export", path, "--perfetto", "-", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def slices(trace: dict, cat: str) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == cat]


def test_perfetto_has_a_guest_slice_per_exit_and_a_vmm_slice_between_runs(fixed):
    trace = perfetto(fixed)
    assert trace["displayTimeUnit"] == "ns" and trace["otherData"]["pid"] == 4242
    per_vcpu = Counter(e.vcpu for e in FIXED)
    guest = Counter(e["tid"] - 1 for e in slices(trace, "guest"))
    vmm = Counter(e["tid"] - 1 for e in slices(trace, "vmm"))
    assert guest == per_vcpu  # one run per exit
    assert vmm == {v: n - 1 for v, n in per_vcpu.items()}  # the last exit's next entry is unknown
    names = {
        (e["tid"], e["args"]["name"]) for e in trace["traceEvents"] if e["name"] == "thread_name"
    }
    assert names == {(1, "vCPU 0"), (2, "vCPU 1")}
    process = [e for e in trace["traceEvents"] if e["name"] == "process_name"]
    assert process[0]["pid"] == 4242 and process[0]["args"]["name"].endswith("-name fixed")


def test_perfetto_slices_are_exact_in_time_order_per_vcpu_and_carry_the_details(fixed):
    trace = perfetto(fixed)
    first = FIXED[0]
    assert slices(trace, "guest")[0] == {
        "ph": "X", "pid": 4242, "tid": 1, "ts": 0.0, "dur": 20.0, "name": "guest → IO",
        "cat": "guest", "args": {"port": "0x3f8", "direction": "out", "size": 1, "count": 1,
                                 "port_name": "COM1 data"},
    }  # fmt: skip
    second = next(e for e in FIXED[1:] if e.vcpu == 0)
    assert slices(trace, "vmm")[0] == {
        "ph": "X", "pid": 4242, "tid": 1, "ts": (first.exit_ns - START) / 1e3,
        "dur": (second.entry_ns - first.exit_ns) / 1e3, "name": "VMM: IO 0x3f8 out",
        "cat": "vmm", "args": {"port": "0x3f8", "direction": "out", "size": 1, "count": 1,
                               "port_name": "COM1 data"},
    }  # fmt: skip
    for tid in (1, 2):
        track = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == tid]
        ns = [(round(e["ts"] * 1e3), round((e["ts"] + e["dur"]) * 1e3)) for e in track]
        assert all(end <= next_start for (_, end), (next_start, _) in zip(ns, ns[1:], strict=False))
        kinds = [e["cat"] for e in track]
        assert kinds[:3] == ["guest", "vmm", "guest"]  # runs and handling alternate
    intr = [e for e in slices(trace, "guest") if e["name"] == "guest → INTR"]
    assert len(intr) == 1 and intr[0]["args"] == {"errno": "EINTR"} and intr[0]["tid"] == 2
    mmio = next(e for e in slices(trace, "vmm") if e["name"].startswith("VMM: MMIO"))
    assert mmio["name"] == "VMM: MMIO 0xd0010 read" and mmio["args"]["len"] == 4


def test_perfetto_rate_counter_gives_each_bins_exits_per_second(fixed):
    trace = perfetto(fixed, "--rate-bin", "100")
    for vcpu in (0, 1):
        bins = Counter((e.exit_ns - START) // 100_000_000 for e in FIXED if e.vcpu == vcpu)
        values = [(round(e["ts"] * 1e3) // 100_000_000, e["args"]["exits/s"])
                  for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == f"vCPU {vcpu}"]  # fmt: skip
        assert [t for t, _ in values] == sorted(t for t, _ in values)
        for i, rate in values:
            assert rate == bins.get(i, 0) * 10  # exits in 100 ms, per second
        assert values[-1][1] == 0  # after the last exit the rate falls to 0
        shown = dict(values)
        last = 0
        for i in range(max(bins) + 1):  # a counter holds its value until the next one
            last = shown.get(i, last)
            assert last == bins.get(i, 0) * 10


def one_stop_recording(path: str) -> str:
    meta = RecordingMeta(pid=77, argv=("vmm",), launched=True, start_ns=START,
                         start_wall=1.0, with_data=True)  # fmt: skip
    writer = RecordingWriter.create(path, meta, with_data=True)
    cycle = [
        ExitEvent(0, 2, 0, START + 1000, START + 5000, 0x80, 1 | 1 << 8, 1 | EXIT_CYCLE, b"\x07"),
        ExitEvent(0, 6, 0, START + 5000, START + 9500, 0xC0000, 1, 1 | EXIT_CYCLE, b"\x2a"),
        ExitEvent(0, 10, 4, START + 9500, START + 9800, flags=EXIT_CYCLE),
    ]
    writer.write_batch(ExitBatch.of(cycle, START))
    writer.write_detached(Detached(77, "exited", START + 10_000, 1))
    writer.close()
    return path


def test_perfetto_one_stop_exits_are_one_slice_spanning_run_and_handling(tmp_path):
    trace = perfetto(one_stop_recording(str(tmp_path / "c.kvmtop")))
    cycles = slices(trace, "guest+vmm")
    assert not slices(trace, "guest") and not slices(trace, "vmm")
    assert [(e["name"], e["ts"], e["dur"]) for e in cycles] == [
        ("guest+VMM: IO 0x80 out", 1.0, 4.0),
        ("guest+VMM: MMIO 0xc0000 write", 5.0, 4.5),
        ("guest+VMM: INTR", 9.5, 0.3),
    ]
    assert cycles[0]["args"]["data"] == "07" and cycles[1]["args"]["data"] == "2a"


def test_jsonl_export_has_one_object_per_exit_with_data_only_when_recorded(tmp_path, fixed):
    lines = kvmtop("export", fixed, "--jsonl", "-").stdout.splitlines()
    assert len(lines) == len(FIXED)
    assert json.loads(lines[0]) == {"vcpu": 0, "reason": "KVM_EXIT_IO", "errno": 0,
                                    "entry_ns": 0, "exit_ns": 20000, "port": 0x3F8,
                                    "direction": "out", "size": 1, "count": 1}  # fmt: skip
    assert not any('"data"' in line for line in lines)
    objs = [json.loads(x) for x in kvmtop("export", one_stop_recording(str(tmp_path / "c")),
                                          "--jsonl", "-").stdout.splitlines()]  # fmt: skip
    assert objs[1] == {"vcpu": 0, "reason": "KVM_EXIT_MMIO", "errno": 0, "entry_ns": 5000,
                       "exit_ns": 9500, "address": 0xC0000, "len": 1, "write": True,
                       "data": "2a", "one_stop": True}  # fmt: skip
    assert objs[2]["reason"] == "KVM_EXIT_INTR" and objs[2]["errno"] == 4


def test_csv_export_has_a_row_per_exit(tmp_path, fixed):
    out = tmp_path / "exits.csv"
    result = kvmtop("export", fixed, "--csv", str(out))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(FIXED)
    assert rows[0] == {"vcpu": "0", "reason": "KVM_EXIT_IO", "errno": "0", "entry_ns": "0",
                       "exit_ns": "20000", "guest_ns": "20000", "one_stop": "0", "write": "1",
                       "detail_a": str(0x3F8), "detail_b": "257",
                       "description": "IO out port=0x3f8 size=1", "data": "",
                       "pid": "", "vm": "", "rip": "", "linear": "", "symbol": ""}  # fmt: skip
    assert Counter(r["reason"] for r in rows)["KVM_EXIT_HLT"] == sum(e.reason == 5 for e in FIXED)


def test_every_export_is_readable_by_its_owner_only_like_the_recording(tmp_path, fixed):
    for form in ("--csv", "--jsonl", "--perfetto"):
        out = tmp_path / f"exits{form}"
        out.write_text("")
        out.chmod(0o644)  # an older export, made readable to all: no longer
        assert kvmtop("export", fixed, form, str(out)).returncode == 0
        assert oct(out.stat().st_mode & 0o777) == "0o600", form


def test_report_csv_is_the_summary_table(fixed):
    result = kvmtop("report", fixed, "--csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    summary = json.loads(kvmtop("report", fixed, "--json").stdout)
    assert result.stdout.startswith("vcpu,reason,count,share_pct,rate_per_s,guest_min_ns,")
    for vcpu in ("0", "1"):
        mine = {r["reason"]: r for r in rows if r["vcpu"] == vcpu}
        expected = summary["vcpus"][vcpu]["reasons"]
        assert {k: int(r["count"]) for k, r in mine.items()} == summary["vcpus"][vcpu]["exits"]
        for label, r in mine.items():
            assert int(r["guest_p50_ns"]) == expected[label]["guest"]["p50_ns"]
            assert int(r["vmm_p99_ns"]) == expected[label]["handling"]["p99_ns"]
            assert float(r["rate_per_s"]) == expected[label]["rate"]
        assert sum(float(r["share_pct"]) for r in mine.values()) == pytest.approx(100, abs=0.01)
    assert sum(int(r["count"]) for r in rows if r["vcpu"] == "all") == len(FIXED)


def test_perfetto_streams_in_bounded_memory():
    meta = RecordingMeta(pid=1, argv=(), launched=False, start_ns=0, start_wall=0.0,
                         with_data=False)  # fmt: skip

    def batches(n: int) -> Iterator[ExitBatch]:
        for i in range(0, n, 1000):
            yield ExitBatch.of(ExitEvent(j % 4, 2, 0, j * 5000, j * 5000 + 2000, 0x80, 257, 1)
                                  for j in range(i, i + 1000))  # fmt: skip

    def peak(n: int) -> tuple[int, int]:
        tracemalloc.start()
        size = sum(len(chunk) for chunk in PerfettoTrace(meta).chunks(batches(n)))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size, peak

    small_size, small_peak = peak(5_000)
    big_size, big_peak = peak(50_000)
    assert big_size > 9 * small_size  # ten times the exits, ten times the text ...
    assert big_peak < 2 * small_peak  # ... in the same memory
    assert sum(1 for _ in jsonl_chunks(batches(20_000), 0)) == 20


def test_times_are_exact_microseconds():
    assert [us(1_234_567), us(5), us(-1500), us(10**18 + 1)] == [
        "1234.567", "0.005", "-1.500", "1000000000000000.001",
    ]  # fmt: skip


def test_a_truncated_recording_exports_what_it_holds_and_says_so(tmp_path, fixed):
    data = open(fixed, "rb").read()
    cut = tmp_path / "cut.kvmtop"
    cut.write_bytes(data[: len(data) // 2 + 7])
    out = tmp_path / "cut.json"
    result = kvmtop("export", str(cut), "--perfetto", str(out))
    assert_one_line_error(result, 6, "is truncated (no end marker, torn last record): exported the")
    held = sum(len(b.events) for b in open_recording(str(cut)).batches())
    assert len(slices(json.load(out.open()), "guest")) == held > 0


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [(["export", "/no/such.kvmtop", "--csv", "-"], 6, "No such file or directory"),
     (["export", "FIXED", "--perfetto", "/no/such/dir/t.json"], 8, "cannot write /no/such/dir/t.json"),
     (["export", "FIXED", "--csv", "FIXED"], 8, "it is the recording being exported"),
     (["export", "FIXED"], 2, "one of the arguments --perfetto --csv --jsonl is required"),
     (["export", "FIXED", "--perfetto", "-", "--rate-bin", "0"], 2, "--rate-bin"),
     (["report", "FIXED", "--csv", "--json"], 2, "not allowed with argument"),
     (["record", "-p", "1", "--jsonl", "/no/such/dir/x.jsonl"], 8, "cannot write /no/such/dir")],
)  # fmt: skip
def test_export_errors_are_one_line(fixed, args, status, text):
    before = open(fixed, "rb").read()
    assert_one_line_error(kvmtop(*[fixed if a == "FIXED" else a for a in args]), status, text)
    assert open(fixed, "rb").read() == before


def test_export_to_a_closed_pipe_ends_quietly(fixed):
    export = subprocess.Popen([*KVMTOP, "export", fixed, "--perfetto", "-"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert export.stdout is not None and export.stdout.readline().startswith(b'{"displayTimeUnit"')
    export.stdout.close()  # like `| head -1`
    assert export.wait(60) == 0
    assert export.stderr is not None and export.stderr.read() == b""


@pytest.mark.qemu
def test_record_jsonl_streams_every_exit_of_a_launched_guest(tmp_path, bios):
    result = kvmtop("record", "--jsonl", "-", "--data", "--", *qemu_command(bios()))
    assert result.returncode == 1, result.stderr  # QEMU's status
    objs = [json.loads(line) for line in result.stdout.splitlines()]  # stdout is pure JSONL
    posts = [o for o in objs if o.get("port") == 0x80]
    assert len(posts) == 300 and all(o["direction"] == "out" and o["size"] == 1 for o in posts)
    assert all(o["data"] == "00" or len(o["data"]) == 2 for o in posts)  # data with --data
    mmio = [o for o in objs if o["reason"] == "KVM_EXIT_MMIO"]
    assert {(o["address"], o["len"], o["write"]) for o in mmio} == {(0xC0000, 1, True)}
    assert len(mmio) == 200
    assert all(o["entry_ns"] <= o["exit_ns"] for o in objs)
    assert "KVM_EXIT_IO" in result.stderr and "0x0080 out" in result.stderr  # the summary
    assert not (tmp_path / "kvmtop.data").exists()


@pytest.mark.qemu
def test_record_jsonl_and_a_file_hold_the_same_exits(tmp_path, bios, processes):
    vmm = start_qemu(processes, bios(outs=300, mmio_writes=200, spin=3_000_000))
    out, stream = tmp_path / "r.kvmtop", tmp_path / "r.jsonl"
    result = kvmtop("record", "-p", str(vmm.pid), "-o", str(out), "--jsonl", str(stream))
    assert result.returncode == 0, result.stderr
    assert "recording to" in result.stderr and "KVM_EXIT_IO" in result.stdout
    live = stream.read_text().splitlines()
    assert sum(json.loads(line).get("port") == 0x80 for line in live) == 300
    assert live == kvmtop("export", str(out), "--jsonl", "-").stdout.splitlines()
    assert vmm.wait(30) == 1


@pytest.mark.qemu
def test_record_jsonl_into_head_detaches_cleanly_and_the_guest_finishes(bios, processes):
    vmm = start_qemu(processes, bios(outs=40_000, mmio_writes=0, spin=3_000_000))
    shell = f"{' '.join(KVMTOP)} record -p {vmm.pid} --jsonl - | head -1"
    pipeline = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert pipeline.returncode == 0, pipeline.stderr  # kvmtop's status too (pipefail)
    assert json.loads(pipeline.stdout)["port"] == 0x80
    assert "Traceback" not in pipeline.stderr and "BrokenPipe" not in pipeline.stderr
    assert "the JSONL reader closed its pipe; detached" in pipeline.stderr
    assert "exited with status" not in pipeline.stderr  # detached while the guest ran ...
    assert vmm.wait(120) == 1  # ... and it ran on to its end
