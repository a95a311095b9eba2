"""Launch mode under kvmtop's seccomp filter: one ptrace stop per exit, counts still exact, and
the command's life tied to kvmtop's (its filtered ioctls need a tracer)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from guests.qemu_bios import build_bios, qemu_command
from helpers import json_summary, start_recording, wait_for_vcpus

from kvmtop.abi.record_layout import EXIT_CYCLE
from kvmtop.decoder import exit_label
from kvmtop.minivmm.vmm import counted_command, demo_command
from kvmtop.model.messages import Attached, Detached, ExitBatch
from kvmtop.tracer_thread import Tracer

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("engine")]


@pytest.fixture(params=["notify", "trace"])
def seccomp(request: pytest.FixtureRequest) -> str:
    """kvmtop's filter notifies its listener (no ptrace stop per exit), or stops the tracer."""
    return str(request.param)


def run_one_stop(
    argv: list[str], seccomp: str, signals: int = 0
) -> tuple[dict[str, int], dict[int, int], int, Detached]:
    tracer = Tracer()
    tracer.start()
    exits: dict[str, int] = {}
    per_vcpu: dict[int, int] = {}
    stops = 0
    try:
        attached = tracer.launch(argv, seccomp).result(10)
        assert isinstance(attached, Attached) and attached.one_stop
        assert attached.notify == (seccomp == "notify")
        if signals:
            wait_for_vcpus(attached.pid)
            for _ in range(signals):
                os.kill(attached.pid, signal.SIGRTMIN + 1)
                time.sleep(0.002)
        while True:
            message = tracer.out.get(timeout=60)
            if isinstance(message, ExitBatch):
                stops += message.stops
                for e in message.events:
                    assert e.flags & EXIT_CYCLE
                    label = exit_label(e.reason, e.errno)
                    exits[label] = exits.get(label, 0) + 1
                    if e.errno == 0:
                        per_vcpu[e.vcpu] = per_vcpu.get(e.vcpu, 0) + 1
            elif isinstance(message, Detached):
                return exits, per_vcpu, stops, message
    finally:
        tracer.stop()


@pytest.mark.qemu
def test_qemu_counts_stay_exact_with_one_stop_per_exit(tmp_path, seccomp):
    bios = tmp_path / "bios.bin"
    bios.write_bytes(build_bios(outs=3000, mmio_writes=200))
    exits, _, stops, end = run_one_stop(qemu_command(str(bios)), seccomp)
    assert end.exit_status == 1
    assert exits["KVM_EXIT_IO"] == 3001 and exits["KVM_EXIT_MMIO"] == 200
    total = sum(exits.values())
    if seccomp == "notify":  # ptrace stops only for the process's life: exec, threads, exit
        assert stops < 100
    else:
        assert total <= stops < total * 1.1 + 100  # one per exit (the 2-stop mode: over 2x)


def test_four_vcpus_are_counted_like_the_vmm_counts_itself(tmp_path, seccomp):
    own = tmp_path / "own.json"
    exits, per_vcpu, _, end = run_one_stop(
        counted_command(vcpus=4, outs=250, mmio_writes=70, exit_status=5, report_json=str(own)),
        seccomp,
    )
    assert end.exit_status == 5
    mine = json.loads(own.read_text())
    assert exits == mine["exits"] and per_vcpu == {0: 321, 1: 321, 2: 321, 3: 321}


def test_signals_still_arrive_exactly_once(tmp_path, seccomp):
    own = tmp_path / "own.json"
    exits, _, _, end = run_one_stop(
        counted_command(outs=300, mmio_writes=0, spin=4_000_000, report_json=str(own)),
        seccomp,
        signals=25,
    )
    assert end.exit_status == 0
    mine = json.loads(own.read_text())
    assert mine["signals"] == {"SIGRTMIN+1": 25}
    assert exits["KVM_EXIT_IO"] == mine["exits"]["KVM_EXIT_IO"] == 301


def test_ending_the_trace_ends_the_command_gracefully(seccomp):
    tracer = Tracer()
    tracer.start()
    try:
        attached = tracer.launch(demo_command(), seccomp).result(10)
        wait_for_vcpus(attached.pid, 2)
        time.sleep(0.3)
        ended = tracer.detach().result(10)  # SIGTERM: the demo exits 0 on it
        assert (ended.why, ended.exit_status) == ("exited", 0)
    finally:
        tracer.stop()


