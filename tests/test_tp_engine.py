"""The tracepoint engine (kvmtop/trace/tp_engine.py, kvmtop.native._tracepoints): samples built
as the kernel writes them, from this host's format files, make the ptrace engines' records;
real guests launched and attached to are counted exactly; `record -a` sees every VMM."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
from helpers import wait_for_vcpus

from kvmtop import native
from kvmtop.abi.kvm import KVM_RUN
from kvmtop.decoder import tracepoint_format
from kvmtop.host.tracefs import event_format, tracefs_root
from kvmtop.minivmm.vmm import counted_command
from kvmtop.model.records import iter_events
from kvmtop.trace.tp_engine import EVENTS, RIP_EVENTS, unavailable_reason
from kvmtop.xlat_exit import ExitReason

WHY = unavailable_reason()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"the tracepoint engine cannot run here: {WHY}")

PERF_RECORD_SAMPLE = 9
KVM_EXIT_FORMAT = """name: kvm_exit
ID: 103
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int vcpu_id;\toffset:56;\tsize:4;\tsigned:0;
"""


def test_a_format_file_gives_each_field_s_offset_size_and_sign():
    event_id, fields = tracepoint_format(KVM_EXIT_FORMAT)
    assert event_id == 103
    assert (fields["guest_rip"].offset, fields["guest_rip"].size) == (16, 8)
    assert fields["common_pid"].signed and not fields["vcpu_id"].signed
    root = tracefs_root()
    assert root is not None
    found = event_format(root, "kvm/kvm_exit")  # there even where it never fires
    assert found is not None and {"exit_reason", "guest_rip", "vcpu_id"} <= set(found[1])


def _sample(ident: int, pid: int, tid: int, t: int, raw: bytes) -> bytes:
    raw += bytes(-(len(raw) + 4) % 8)
    body = struct.pack("<QIIQI", ident, pid, tid, t, len(raw)) + raw
    return struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 8 + len(body)) + body


PID, TID, BASE = 4242, 4243, 1_000_000


def fed(samples: list[tuple[str, int, dict[str, int]]], rip: bool = False) -> tuple:
    """An engine of one ring (CPU 0) fed ``samples`` (role, ns after BASE, field values) as the
    kernel writes them, with this host's format files; thread TID of PID runs vCPU 0 on fd 9
    (``rip``: as with --rip). What it took after processing them all."""
    module = native.built("_tracepoints")
    root = tracefs_root()
    assert module is not None and root is not None
    events, layouts = [], {}
    specs = EVENTS + RIP_EVENTS
    for role, name, wanted, _filter in specs:
        found = event_format(root, name)
        assert found is not None, name
        layouts[role] = found[1]
        layout = tuple((found[1][f].offset, found[1][f].size, found[1][f].signed) for f in wanted)
        events.append((getattr(module, role), found[0], None, layout))
    rings = module.Rings([0], events, 1, False, rip)
    try:
        roles = {getattr(module, role): role for role, *_rest in specs}
        ids = {roles[role]: ident for ident, role in rings.ids}  # the kernel's ids, CPU 0's

        def raw(role: str, values: dict[str, int]) -> bytes:
            fields = layouts[role]
            out = bytearray(max(f.offset + f.size for f in fields.values()))
            for name, value in values.items():
                f = fields[name]
                out[f.offset : f.offset + f.size] = (value & (1 << 8 * f.size) - 1).to_bytes(
                    f.size, "little")  # fmt: skip
            return bytes(out)

        rings.follow(PID)
        rings.set_base(BASE)
        rings.set_vcpu(PID, 9, 0)
        rings.feed(0, b"".join(_sample(ids[role], PID, TID, BASE + t, raw(role, values))
                               for role, t, values in samples))  # fmt: skip
        assert rings.flush() is None
        return rings.take()
    finally:
        rings.close()


def test_samples_as_the_kernel_writes_them_make_the_ptrace_engines_records():
    """An `out` and an `in` (whose port comes with its completion at the next entry), built
    from this host's format files and fed to the engine as one ring holds them."""
    records, seen, exits, lost, _news, _kernel = fed([
        ("R_RUN", 100, dict(fd=9, cmd=KVM_RUN)),
        ("R_PIO", 150, dict(rw=1, port=0x80, size=1, count=1, val=7)),
        ("R_UEXIT", 160, dict(reason=2, errno=0)),
        ("R_RUN", 300, dict(fd=9, cmd=KVM_RUN)),
        ("R_UEXIT", 400, dict(reason=2, errno=0)),
        ("R_RUN", 500, dict(fd=9, cmd=KVM_RUN)),
        ("R_PIO", 510, dict(rw=0, port=0x71, size=1, count=1, val=0x42)),
        ("R_UEXIT", 600, dict(reason=10, errno=-4)),
    ])  # fmt: skip
    base = BASE
    events = list(iter_events(records, base))
    assert exits == 3 and lost == 0
    out, inp, intr = events
    assert (out.reason, out.a, out.entry_ns, out.exit_ns) == (ExitReason.IO, 0x80, base + 100,
                                                               base + 160)  # fmt: skip
    assert out.flags & 1  # a write
    assert (inp.reason, inp.a, inp.entry_ns, inp.exit_ns) == (ExitReason.IO, 0x71, base + 300,
                                                               base + 400)  # fmt: skip
    assert not inp.flags & 1
    assert (intr.reason, intr.errno) == (ExitReason.INTR, 4)
    assert len(seen) == 32  # one VCPU record: vCPU 0 ran on the thread


