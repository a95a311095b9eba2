"""`kvmtop diff A B`: the pure comparison of two snapshots (hand-made exits), the command's
output, thresholds and errors, and two real recordings of a QEMU guest whose MMIO writes went
from 3,000 to 6,000."""

from __future__ import annotations

import json
import subprocess

import pytest
from guests.fixed_recording import write_fixed_recording
from guests.qemu_bios import build_bios, qemu_command
from helpers import KVMTOP

from kvmtop.aggregate.exits import ExitStats, StatsSnapshot
from kvmtop.formats.diff import DiffRow, diff_json, diff_snapshots, diff_table, moved_rows
from kvmtop.model.events import ExitEvent, VcpuSeen
from kvmtop.model.messages import ExitBatch
from kvmtop.model.vcpu_keys import VcpuKey

US = 1_000


def io(vcpu: int, t: int, guest_ns: int = 10 * US) -> ExitEvent:
    return ExitEvent(vcpu, 2, 0, t, t + guest_ns, 0x80, 1 | 1 << 8, 1)  # out 0x80, size 1


def mmio(vcpu: int, t: int, guest_ns: int = 10 * US) -> ExitEvent:
    return ExitEvent(vcpu, 6, 0, t, t + guest_ns, 0xC0000, 1, 1)  # a byte written at 0xc0000


def hlt(vcpu: int, t: int) -> ExitEvent:
    return ExitEvent(vcpu, 5, 0, t, t + 50 * US)


def snapshot(events: list[ExitEvent], pid: int = 0) -> StatsSnapshot:
    """The aggregate of ``events`` (spaced 100 µs apart from t=1 ms, in the order given)."""
    stats = ExitStats()
    spaced = [ExitEvent(e.vcpu, e.reason, e.errno, 1_000_000 + i * 100 * US,
                        1_000_000 + i * 100 * US + e.guest_ns, e.a, e.b, e.flags)
              for i, e in enumerate(events)]  # fmt: skip
    seen = [VcpuSeen(v, 100 + v, 0, VcpuKey(pid, 5, v) if pid else None)
            for v in sorted({e.vcpu for e in events})]  # fmt: skip
    stats.add_batch(ExitBatch.of(spaced, 0, seen))
    return stats.snapshot(top=None)


def row(rows: list[DiffRow], kind: str, key: str) -> DiffRow:
    [found] = [r for r in rows if (r.kind, r.key) == (kind, key)]
    return found


def test_doubled_mmio_writes_show_as_plus_100_percent_and_come_first():
    a = snapshot([io(0, 0)] * 300 + [mmio(0, 0)] * 300)
    b = snapshot([io(0, 0)] * 300 + [mmio(0, 0)] * 600)
    rows = diff_snapshots(a, 1.0, b, 1.0)
    for kind, key in (("reason", "KVM_EXIT_MMIO"), ("vcpu", "vCPU 0 KVM_EXIT_MMIO"),
                      ("mmio", "0x0000000c0000 write len 1")):  # fmt: skip
        r = row(rows, kind, key)
        assert (r.ratio("count"), r.ratio("rate")) == (2.0, 2.0) and r.moved(50) == ["rate"]
        assert r.moved(150) == []
    assert {(r.kind, r.key) for r in rows[:3]} == {
        ("reason", "KVM_EXIT_MMIO"), ("vcpu", "vCPU 0 KVM_EXIT_MMIO"),
        ("mmio", "0x0000000c0000 write len 1")}  # fmt: skip
    assert row(rows, "io", "0x0080 out size 1").ratio("rate") == 1.0
    assert row(rows, "reason", "KVM_EXIT_IO").moved(0) == []  # the same 10 µs each
    text = diff_table(rows, ("a", "b"), 50)
    line = next(x for x in text.splitlines() if "reason KVM_EXIT_MMIO" in x)
    assert line.split()[:7] == ["+100.0%", "reason", "KVM_EXIT_MMIO", "300", "600", "+100.0%",
                                "300.0"]  # fmt: skip
    assert "moved by more than 50%" in text and "reason KVM_EXIT_MMIO: rate" in text


def test_recordings_of_different_lengths_compare_by_rate():
    a = snapshot([io(0, 0)] * 1000)
    b = snapshot([io(0, 0)] * 200)
    [reason] = [r for r in diff_snapshots(a, 10.0, b, 2.0) if r.kind == "reason"]
    assert reason.ratio("count") == 0.2 and reason.ratio("rate") == 1.0
    assert (reason.a.rate, reason.b.rate) == (100.0, 100.0) and reason.moved(1) == []


