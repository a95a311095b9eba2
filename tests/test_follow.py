"""Every process a launched command starts is followed, as `strace -f` follows it; vCPUs are told
apart by process and VM. Real programs, exact counts: each guest's exits are known."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
from guests.qemu_bios import build_bios, qemu_command
from helpers import start_minivmm, wait_for_vcpus

from kvmtop.decoder import exit_label
from kvmtop.host.procfs import tracer_pid
from kvmtop.minivmm.vmm import counted_command
from kvmtop.model.messages import Attached, Detached, ExitBatch
from kvmtop.model.vcpu_keys import VcpuKey
from kvmtop.tracer_thread import Tracer, open_tracer

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("any_engine")]

OUTS, MMIO = 150, 20
EACH = {"KVM_EXIT_IO": OUTS + 1, "KVM_EXIT_MMIO": MMIO}  # +1: the out that reports the status


@pytest.fixture(params=["notify", "trace", ""])
def seccomp(request: pytest.FixtureRequest, any_engine: str) -> str:
    """Launched under kvmtop's notifying filter, its RET_TRACE filter, or none (two stops);
    the tracepoint engine takes no filter: it runs once."""
    if any_engine == "tracepoints" and request.param != "":
        pytest.skip("the tracepoint engine puts no filter on a launched command")
    return str(request.param)


class Followed:
    """What a session saw: exits per vCPU (by process, VM and id), the processes, the end."""

    def __init__(self) -> None:
        self.per_vcpu: dict[VcpuKey, Counter[str]] = {}
        self.keys: dict[int, VcpuKey] = {}
        self.pids: set[int] = set()
        self.ended: dict[int, int | None] = {}
        self.began_after_end: list[int] = []  # a process said to begin after it had ended
        self.attached: Attached | None = None
        self.detached: Detached | None = None

    def take(self, message: object) -> None:
        if isinstance(message, Attached):
            self.attached = message
        elif isinstance(message, ExitBatch):
            for seen in message.vcpus:
                assert seen.key is not None
                self.keys[seen.vcpu] = seen.key
            for proc in message.processes:
                self.pids.add(proc.pid)
                if not proc.ended and proc.pid in self.ended:
                    self.began_after_end.append(proc.pid)
                if proc.ended:
                    self.ended[proc.pid] = proc.exit_status
            for e in message.events:
                key = self.keys[e.vcpu]
                self.per_vcpu.setdefault(key, Counter())[exit_label(e.reason, e.errno)] += 1
        elif isinstance(message, Detached):
            self.detached = message

    def by_pid(self) -> dict[int, list[dict[str, int]]]:
        out: dict[int, list[dict[str, int]]] = {}
        for key in sorted(self.per_vcpu):
            out.setdefault(key.pid, []).append(dict(self.per_vcpu[key]))
        return out


def follow(tracer: Tracer, timeout: float = 60) -> Followed:
    seen = Followed()
    deadline = time.monotonic() + timeout
    while seen.detached is None:
        seen.take(tracer.out.get(timeout=max(0.1, deadline - time.monotonic())))
    while not tracer.out.empty():
        seen.take(tracer.out.get_nowait())
    return seen


def launched(argv: list[str], seccomp: str, stdio: str | None = None) -> Followed:
    tracer = open_tracer(child_stdio=stdio)[0]
    tracer.start()
    try:
        tracer.launch(argv, seccomp).result(10)
        return follow(tracer)
    finally:
        tracer.stop()


def test_sh_c_children_are_followed_and_their_status_and_output_kept(tmp_path, seccomp):
    """dash runs the first command with vfork, the last with exec: both VMMs are traced."""
    out = tmp_path / "out.txt"
    vmm = " ".join(counted_command(outs=OUTS, mmio_writes=MMIO, exit_status=3))
    script = f"{vmm}; echo first=$? >{out}; {vmm}"  # the second one: sh execs it
    seen = launched(["sh", "-c", script], seccomp)
    assert out.read_text() == "first=3\n"
    assert seen.detached is not None and seen.detached.exit_status == 3
    counts = seen.by_pid()
    assert len(counts) == 2, counts  # the vforked child, and sh itself after its exec
    assert all(vcpus == [EACH] for vcpus in counts.values()), counts
    assert seen.ended[seen.detached.pid] == 3 and len(seen.pids) >= 2


FORK_HEAVY = [
    "bash",
    "-c",
    "for i in $(seq 60); do x=$(/usr/bin/env bash -c "
    '"y=\\$(echo hi); z=\\$(basename /a/b)"); done; exit 7',
]


def test_a_fork_heavy_command_is_followed_to_its_end(seccomp):
    """Short-lived children whose first stop and exit come before their parent's fork event
    are taken in once: the session ends with the last of them (it once waited forever for a
    child already reaped), each process ending after it began."""
    for _ in range(3):
        seen = launched(FORK_HEAVY, seccomp, stdio="/dev/null")
        assert seen.detached is not None and seen.detached.exit_status == 7
        assert len(seen.pids) > 150 and set(seen.ended) == seen.pids
        assert seen.began_after_end == []


@pytest.mark.parametrize("traps", ["", "trap '' INT TERM HUP; "])
def test_a_launched_command_gets_the_signal_dispositions_a_shell_gives_it(tmp_path, seccomp, traps):
    """What kvmtop was started with ignored stays ignored (a background job's SIGINT), nothing
    else is (glibc's internal signals, which posix_spawn ignores in its child, included)."""
    show = "grep -E '^Sig(Ign|Blk)' /proc/self/status"
    plain = subprocess.run(["bash", "-c", f"{traps}exec {show}"], capture_output=True, text=True)
    mode = {"notify": [], "trace": ["--no-notify"], "": ["--no-seccomp"]}[seccomp]
    record = f"exec {sys.executable} -m kvmtop record -o {tmp_path / 'r.kvmtop'} {' '.join(mode)}"
    launched = subprocess.run(["bash", "-c", f"{traps}{record} -- {show}"], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout == plain.stdout
    ignored = int(plain.stdout.split("SigIgn:")[1].split()[0], 16)  # what this test inherited, too
    assert not traps or ignored & 0x4003 == 0x4003  # HUP, INT, TERM


def test_a_python_subprocess_child_is_counted_exactly(tmp_path, seccomp):
    own = tmp_path / "own.json"
    child = counted_command(vcpus=2, outs=OUTS, mmio_writes=MMIO, exit_status=4,
                            report_json=str(own))  # fmt: skip
    code = f"import subprocess, sys; sys.exit(subprocess.run({child!r}).returncode + 1)"
    seen = launched([sys.executable, "-c", code], seccomp)
    assert seen.detached is not None and seen.detached.exit_status == 5
    mine = json.loads(own.read_text())
    (vcpus,) = seen.by_pid().values()
    assert vcpus == [mine["vcpus"]["0"]["exits"], mine["vcpus"]["1"]["exits"]] == [EACH, EACH]


def test_a_double_fork_whose_parent_exits_at_once_is_followed_to_its_end(tmp_path, seccomp):
    """The daemon's way: the command returns at once, its grandchild runs the VM on."""
    done = tmp_path / "done"
    vmm = counted_command(outs=OUTS, mmio_writes=MMIO, spin=3_000_000, exit_status=6)
    code = textwrap.dedent(f"""
        import os, subprocess, sys
        if os.fork():
            sys.exit(9)
        os.setsid()
        if os.fork():
            os._exit(0)
        rc = subprocess.run({vmm!r}).returncode
        open({str(done)!r}, "w").write(str(rc))
    """)
    seen = launched([sys.executable, "-c", code], seccomp)
    assert done.read_text() == "6"  # the session lasted until the grandchild's end
    assert seen.detached is not None and seen.detached.exit_status == 9  # the command's own
    assert list(seen.by_pid().values()) == [[EACH]]


@pytest.mark.qemu
def test_qemu_daemonize_is_followed_after_its_parent_returns(tmp_path, seccomp):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=2000, mmio_writes=100))
    pidfile = tmp_path / "qemu.pid"
    argv = qemu_command(str(bios), "-daemonize", "-pidfile", str(pidfile))
    seen = launched(argv, seccomp, stdio=os.devnull)
    assert seen.detached is not None and seen.detached.exit_status == 0  # the parent's
    daemon = int(pidfile.read_text()) if pidfile.exists() else None
    counts = seen.by_pid()
    assert len(counts) == 1, counts
    pid, vcpus = next(iter(counts.items()))
    assert daemon in (None, pid)  # QEMU removes its pidfile as it ends
    assert pid != seen.detached.pid
    assert vcpus[0]["KVM_EXIT_IO"] == 2001 and vcpus[0]["KVM_EXIT_MMIO"] == 100


def test_two_vmms_each_with_vcpu_0_are_told_apart(seccomp):
    a = " ".join(counted_command(outs=OUTS, mmio_writes=MMIO, spin=2_000_000))
    b = " ".join(counted_command(outs=2 * OUTS, mmio_writes=0, spin=2_000_000))
    seen = launched(["sh", "-c", f"{a} & {b} & wait"], seccomp)
    counts = sorted(seen.by_pid().values(), key=lambda v: v[0]["KVM_EXIT_IO"])
    assert counts == [[EACH], [{"KVM_EXIT_IO": 2 * OUTS + 1}]]
    assert {key.vcpu for key in seen.per_vcpu} == {0}


def test_one_process_with_two_vms_each_with_vcpu_0(seccomp):
    seen = launched(counted_command(outs=OUTS, mmio_writes=MMIO, vms=2, spin=1_000_000), seccomp)
    assert list(seen.by_pid().values()) == [[EACH, EACH]]
    keys = sorted(seen.per_vcpu)
    assert [k.vcpu for k in keys] == [0, 0] and keys[0].vm != keys[1].vm
    assert all(k.vm >= 0 for k in keys)


def test_attach_to_two_vmms_at_once_and_detach_leaves_both_untraced(processes):
    vmms = []
    for _ in range(2):
        vmm = subprocess.Popen(counted_command(outs=OUTS, mmio_writes=0, spin=5_000_000))
        processes.append(vmm)
        vmms.append(vmm)
    for vmm in vmms:
        wait_for_vcpus(vmm.pid)
    tracer = Tracer()
    tracer.start()
    try:
        attached = tracer.attach(vmms[0].pid, vmms[1].pid).result(10)
        assert attached.pids == (vmms[0].pid, vmms[1].pid)
        assert all(tracer_pid(v.pid) != 0 for v in vmms)  # (our tracer thread)
        time.sleep(0.3)
        ended = tracer.detach().result(10)
        assert ended.why == "detached"
        assert all(tracer_pid(v.pid) == 0 for v in vmms)
    finally:
        tracer.stop()
    assert [vmm.wait(120) for vmm in vmms] == [0, 0]  # each ran on to its own end


def test_detaching_two_vmms_names_both(processes):
    from kvmtop.sources.session import TraceSession

    vmms = [start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=200) for _ in "ab"]
    session = TraceSession()
    try:
        session.attach(*(v.pid for v in vmms))
        session.wait_attached()
        session.detach()
        assert session.ended.wait(10)
    finally:
        session.close()
    notices = [text for _severity, text in session.take_notices()]
    assert f"detached from pids {vmms[0].pid}, {vmms[1].pid}; they run on" in notices, notices