def test_an_exit_s_rip_is_its_last_emulated_instruction_s_or_its_last_hardware_exit_s():
    """With --rip: after the emulated instruction that exited where the VMM completed it (an
    `out`), on it where the VMM's answer completes it (an `in`); linear and CPL known in real
    mode only; else kvm_exit's guest_rip (VMX, SVM: the instruction that exited)."""
    real, prot32, vmx, io = 0, 1 | 4, 1, 30
    records, _seen, exits, _lost, _news, _kernel = fed([
        ("R_RUN", 100, dict(fd=9, cmd=KVM_RUN)),
        ("R_EMUL", 110, dict(rip=0x8, csbase=0x10000, len=2, flags=real, failed=0)),
        ("R_PIO", 111, dict(rw=1, port=0x80, size=1, count=1, val=7)),
        ("R_UEXIT", 120, dict(reason=2, errno=0)),
        ("R_RUN", 200, dict(fd=9, cmd=KVM_RUN)),
        ("R_EMUL", 210, dict(rip=0x11, csbase=0x10000, len=2, flags=real, failed=0)),
        ("R_UEXIT", 220, dict(reason=2, errno=0)),
        ("R_RUN", 300, dict(fd=9, cmd=KVM_RUN)),
        ("R_PIO", 301, dict(rw=0, port=0x71, size=1, count=1, val=0x42)),  # the `in` completed
        ("R_EMUL", 310, dict(rip=0x400, csbase=0x2000, len=3, flags=prot32, failed=0)),
        ("R_MMIO", 311, dict(type=2, len=4, gpa=0xFEE00000, val=1)),
        ("R_UEXIT", 320, dict(reason=6, errno=0)),
        ("R_RUN", 400, dict(fd=9, cmd=KVM_RUN)),
        ("R_KEXIT", 410, dict(exit_reason=io, isa=vmx, guest_rip=0xFFFF800000001003)),
        ("R_PIO", 411, dict(rw=1, port=0x80, size=1, count=1, val=2)),
        ("R_UEXIT", 420, dict(reason=2, errno=0)),
    ], rip=True)  # fmt: skip
    out, inp, mmio, fast = iter_events(records, BASE)
    assert exits == 4 and inp.a == 0x71
    assert (out.rip.rip, out.rip.linear, out.rip.cpl) == (0xA, 0x1000A, 0)
    assert (inp.rip.rip, inp.rip.linear, inp.rip.cpl) == (0x11, 0x10011, 0)
    assert (mmio.rip.rip, mmio.rip.linear, mmio.rip.cpl) == (0x403, 0x2403, -1)
    rip = 0xFFFF800000001003
    assert (fast.rip.rip, fast.rip.linear, fast.rip.cpl) == (rip, rip, -1)
    without, *_rest = fed([
        ("R_RUN", 100, dict(fd=9, cmd=KVM_RUN)),
        ("R_EMUL", 110, dict(rip=0x8, csbase=0x10000, len=2, flags=real, failed=0)),
        ("R_PIO", 111, dict(rw=1, port=0x80, size=1, count=1, val=7)),
        ("R_UEXIT", 120, dict(reason=2, errno=0)),
    ])  # fmt: skip
    assert [e.rip for e in iter_events(without, BASE)] == [None]


