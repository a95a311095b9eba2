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
from kvmtop.trace.tp_engine import EVENTS, unavailable_reason
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


def test_samples_as_the_kernel_writes_them_make_the_ptrace_engines_records():
    """An `out` and an `in` (whose port comes with its completion at the next entry), built
    from this host's format files and fed to the engine as one ring holds them."""
    module = native.built("_tracepoints")
    root = tracefs_root()
    assert module is not None and root is not None
    rings_events = []
    layouts = {}
    for role, name, wanted, _filter in EVENTS:
        found = event_format(root, name)
        assert found is not None, name
        layouts[role] = found[1]
        layout = tuple((found[1][f].offset, found[1][f].size, found[1][f].signed) for f in wanted)
        rings_events.append((getattr(module, role), found[0], None, layout))
    rings = module.Rings([0], rings_events, 1, False)
    try:
        roles = {getattr(module, role): role for role, *_rest in EVENTS}
        ids = {roles[role]: ident for ident, role in rings.ids}  # the kernel's ids, CPU 0's

        def raw(role: str, **values: int) -> bytes:
            fields = layouts[role]
            size = max(f.offset + f.size for f in fields.values())
            out = bytearray(size)
            for name, value in values.items():
                f = fields[name]
                out[f.offset : f.offset + f.size] = (value & (1 << 8 * f.size) - 1).to_bytes(
                    f.size, "little")  # fmt: skip
            return bytes(out)

        pid, tid, base = 4242, 4243, 1_000_000
        rings.follow(pid)
        rings.set_base(base)
        rings.set_vcpu(pid, 9, 0)
        feed = b"".join([
            _sample(ids["R_RUN"], pid, tid, base + 100, raw("R_RUN", fd=9, cmd=KVM_RUN)),
            _sample(ids["R_PIO"], pid, tid, base + 150,
                    raw("R_PIO", rw=1, port=0x80, size=1, count=1, val=7)),
            _sample(ids["R_UEXIT"], pid, tid, base + 160, raw("R_UEXIT", reason=2, errno=0)),
            _sample(ids["R_RUN"], pid, tid, base + 300, raw("R_RUN", fd=9, cmd=KVM_RUN)),
            _sample(ids["R_UEXIT"], pid, tid, base + 400, raw("R_UEXIT", reason=2, errno=0)),
            _sample(ids["R_RUN"], pid, tid, base + 500, raw("R_RUN", fd=9, cmd=KVM_RUN)),
            _sample(ids["R_PIO"], pid, tid, base + 510,
                    raw("R_PIO", rw=0, port=0x71, size=1, count=1, val=0x42)),
            _sample(ids["R_UEXIT"], pid, tid, base + 600, raw("R_UEXIT", reason=10, errno=-4)),
        ])  # fmt: skip
        rings.feed(0, feed)
        assert rings.flush() is None
        records, seen, exits, lost, _news = rings.take()
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
    finally:
        rings.close()


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
    vcpus = json.loads(out.read_text())["vcpus"].values()
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
    (vcpu,) = json.loads(result.stdout)["vcpus"].values()
    assert vcpu["exits"] == {"KVM_EXIT_IO": 51, "KVM_EXIT_MMIO": 5}