def test_a_missing_vcpu_or_reason_is_new_or_gone_and_moves_only_with_enough_exits():
    a = snapshot([io(0, 0)] * 200 + [hlt(0, 0)] * 150)
    b = snapshot([io(0, 0)] * 200 + [io(1, 0)] * 120 + [mmio(1, 0)] * 5)
    rows = diff_snapshots(a, 1.0, b, 1.0)
    assert row(rows, "reason", "KVM_EXIT_HLT").status == "gone"
    assert row(rows, "vcpu", "vCPU 1 all").status == "new"
    assert row(rows, "vcpu", "vCPU 1 KVM_EXIT_IO").moved(1000) == ["new"]
    assert row(rows, "reason", "KVM_EXIT_HLT").moved(1000) == ["gone"]
    small = row(rows, "reason", "KVM_EXIT_MMIO")
    assert small.status == "new" and small.moved(0) == []  # 5 exits: noise, not a regression
    assert rows[-1].most_count < 100  # the small rows last
    text = diff_table(rows, ("a", "b"))
    assert any(x.split()[:3] == ["gone", "reason", "KVM_EXIT_HLT"] for x in text.splitlines())
    got = diff_json(rows, {}, 10)
    hlt_row = next(r for r in got["rows"] if r["key"] == "KVM_EXIT_HLT")
    assert hlt_row["status"] == "gone" and hlt_row["b"] is None and hlt_row["a"]["count"] == 150


def test_a_p99_that_moved_counts_only_where_both_sides_have_enough_exits():
    a = snapshot([io(0, 0, 10 * US)] * 300)
    b = snapshot([io(0, 0, 40 * US)] * 300)
    r = row(diff_snapshots(a, 1.0, b, 1.0), "reason", "KVM_EXIT_IO")
    assert r.ratio("guest_p99") == pytest.approx(4.0, rel=1 / 8)  # histograms: within an eighth
    assert r.moved(150) == ["guest p99"] and r.moved(400) == []
    few = snapshot([io(0, 0, 40 * US)] * 50)
    r = row(diff_snapshots(a, 1.0, few, 1.0 / 6), "reason", "KVM_EXIT_IO")
    assert r.ratio("rate") == pytest.approx(1.0) and r.moved(10) == []  # 50 exits: p99 not asked


def test_vcpus_match_by_their_vm_and_id_not_by_pid():
    a = snapshot([io(0, 0)] * 100 + [io(1, 0)] * 100, pid=1111)
    b = snapshot([io(0, 0)] * 100 + [io(1, 0)] * 300, pid=2222)
    rows = diff_snapshots(a, 1.0, b, 1.0)
    assert row(rows, "vcpu", "vCPU 1 all").ratio("count") == 3.0
    assert all(r.status == "both" for r in rows)


def test_moved_rows_of_the_same_recording_are_none_even_at_threshold_0():
    a = snapshot([io(0, 0)] * 300 + [mmio(0, 0)] * 300 + [hlt(0, 0)] * 200)
    assert moved_rows(diff_snapshots(a, 3.0, a, 3.0), 0) == []


# --- the command ---------------------------------------------------------------------------------


def kvmtop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVMTOP, *args], capture_output=True, text=True, timeout=120)


def test_diff_of_a_recording_with_itself_moves_nothing(tmp_path):
    path = write_fixed_recording(str(tmp_path / "fixed.kvmtop"))
    result = kvmtop("diff", path, path, "--threshold", "0")
    assert result.returncode == 0, result.stderr
    assert "nothing moved by more than 0%" in result.stdout
    got = json.loads(kvmtop("diff", path, path, "--json").stdout)
    assert got["a"]["exits"] == got["b"]["exits"] > 0 and got["moved"] == []
    assert {r["rate_ratio"] for r in got["rows"]} == {1.0}


@pytest.mark.parametrize("bad", ["missing", "corrupt", "empty", "directory"])
def test_a_bad_recording_is_one_line_and_status_6(tmp_path, bad):
    good = write_fixed_recording(str(tmp_path / "fixed.kvmtop"))
    path = tmp_path / "bad.kvmtop"
    if bad == "corrupt":
        path.write_bytes(b"not a recording at all" * 10)
    elif bad == "empty":
        path.write_bytes(b"")
    elif bad == "directory":
        path.mkdir()
    for args in ((good, str(path)), (str(path), good)):
        result = kvmtop("diff", *args, "--threshold", "50")
        assert result.returncode == 6, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("kvmtop: ")
        assert str(path) in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    "args", [["--threshold", "-5"], ["--threshold", "x"], ["--min-count", "0"]]
)
def test_a_bad_threshold_is_a_usage_error(tmp_path, args):
    path = write_fixed_recording(str(tmp_path / "fixed.kvmtop"))
    result = kvmtop("diff", path, path, *args)
    assert result.returncode == 2 and result.stderr.startswith("kvmtop: ")