def test_record_a_sees_every_vmm_started_after_it(tmp_path, processes):
    """`record -a`: two VMMs started once it runs, each counted exactly, told apart by pid."""
    out = tmp_path / "a.json"
    argv = [sys.executable, "-m", "kvmtop", "--engine", "tracepoints", "record", "-a", "--json",
            "-o", str(tmp_path / "a.kvmtop"), "--duration", "6"]  # fmt: skip
    with open(out, "w") as f:
        rec = subprocess.Popen(argv, stdout=f, stderr=subprocess.PIPE, text=True)
    processes.append(rec)
    time.sleep(1.0)
    vmms = [subprocess.Popen(counted_command(outs=n, mmio_writes=3)) for n in (40, 70)]
    processes.extend(vmms)
    for vmm in vmms:
        assert vmm.wait(60) == 0
    _out, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    summary = json.loads(out.read_text())
    assert summary["dropped_events"] == {}  # the default rings hold every event
    vcpus = summary["vcpus"].values()
    mine = {v["pid"]: v["exits"] for v in vcpus if v["pid"] in (vmms[0].pid, vmms[1].pid)}
    assert mine == {
        vmms[0].pid: {"KVM_EXIT_IO": 41, "KVM_EXIT_MMIO": 3},
        vmms[1].pid: {"KVM_EXIT_IO": 71, "KVM_EXIT_MMIO": 3},
    }


