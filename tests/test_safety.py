"""kvmtop never hurts the VM it watches, and survives what users throw at it."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest
from guests.qemu_bios import build_bios, qemu_command
from helpers import (
    KVMTOP,
    a_vcpu_thread,
    start_minivmm,
    start_recording,
    tgkill,
    wait_for_vcpus,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtop.errors import RecordingError
from kvmtop.formats.recording import open_recording
from kvmtop.host.procfs import tracer_pid
from kvmtop.minivmm.vmm import counted_command
from kvmtop.model.messages import Detached, ExitBatch
from kvmtop.tracer_thread import Tracer

pytestmark = pytest.mark.usefixtures("engine")  # on the C engine and on its reference


def thread_states(pid: int) -> dict[int, str]:
    states = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states[int(tid)] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            pass
    return states


def report(path: str) -> dict:
    out = subprocess.run([*KVMTOP, "report", path, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.qemu
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_sigterm_and_sighup_detach_cleanly_with_a_complete_recording(
    tmp_path, processes, sig
):
    bios = tmp_path / "bios.bin"
    # long enough that the guest is still running when the signal comes, on a fast host too
    bios.write_bytes(build_bios(outs=400_000, mmio_writes=0))
    vmm = subprocess.Popen(qemu_command(str(bios)), stderr=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    out = tmp_path / "r.kvmtop"
    rec = start_recording(["-p", str(vmm.pid), "-o", str(out)])
    processes.append(rec)
    time.sleep(0.5)
    rec.send_signal(sig)
    _, stderr = rec.communicate(timeout=30)
    assert rec.returncode == 0, stderr
    assert vmm.wait(120) == 1  # the guest ran to its end, untraced
    summary = report(str(out))
    assert summary["meta"]["complete"] and 0 < summary["exits"]["KVM_EXIT_IO"] < 400_001


@pytest.mark.kvm
@pytest.mark.parametrize("how", ["attach", "launch"])
def test_a_recording_that_cannot_be_written_ends_the_trace_with_status_8(processes, how):
    """/dev/full takes the file but no byte of it: kvmtop says so once, stops tracing (it once
    waited forever, deaf to Ctrl-C), still prints what it saw, and the VMM runs on."""
    forever = {"outs": 10**9, "mmio_writes": 0, "out_sleep_us": 200}
    if how == "attach":
        vmm = start_minivmm(processes, **forever)
        args = ["-p", str(vmm.pid), "--duration", "30"]
    else:
        args = ["--", *counted_command(**forever)]
    out = subprocess.run([*KVMTOP, "record", "-o", "/dev/full", *args], capture_output=True,
                         text=True, timeout=20)  # fmt: skip
    assert out.returncode == 8, out.stderr
    assert out.stderr.count("cannot write recording /dev/full: No space left on device") == 1
    assert "Traceback" not in out.stderr and "VCPU  REASON" in out.stdout + out.stderr
    if how == "attach":
        assert tracer_pid(vmm.pid) == 0 and vmm.poll() is None  # untraced, running on


@pytest.mark.kvm
def test_a_stop_signal_ends_record_while_it_waits_for_a_detached_command(tmp_path):
    """Detached from a command it started (two stops, --duration), record waits for the
    command to end; Ctrl-C ends that wait (it once did nothing) and the command runs on."""
    argv = counted_command(outs=10**9, mmio_writes=0, out_sleep_us=200)
    out = tmp_path / "r.kvmtop"
    rec = subprocess.Popen([*KVMTOP, "record", "--no-seccomp", "--duration", "0.5", "-o",
                            str(out), "--", *argv], stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert rec.stderr is not None
    child = None
    try:
        for line in rec.stderr:
            if "waiting for pid" in line:
                child = int(line.split("waiting for pid ")[1].split()[0])
                break
        assert child is not None
        rec.send_signal(signal.SIGINT)
        rec.wait(5)  # at once: within STOP_GRACE_S of the signal
        assert tracer_pid(child) == 0 and os.path.exists(f"/proc/{child}")
        assert report(str(out))["meta"]["complete"]
    finally:
        if rec.poll() is None:
            rec.kill()
        if child is not None:
            os.kill(child, signal.SIGKILL)


@pytest.mark.kvm
@pytest.mark.parametrize("command", ["stats", "watch"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_stats_and_watch_while_they_take_a_vm_s_counters(
    processes, command, sig
):
    """A VM whose vCPU thread stays out of KVM_RUN (its VMM handles an exit for 8 s) holds up
    the take of its counters: the signal gives it up at once, and the VMM is let go."""
    vmm = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=8e6)
    time.sleep(0.2)  # into the first 8 s handling
    kvmtop = subprocess.Popen([*KVMTOP, command, "-p", str(vmm.pid)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    processes.append(kvmtop)
    deadline = time.monotonic() + 10
    while tracer_pid(vmm.pid) == 0:  # the take has begun
        assert time.monotonic() < deadline, "no take began"
        time.sleep(0.01)
    time.sleep(0.3)
    started = time.monotonic()
    kvmtop.send_signal(sig)
    _, stderr = kvmtop.communicate(timeout=10)
    assert time.monotonic() - started < 2.0, stderr  # where the take had 7 s left
    assert kvmtop.returncode == 0 and "Traceback" not in stderr, stderr
    assert tracer_pid(vmm.pid) == 0 and vmm.poll() is None


@pytest.mark.kvm
def test_recording_a_stopped_vmm_says_it_is_stopped(tmp_path, processes):
    """It once recorded 0 exits without a word."""
    vmm = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=200)
    vmm.send_signal(signal.SIGSTOP)
    try:
        out = subprocess.run([*KVMTOP, "record", "-o", str(tmp_path / "r.kvmtop"), "-p",
                              str(vmm.pid), "--duration", "0.3"], capture_output=True, text=True,
                             timeout=30)  # fmt: skip
    finally:
        vmm.send_signal(signal.SIGCONT)
    assert out.returncode == 0, out.stderr
    assert f"pid {vmm.pid} is stopped (SIGSTOP): it makes no exit until `kill -CONT" in out.stderr
    assert tracer_pid(vmm.pid) == 0


@pytest.mark.kvm
def test_a_vmm_killed_while_traced_is_reported_and_the_file_is_valid(tmp_path, processes):
    vmm = subprocess.Popen(counted_command(outs=300, mmio_writes=0, spin=40_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    out = tmp_path / "r.kvmtop"
    rec = start_recording(["-p", str(vmm.pid), "-o", str(out)])
    processes.append(rec)
    time.sleep(0.5)
    vmm.kill()
    _, stderr = rec.communicate(timeout=30)
    assert rec.returncode == 0 and f"pid {vmm.pid} was killed by SIGKILL (status 137)" in stderr
    recording = open_recording(str(out))
    list(recording.batches())
    assert recording.complete and recording.end.why == "exited" and recording.end.exit_status == 137


@pytest.mark.kvm
def test_fifty_attach_detach_cycles_leave_no_thread_stopped_and_leak_nothing(tmp_path, processes):
    own = tmp_path / "own.json"
    vmm = subprocess.Popen(counted_command(vcpus=4, outs=60_000, mmio_writes=0, exit_status=3,
                                           report_json=str(own)))  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 4)
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    tracer = Tracer()
    tracer.start()
    for cycle in range(50):
        tracer.attach(vmm.pid).result(5)
        time.sleep(0.01)
        tracer.detach().result(5)
        assert tracer_pid(vmm.pid) == 0, cycle
        assert "t" not in thread_states(vmm.pid).values(), cycle  # no thread left in a trace stop
    tracer.stop()
    assert vmm.poll() is None, "the guest must still be busy after the 50 cycles"
    assert vmm.wait(120) == 3
    assert json.loads(own.read_text())["exits"]["KVM_EXIT_IO"] == 4 * 60_001
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before


@pytest.mark.kvm
def test_detaching_a_stopped_vmm_leaves_it_stopped_until_sigcont(processes):
    vmm = subprocess.Popen(counted_command(outs=300, mmio_writes=0, spin=6_000_000, exit_status=4))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    tracer = Tracer()
    tracer.start()
    try:
        tracer.attach(vmm.pid).result(5)
        os.kill(vmm.pid, signal.SIGSTOP)
        time.sleep(0.3)
        tracer.detach().result(5)
        time.sleep(0.3)
        states = thread_states(vmm.pid)
        assert set(states.values()) == {"T"}, states  # stopped, as without kvmtop
        assert tracer_pid(vmm.pid) == 0
    finally:
        tracer.stop()
    os.kill(vmm.pid, signal.SIGCONT)
    assert vmm.wait(60) == 4


@pytest.mark.kvm
def test_vcpus_created_after_attach_are_counted_exactly(tmp_path, processes):
    own = tmp_path / "own.json"
    vmm = subprocess.Popen(counted_command(vcpus=3, outs=200, mmio_writes=20, spin=2_000_000,
                                           stagger=0.5, report_json=str(own)))  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 1)
    tracer = Tracer()
    tracer.start()
    per_vcpu: dict[int, int] = {}
    try:
        tracer.attach(vmm.pid).result(5)
        while True:
            message = tracer.out.get(timeout=60)
            if isinstance(message, ExitBatch):
                for e in message.events:
                    if e.errno == 0:
                        per_vcpu[e.vcpu] = per_vcpu.get(e.vcpu, 0) + 1
            elif isinstance(message, Detached):
                assert message.exit_status == 0
                break
    finally:
        tracer.stop()
    expected = {
        int(v): sum(c["exits"].values()) for v, c in json.loads(own.read_text())["vcpus"].items()
    }
    assert per_vcpu == expected == {0: 221, 1: 221, 2: 221}


@pytest.mark.kvm
def test_signals_to_the_process_and_to_single_threads_arrive_exactly_once(tmp_path):
    own = tmp_path / "own.json"
    argv = counted_command(vcpus=2, outs=300, mmio_writes=0, spin=8_000_000, report_json=str(own))
    tracer = Tracer()
    tracer.start()
    try:
        attached = tracer.launch(argv).result(10)
        pid = attached.pid
        wait_for_vcpus(pid, 2)
        vcpu_thread = a_vcpu_thread(pid)
        for _ in range(5):
            os.kill(pid, signal.SIGUSR1)  # to the process: any thread may take it
            time.sleep(0.03)
            tgkill(pid, vcpu_thread, signal.SIGUSR2)  # kicks that vCPU out of KVM_RUN
            time.sleep(0.03)
            tgkill(pid, pid, signal.SIGALRM)  # to the main thread
            time.sleep(0.03)
        while not isinstance(message := tracer.out.get(timeout=60), Detached):
            pass
        assert message.exit_status == 0
    finally:
        tracer.stop()
    assert json.loads(own.read_text())["signals"] == {"SIGUSR1": 5, "SIGUSR2": 5, "SIGALRM": 5}


@pytest.mark.kvm
def test_launch_mode_detach_lets_the_command_run_to_its_end(tmp_path):
    own = tmp_path / "own.json"
    argv = counted_command(
        outs=300, mmio_writes=0, spin=4_000_000, exit_status=6, report_json=str(own)
    )
    tracer = Tracer()
    tracer.start()
    try:
        attached = tracer.launch(argv).result(10)
        wait_for_vcpus(attached.pid)
        assert tracer.detach().result(5).why == "detached"
        while True:  # the command is still kvmtop's child: its end is reported too
            message = tracer.out.get(timeout=60)
            if isinstance(message, Detached) and message.why == "exited":
                break
        assert message.exit_status == 6
    finally:
        tracer.stop()
    assert json.loads(own.read_text())["exits"]["KVM_EXIT_IO"] == 301


@settings(max_examples=200, deadline=None)
@given(
    head=st.sampled_from([b"", b"\x89KVMTOP\n\x01\x00\x00\x00\x02\x00\x00\x00{}"]),
    body=st.binary(max_size=400),
)
def test_any_bytes_give_a_clear_error_or_the_readable_prefix(tmp_path_factory, head, body):
    path = tmp_path_factory.mktemp("fuzz") / "f.kvmtop"
    path.write_bytes(head + body)
    try:
        recording = open_recording(str(path))
        events = [e for batch in recording.batches() for e in batch.events]
    except RecordingError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    whole = (len(body) // 32) if head else 0
    assert len(events) <= whole  # never more exits than whole records


def test_kvmtop_has_no_way_to_write_a_tracee():
    """No code that touches a tracee pokes memory; only kvmtop/trace/inject.py (KVM's counters, on
    request) sets registers."""
    sources = {
        p.name: p.read_text().lower()
        for p in pathlib.Path("kvmtop").rglob("*.py")
        if p.name != "minivmm.py"
    }
    for name, source in sources.items():
        for forbidden in ("poke", "process_vm_writev", "setsiginfo", "pickle", "eval("):
            assert forbidden not in source, (name, forbidden)
        if name not in ("inject.py", "ptrace_abi.py"):
            assert "setregs" not in source, name
    assert sources["ptrace_abi.py"].count("setregs") == 2  # the one import, re-exported
    # with --rip, one field through kvmtop's own mapping of a vCPU fd: kvmtop/trace/sync_regs.py
    writers = {name for name, source in sources.items() if "prot_write" in source}
    assert writers == {"sync_regs.py", "vmm.py"}  # and minivmm, the VMM itself
    assert "dirty_regs" not in sources["sync_regs.py"].split('"""', 2)[2]


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (["record", "-p", "0"], 3, "no such process: 0"),
        (["record", "-p", "-5"], 3, "no such process: -5"),
        (["record", "-p", "99999999999999999999"], 3, "no such process"),
        (["record", "-p", "abc"], 2, "invalid int value: 'abc'"),
        (["record", "-p", "1", "--", "true"], 2, "not both"),
        (["record", "--duration", "x", "-p", "5"], 2, "invalid float value"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["report"], 2, "required: file"),
    ],
)
def test_bad_command_lines_get_one_clear_line(args, status, text):
    result = subprocess.run([*KVMTOP, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmtop: ") and text in lines[0], result.stderr


@pytest.mark.kvm
async def test_quitting_the_tui_leaves_a_complete_recording(tmp_path, processes):
    from kvmtop.app import KvmtopApp
    from kvmtop.sources.session import SessionState

    vmm = subprocess.Popen(counted_command(outs=300, mmio_writes=0, spin=8_000_000, exit_status=2))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    out = tmp_path / "tui.kvmtop"
    app = KvmtopApp(pid=vmm.pid, record_path=str(out))
    async with app.run_test(size=(140, 42)) as pilot:
        while app.session is None or app.session.state is not SessionState.ATTACHED:
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        await pilot.press("q")
    recording = open_recording(str(out))
    list(recording.batches())
    assert recording.complete and recording.end.why == "detached"
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    assert vmm.wait(60) == 2


@pytest.mark.kvm
def test_a_real_recording_cut_at_every_byte_reads_back_its_whole_records(tmp_path):
    full = tmp_path / "real.kvmtop"
    result = subprocess.run(
        [*KVMTOP, "record", "-o", str(full), "--", *counted_command(outs=20, mmio_writes=5)],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recording = open_recording(str(full))
    expected = [e for batch in recording.batches() for e in batch.events]
    assert recording.complete and len(expected) == 26
    blob = full.read_bytes()
    cut = tmp_path / "cut.kvmtop"
    seen_lengths = set()
    for size in range(len(blob) + 1):
        cut.write_bytes(blob[:size])
        try:
            partial = open_recording(str(cut))
            got = [e for batch in partial.batches() for e in batch.events]
        except RecordingError as exc:
            assert "truncated" in str(exc) or "not a kvmtop recording" in str(exc), (size, exc)
            continue
        assert got == expected[: len(got)], size  # a prefix, exact to the last whole record
        assert partial.complete == (size == len(blob))
        seen_lengths.add(len(got))
    assert seen_lengths == set(range(27))  # every prefix length was reachable