def test_killing_kvmtop_ends_the_command_too(tmp_path, processes):
    rec = start_recording(["-o", str(tmp_path / "r.kvmtop"), "--", *demo_command()])
    processes.append(rec)
    time.sleep(0.5)
    children = [  # the command is a child of kvmtop's tracer thread, not of its main thread
        c for t in os.listdir(f"/proc/{rec.pid}/task")
        for c in open(f"/proc/{rec.pid}/task/{t}/children").read().split()
    ]  # fmt: skip
    demo = [int(c) for c in children if "minivmm" in open(f"/proc/{c}/cmdline").read()]
    assert demo, children
    rec.kill()
    rec.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{demo[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)  # PTRACE_O_EXITKILL: the kernel kills it with kvmtop
    state = (
        open(f"/proc/{demo[0]}/stat").read().rsplit(")", 1)[1].split()[0]
        if os.path.exists(f"/proc/{demo[0]}")
        else "gone"
    )
    assert state in ("gone", "Z")


def test_no_seccomp_keeps_the_detachable_two_stop_launch(tmp_path):
    out = tmp_path / "r.kvmtop"
    argv = [sys.executable, "-m", "kvmtop", "record", "--no-seccomp", "-o", str(out), "--",
            *counted_command(outs=100, mmio_writes=10, exit_status=2)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "one stop per exit" not in result.stderr
    assert (
        "traced with 2 ptrace stops per KVM_RUN and per syscall of a vCPU thread: " in result.stderr
    )
    summary = json.loads(subprocess.run([sys.executable, "-m", "kvmtop", "report", str(out), "--json"],
                                        capture_output=True, text=True).stdout)  # fmt: skip
    assert summary["exits"] == {"KVM_EXIT_IO": 101, "KVM_EXIT_MMIO": 10}
    assert summary["stops"] > 2 * 111  # two stops per exit, and then some


def test_the_summary_says_how_many_stops_per_exit():
    base = [sys.executable, "-m", "kvmtop", "record", "-o", os.devnull]
    argv = ["--", *counted_command(outs=100, mmio_writes=0)]
    result = subprocess.run(base + argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (
        "traced with no ptrace stop per exit (kvmtop's seccomp filter notifies its listener): 0.0"
        in result.stderr
    )
    result = subprocess.run(
        base + ["--no-notify"] + argv, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"traced with 1 ptrace stop per exit \(kvmtop's seccomp filter\): 1\.0\d stops per exit measured",
                     result.stderr)  # fmt: skip


def test_without_the_native_modules_kvmtop_says_so_and_counts_exactly(tmp_path, engine):
    """A kvmtop built without a C compiler: one line on stderr, then the pure-Python engine."""
    out = tmp_path / "r.kvmtop"
    hide = "import sys; sys.modules['kvmtop.native._hotloop'] = sys.modules['kvmtop.native._summary'] = None"
    run = f"{hide}; from kvmtop.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", run, "record", "--json", "-o", str(out), "--",
            *counted_command(outs=200, mmio_writes=20, exit_status=3)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KVMTOP_PURE"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 3, result.stderr
    notices = [line for line in result.stderr.splitlines() if "not built" in line]
    assert len(notices) == 1 and "pure Python" in notices[0]
    assert json_summary(result.stderr)["exits"] == {"KVM_EXIT_IO": 201, "KVM_EXIT_MMIO": 20}


def test_the_report_says_how_the_recording_saw_its_exits_as_record_did(tmp_path):
    """`report` once dropped the "traced with" line that `record` prints."""
    out = str(tmp_path / "r.kvmtop")
    argv = ["--", *counted_command(outs=100, mmio_writes=0)]
    recorded = subprocess.run([sys.executable, "-m", "kvmtop", "record", "--no-notify", "-o", out,
                               *argv], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert recorded.returncode == 0, recorded.stderr
    reported = subprocess.run([sys.executable, "-m", "kvmtop", "report", out], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    line = next(x for x in reported.stdout.splitlines() if x.startswith("traced with "))
    assert line.startswith("traced with 1 ptrace stop per exit (kvmtop's seccomp filter): 1.0")
    assert line in recorded.stderr