def test_attach_counts_the_exit_of_a_run_begun_before_it(tmp_path, processes):
    """A guest spinning inside KVM_RUN when kvmtop attaches: that run's exit is counted (its
    vCPU from the thread's next KVM_RUN), with every exit after it."""
    vmm = subprocess.Popen(counted_command(outs=50, mmio_writes=5, spin=3_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    argv = [sys.executable, "-m", "kvmtop", "--engine", "tracepoints", "record", "--json",
            "-o", os.devnull, "-p", str(vmm.pid)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dropped_events"] == {}
    (vcpu,) = summary["vcpus"].values()
    assert vcpu["exits"] == {"KVM_EXIT_IO": 51, "KVM_EXIT_MMIO": 5}


def test_events_the_kernel_dropped_are_recorded_per_cpu_and_said_in_the_summary(tmp_path):
    from kvmtop.aggregate.exits import ExitStats
    from kvmtop.formats.recording import RecordingMeta, RecordingWriter, open_recording
    from kvmtop.formats.report import summary_json, summary_table
    from kvmtop.model.messages import ExitBatch

    path = str(tmp_path / "d.kvmtop")
    writer = RecordingWriter.create(path, RecordingMeta(1, ("vmm",), False, 10**12, 0.0, False),
                                    with_data=False)  # fmt: skip
    writer.write_batch(ExitBatch(b"", 10**12, dropped=((0, 5), (1, 7))))
    writer.write_batch(ExitBatch(b"", 10**12, dropped=((1, 1),)))
    writer.close()
    stats = ExitStats()
    for batch in open_recording(path).batches():
        stats.add_batch(batch)
    snap = stats.snapshot()
    assert snap.dropped == ((0, 5), (1, 8))
    assert summary_json(snap, {})["dropped_events"] == {"0": 5, "1": 8}
    assert "the kernel dropped 13 tracepoint events (CPU 0: 5, CPU 1: 8)" in summary_table(snap, {})


@pytest.mark.parametrize(("mode", "handler_us"), [("io", 0), ("mmio", 20), ("mix", 100)])
def test_a_static_vmm_is_counted_exactly_and_its_handling_times_are_its_own(
    timed_vmm_static, mode, handler_us
):
    """A statically linked C VMM that times each KVM_RUN itself (two clock reads tens of ns
    from the syscall): every exit counted, and the VMM time per exit of each reason within
    2 µs of its own clock (the syscall's way out and back in lies between the two), plus what
    its thread waited for a CPU meanwhile."""
    exits = 4000
    argv = [sys.executable, "-m", "kvmtop", "--engine", "tracepoints", "record", "--json",
            "-o", os.devnull, "--", timed_vmm_static, str(exits), str(handler_us), mode]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    own = json.loads(result.stdout)
    summary = json.loads(result.stderr[result.stderr.index("{") :])
    assert summary["dropped_events"] == {} and summary["lost"] == 0
    for key, label in (("io", "KVM_EXIT_IO"), ("mmio", "KVM_EXIT_MMIO")):
        n, ns = own[key]
        assert summary["exits"].get(label, 0) == n
        if n:
            handling = summary["reasons"][label]["handling"]
            mean = handling["total_ns"] / handling["count"]
            # a wait for a CPU as the syscall returns (a busy host) is the VMM's to kvmtop, the
            # run's to the VMM's clock: allowed on top, as long as the VMM's thread waited
            allowed = 2000 + own["run_delay_ns"] / n
            assert abs(mean - ns / n) < allowed, (label, mean, ns / n, own["run_delay_ns"])


async def test_the_tui_on_every_vmm_counts_one_started_after_it(processes, tracepoints):
    """`kvmtop -a`: a VMM started once the TUI runs is counted exactly, as a VM of its own, and
    the title says what is traced."""
    from kvmtop.app import KvmtopApp

    app = KvmtopApp(all_vms=True)
    async with app.run_test(size=(160, 48)) as pilot:
        for _ in range(100):
            if app.session is not None and app.session.every_vmm:
                break
            await pilot.pause(0.05)
        vmm = subprocess.Popen(counted_command(outs=200, mmio_writes=4))
        processes.append(vmm)

        def mine() -> dict[str, int]:
            snap = app.session.stats.snapshot()
            return {r.label: r.count for v in snap.vcpus if v.key is not None
                    and v.key.pid == vmm.pid for r in v.reasons}  # fmt: skip

        for _ in range(400):
            if vmm.poll() is not None and mine().get("KVM_EXIT_IO") == 201:
                break
            await pilot.pause(0.05)
        assert mine() == {"KVM_EXIT_IO": 201, "KVM_EXIT_MMIO": 4}
        assert app.screen.source.status().title == "every VMM on the host"
        await pilot.press("q")


def test_kvm_exit_samples_built_from_its_format_file_count_hardware_exits_by_name(tmp_path):
    """Where kvm_exit fires (VMX, SVM), every hardware exit is counted per vCPU by its name;
    it does not fire on every host, so its samples are built from its format file, which
    every host has. A write before a hardware exit is KVM's: counted as handled in the kernel."""
    from kvmtop.aggregate.exits import ExitStats
    from kvmtop.formats.recording import RecordingMeta, RecordingWriter, open_recording
    from kvmtop.formats.report import summary_json, summary_table
    from kvmtop.model.messages import ExitBatch

    hlt, io, vmx = 12, 30, 1
    records, _seen, exits, _lost, _news, kernel = fed([
        ("R_RUN", 100, dict(fd=9, cmd=KVM_RUN)),
        ("R_KEXIT", 110, dict(exit_reason=io, isa=vmx, guest_rip=0x1000)),
        ("R_PIO", 111, dict(rw=1, port=0x70, size=1, count=1, val=1)),  # KVM's (in-kernel)
        ("R_KEXIT", 120, dict(exit_reason=hlt, isa=vmx, guest_rip=0x1002)),
        ("R_KEXIT", 130, dict(exit_reason=io, isa=vmx, guest_rip=0x1003)),
        ("R_PIO", 131, dict(rw=1, port=0x80, size=1, count=1, val=2)),  # the VMM's
        ("R_UEXIT", 140, dict(reason=2, errno=0)),
    ])  # fmt: skip
    base = BASE
    (out,) = list(iter_events(records, base))
    assert exits == 1 and out.a == 0x80
    path = str(tmp_path / "h.kvmtop")
    writer = RecordingWriter.create(path, RecordingMeta(1, ("vmm",), False, base, 0.0, False),
                                    with_data=False)  # fmt: skip
    writer.write_batch(ExitBatch(records, base, coalesced=kernel))
    writer.close()
    stats = ExitStats()
    for batch in open_recording(path).batches():
        stats.add_batch(batch)
    snap = stats.snapshot()
    assert snap.hardware == (("vmx:IO_INSTRUCTION", 2), ("vmx:HLT", 1))
    report = summary_json(snap, {})
    assert report["hardware_exits"] == {"vmx:IO_INSTRUCTION": 2, "vmx:HLT": 1}
    assert report["vcpus"]["0"]["hardware_exits"] == {"vmx:IO_INSTRUCTION": 2, "vmx:HLT": 1}
    assert report["coalesced"]["writes"] == [{"port": 0x70, "len": 1, "count": 1}]
    assert "HARDWARE EXITS (kvm_exit)" in summary_table(snap, {})


def _bpf_rings(pages: int = 512):
    """The engine's events delivered by BPF (as root), following no process yet; skips where the
    kernel will not load them."""
    from kvmtop.trace.tp_engine import online_cpus, opened_events

    module = native.built("_tracepoints")
    try:
        return module.Rings(online_cpus(), opened_events(module, EVENTS), pages, False, bpf=True)
    except OSError as exc:
        pytest.skip(f"this process may not load BPF programs: {exc}")


def test_bpf_programs_leave_another_tool_s_perf_samples_of_the_same_tracepoints_whole(processes):
    """kvmtop's BPF programs return 1: a second kvmtop reading the same tracepoints as perf
    samples, while they run, still counts every exit (a program that returned 0 would drop
    every sample of its tracepoint, anyone's: this one would count nothing)."""
    rings = _bpf_rings()
    try:
        argv = [sys.executable, "-m", "kvmtop", "--engine", "tracepoints", "record", "--json",
                "-o", os.devnull, "--", *counted_command(outs=60, mmio_writes=4)]  # fmt: skip
        env = {**os.environ, "KVMTOP_TP_DELIVERY": "perf"}
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        assert "kernel tracepoints (perf samples): no stop per exit" in result.stderr
        summary = json.loads(result.stderr[result.stderr.index("\n{") + 1 :])
        assert summary["exits"] == {"KVM_EXIT_IO": 61, "KVM_EXIT_MMIO": 4}
        assert summary["dropped_events"] == {}
    finally:
        rings.close()


def test_a_bpf_ring_too_small_for_a_guest_counts_the_events_it_dropped_per_cpu(processes):
    """One page a CPU, never read while a guest runs: the BPF ring fills, and the programs
    count what found no room, on the CPU that ran them."""
    rings = _bpf_rings(pages=1)
    try:
        rings.set_base(time.monotonic_ns())
        vmm = subprocess.Popen(counted_command(outs=3000, mmio_writes=0))
        processes.append(vmm)
        rings.follow(vmm.pid)  # (the ring is read after the guest: none of its events passed)
        assert vmm.wait(60) == 0
        lost = rings.lost_events()
        # 3 events at least an exit (its entry, its exit, its port), 32+ bytes each, 8 KiB a ring
        assert sum(lost) >= 3 * 3001 - 8192 // 32, lost
        while (unknown := rings.flush()) is not None:  # the vCPU (pid, fd): slot 0
            rings.set_vcpu(unknown[1], unknown[3], 0)
        _records, _seen, exits, _unnamed, _news, _kernel = rings.take()
        assert exits < 3001  # (another test's guest may have filled the ring first: 0)
    finally:
        rings.close()


def test_the_reader_hands_over_a_followed_process_s_end_at_once_not_at_its_deadline(processes):
    """A traced command that ends is said when it ends: the exit record wakes the BPF reader,
    which hands it over then, not when the deadline it was given comes (a record's last exits
    would otherwise wait for it, and the recording end up to a reading interval late)."""
    rings = _bpf_rings()
    try:
        rings.set_base(time.monotonic_ns())
        proc = subprocess.Popen(["sleep", "0.5"])
        processes.append(proc)
        rings.follow(proc.pid)
        deadline_s = 60
        started = time.monotonic()
        news: tuple = ()
        while not any(n[0] == "exit" and n[1] == proc.pid for n in news):
            assert rings.run(time.monotonic_ns() + deadline_s * 10**9, 1 << 20, -1) is None
            news += rings.take()[4]
            assert time.monotonic() - started < deadline_s / 2, "the exit waited for the deadline"
        assert proc.wait(5) == 0
    finally:
        rings.close()