def test_a_launched_commands_stdout_is_its_own(tmp_path):
    argv = [sys.executable, "-m", "kvmtop", "record", "-o", str(tmp_path / "r.kvmtop"), "--",
            "sh", "-c", "echo hello; exit 4"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 4 and result.stdout == "hello\n"
    assert re.search(r"\n0 exits in [\d.]+ m?s on 0 vCPU\(s\)", result.stderr), result.stderr
    assert "no vCPU was seen: the command made no VM" in result.stderr


def test_record_attaches_to_two_vmms_and_tells_their_vcpus_apart(processes):
    vmms = []
    for outs in (OUTS, 2 * OUTS):
        vmm = subprocess.Popen(counted_command(outs=outs, mmio_writes=0, spin=3_000_000))
        processes.append(vmm)
        vmms.append(vmm)
    for vmm in vmms:
        wait_for_vcpus(vmm.pid)
    argv = [sys.executable, "-m", "kvmtop", "record", "-o", os.devnull, "--json",
            "-p", str(vmms[0].pid), "-p", str(vmms[1].pid)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"and {vmms[1].pid};" in result.stderr
    vcpus = json.loads(result.stdout)["vcpus"]  # -p: the summary is the output
    assert {(v["pid"], v["vcpu"], v["exits"]["KVM_EXIT_IO"]) for v in vcpus.values()} == {
        (vmms[0].pid, 0, OUTS + 1),
        (vmms[1].pid, 0, 2 * OUTS + 1),
    }
    assert all(key == f"{v['pid']}:{v['vm']}:0" for key, v in vcpus.items())
    assert [vmm.wait(60) for vmm in vmms] == [0, 0]


@pytest.mark.parametrize("how", ["notify", "no-notify", "no-seccomp", "attach"])
def test_data_holds_the_values_reads_returned_to_the_guest(tmp_path, processes, how):
    """`--data`: an `in` or MMIO read's value, which the VMM puts in kvm_run before the next
    KVM_RUN, is recorded with its exit; writes keep theirs."""
    out = tmp_path / "r.kvmtop"
    vmm = counted_command(
        outs=5, mmio_writes=3, ins=7, mmio_reads=4, spin=3_000_000 if how == "attach" else 0
    )
    base = [sys.executable, "-m", "kvmtop", "record", "--data", "-o", str(out)]
    if how == "attach":
        guest = subprocess.Popen(vmm)
        processes.append(guest)
        wait_for_vcpus(guest.pid)
        argv = [*base, "-p", str(guest.pid)]
    else:
        argv = [*base, *([f"--{how}"] if how != "notify" else []), "--", *vmm]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    exported = subprocess.run([sys.executable, "-m", "kvmtop", "export", str(out), "--jsonl", "-"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    values = Counter(
        (e["reason"], e["direction"] if "direction" in e else e["write"], e.get("data", ""))
        for e in map(json.loads, exported.splitlines())
    )
    assert values == {
        ("KVM_EXIT_IO", "out", "00"): 5 + 1,  # and the last: the exit status, 0
        ("KVM_EXIT_IO", "in", "42"): 7,  # what the VMM gave the guest
        ("KVM_EXIT_MMIO", True, "00"): 3,
        ("KVM_EXIT_MMIO", False, "5a"): 4,
    }