# --- real recordings -----------------------------------------------------------------------------

OUTS = 3_000
SPIN = 4_000_000  # about 1 s before the exits: the recordings' lengths differ little


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two recordings of QEMU running a BIOS of OUTS `out`s and then 3,000 (A) or 6,000 (B)
    MMIO writes; each also makes one `out 0xf4` (its exit)."""
    tmp = tmp_path_factory.mktemp("diff")
    paths = {}
    for name, writes in (("a", 3_000), ("b", 6_000)):
        bios = tmp / f"{name}.bin"
        bios.write_bytes(build_bios(outs=OUTS, mmio_writes=writes, spin_iterations=SPIN))
        paths[name] = str(tmp / f"{name}.kvmtop")
        result = subprocess.run([*KVMTOP, "record", "-o", paths[name], "--",
                                 *qemu_command(str(bios))], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 1, result.stderr  # isa-debug-exit: 0 written is status 1
    return paths


@pytest.mark.qemu
def test_a_guest_whose_mmio_writes_doubled_shows_plus_100_percent_mmio(recordings):
    result = kvmtop("diff", recordings["a"], recordings["b"], "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    rows = {(r["kind"], r["key"]): r for r in got["rows"]}
    seconds = got["a"]["duration_s"] / got["b"]["duration_s"]
    for key in (("reason", "KVM_EXIT_MMIO"), ("vcpu", "vCPU 0 KVM_EXIT_MMIO"),
                ("mmio", "0x0000000c0000 write len 1")):  # fmt: skip
        r = rows[key]
        assert (r["a"]["count"], r["b"]["count"], r["count_ratio"]) == (3_000, 6_000, 2.0), key
        assert r["rate_ratio"] == pytest.approx(2.0 * seconds, rel=1e-4)  # each over its own time
    assert rows[("reason", "KVM_EXIT_IO")]["count_ratio"] == 1.0  # OUTS + 1 on both
    assert rows[("io", "0x0080 out size 1")]["count_ratio"] == 1.0
    text = kvmtop("diff", recordings["a"], recordings["b"]).stdout
    line = next(x for x in text.splitlines() if "reason KVM_EXIT_MMIO" in x)
    assert line.split()[3:6] == ["3000", "6000", "+100.0%"]


@pytest.mark.qemu
def test_a_threshold_below_the_change_fails_and_one_above_passes(recordings):
    """The rates: MMIO doubled, IO stayed, each over its recording's length (which a busy host
    stretches, one run more than the other: their ratio was 0.74 once), so the thresholds are
    set from the rates' changes: one below the MMIO rate's, one above every rate's. With
    --min-count 3002 the rows of 3,001 IO exits and the MMIO p99s (3,000 exits in A) are left
    out, so only the rates decide. By default the p99s count too: on this shared host a p99 can
    move by more than 150% between two runs (16 -> 55 us once, with other work on both CPUs),
    and then status 1 is the right answer."""
    a, b = recordings["a"], recordings["b"]
    rates = {(r["kind"], r["key"]): r["rate_ratio"]
             for r in json.loads(kvmtop("diff", a, b, "--json").stdout)["rows"]
             if r["rate_ratio"] is not None}  # fmt: skip
    mmio = abs(rates[("reason", "KVM_EXIT_MMIO")] - 1) * 100
    every = max(abs(ratio - 1) * 100 for ratio in rates.values())
    below, above = str(int(mmio * 0.9)), str(int(every * 1.1) + 1)
    assert mmio > 20  # doubled writes, in recordings of lengths within 1.6x
    low = kvmtop("diff", a, b, "--threshold", below, "--min-count", "3002")
    assert low.returncode == 1, low.stderr
    assert "reason KVM_EXIT_MMIO: rate" in low.stdout
    high = kvmtop("diff", a, b, "--threshold", above, "--min-count", "3002")
    assert high.returncode == 0, high.stdout
    assert f"nothing moved by more than {above}%" in high.stdout
    low = kvmtop("diff", a, b, "--threshold", below)
    assert low.returncode == 1 and "reason KVM_EXIT_MMIO: rate" in low.stdout
    result = kvmtop("diff", a, b, "--threshold", above, "--json")
    got = json.loads(result.stdout)
    rows = {(r["kind"], r["key"]): r for r in got["rows"]}
    for moved in got["moved"]:  # none where the p99s held: status 0
        assert set(moved["what"]) <= {"guest p99", "vmm p99"}, moved  # never a rate
        r = rows[(moved["kind"], moved["key"])]
        ratio = r["guest_p99_ratio"] if "guest p99" in moved["what"] else r["vmm_p99_ratio"]
        assert abs(ratio - 1) * 100 > int(above)
    assert result.returncode == (1 if got["moved"] else 0)
