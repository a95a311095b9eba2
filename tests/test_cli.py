"""The commands a user runs, as a user runs them: exact counts, exit statuses, and one clear
line for every error (never a traceback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from guests.qemu_bios import qemu_command
from helpers import (
    KVMTOP,
    as_nobody,
    assert_one_line_error,
    kvmtop,
    start_minivmm,
    start_qemu,
    start_recording,
    wait_for_vcpus,
)

from kvmtop.host.procfs import tracer_pid
from kvmtop.units import command_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.qemu
def test_record_launch_counts_exactly_what_strace_counts_and_keeps_qemus_status(tmp_path, bios):
    out = tmp_path / "r.kvmtop"
    result = kvmtop("record", "-o", str(out), "--", *qemu_command(bios()))
    assert result.returncode == 1, result.stderr  # QEMU's own status (isa-debug-exit)
    assert "KVM_EXIT_IO" in result.stderr and "0x0080 out" in result.stderr  # stdout is QEMU's
    report = json.loads(kvmtop("report", str(out), "--json").stdout)
    assert report["exits"]["KVM_EXIT_IO"] == 301 and report["exits"]["KVM_EXIT_MMIO"] == 200
    assert {"port": 128, "direction": "out", "size": 1, "count": 300} in report["io"]
    assert report["mmio"] == [{"address": 0xC0000, "len": 1, "write": True, "count": 200}]
    assert report["vcpus"]["0"]["exits"]["KVM_EXIT_IO"] == 301 and report["lost"] == 0
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"

    if shutil.which("strace"):
        log = tmp_path / "strace.txt"
        subprocess.run(
            ["strace", "-f", "-o", str(log), "--kvm=vcpu", "-e", "trace=ioctl", *qemu_command(bios())],
            capture_output=True, timeout=120,
        )  # fmt: skip
        text = log.read_text()
        assert text.count("KVM_EXIT_IO") == report["exits"]["KVM_EXIT_IO"]
        assert text.count("KVM_EXIT_MMIO") == report["exits"]["KVM_EXIT_MMIO"]


@pytest.mark.qemu
def test_record_attach_with_duration_detaches_and_the_guest_runs_on(tmp_path, bios, processes):
    vmm = start_qemu(processes, bios(outs=300, mmio_writes=200, spin=3_000_000))
    out = tmp_path / "r.kvmtop"
    result = kvmtop("record", "-p", str(vmm.pid), "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["exits"]["KVM_EXIT_IO"] == 301 and summary["exits"]["KVM_EXIT_MMIO"] == 200
    assert vmm.wait(30) == 1


@pytest.mark.qemu
def test_sigterm_ends_a_recording_cleanly_and_the_guest_finishes(tmp_path, bios, processes):
    # 400,000 exits: seconds of guest even untraced, so the signal always comes before its end
    vmm = subprocess.Popen(
        qemu_command(bios(outs=400_000, mmio_writes=0)), stderr=subprocess.DEVNULL
    )
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    out = tmp_path / "r.kvmtop"
    rec = start_recording(["-p", str(vmm.pid), "-o", str(out), "--json"])
    processes.append(rec)
    time.sleep(0.5)  # exits are being recorded
    rec.send_signal(signal.SIGTERM)
    stdout, stderr = rec.communicate(timeout=30)
    assert rec.returncode == 0, stderr
    seen = json.loads(stdout)["exits"]["KVM_EXIT_IO"]
    assert 0 < seen < 400_001
    assert vmm.wait(120) == 1  # every remaining out still happened: the guest reached its end
    report = json.loads(kvmtop("report", str(out), "--json").stdout)
    assert report["exits"]["KVM_EXIT_IO"] == seen and report["meta"]["complete"]


@pytest.mark.qemu
def test_killing_kvmtop_leaves_the_guest_running_and_the_recording_readable(
    tmp_path, bios, processes
):
    vmm = subprocess.Popen(
        qemu_command(bios(outs=400_000, mmio_writes=0)), stderr=subprocess.DEVNULL
    )
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    out = tmp_path / "r.kvmtop"
    rec = start_recording(["-p", str(vmm.pid), "-o", str(out)], stdout=subprocess.DEVNULL)
    processes.append(rec)
    time.sleep(0.5)  # exits are being recorded, at least one batch written
    rec.kill()
    rec.wait()
    assert vmm.wait(120) == 1
    result = kvmtop("report", str(out), "--json")
    assert result.returncode == 6 and "truncated" in result.stderr  # no end marker ...
    assert json.loads(result.stdout)["exits"]["KVM_EXIT_IO"] > 0  # ... but every whole record


def test_no_such_pid():
    assert_one_line_error(kvmtop("record", "-p", "999999999"), 3, "no such process: 999999999")


def test_not_a_kvm_process(processes):
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    result = kvmtop("record", "-p", str(sleeper.pid))
    assert_one_line_error(result, 4, f"pid {sleeper.pid} (sleep) is not a KVM process")


@pytest.mark.qemu
def test_a_vmm_traced_by_strace_is_refused_with_the_reason(bios, processes):
    qemu = start_qemu(processes, bios(spin=20_000_000))
    # attached once it runs: QEMU started under strace takes seconds (more on a busy host)
    strace = subprocess.Popen(["strace", "-o", os.devnull, "-p", str(qemu.pid)],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    processes.append(strace)
    deadline = time.monotonic() + 30
    while tracer_pid(qemu.pid) != strace.pid:
        assert time.monotonic() < deadline, "strace did not attach"
        time.sleep(0.01)
    result = kvmtop("record", "-p", str(qemu.pid))
    assert_one_line_error(result, 5, f"traced by another process (TracerPid {strace.pid}, strace)")


@pytest.mark.qemu
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_vmm_is_refused_with_the_reason(bios, processes):
    vmm = subprocess.Popen(qemu_command(bios(spin=20_000_000)), stderr=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    with tempfile.TemporaryDirectory() as writable:  # in /tmp: one nobody can reach
        os.chmod(writable, 0o777)
        result = as_nobody("record", "-o", os.path.join(writable, "x.kvmtop"), "-p", str(vmm.pid))
    # either the VMM's user or CAP_SYS_PTRACE is enough; the message says whose the VMM is
    assert_one_line_error(result, 5, f"pid {vmm.pid} (qemu-system-x86, owned by root): ptrace "
                          "needs its user or CAP_SYS_PTRACE; run kvmtop as root")  # fmt: skip


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_list_of_a_user_with_no_vmms_names_the_vmms_of_other_users(processes):
    from kvmtop.minivmm.vmm import demo_command

    vmm = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 2)
    result = as_nobody("list")
    assert result.returncode == 0 and "no KVM processes of yours" in result.stdout, result
    assert "other users' VMMs run here (root: pid " in result.stdout
    assert str(vmm.pid) in result.stdout and "only their user or root" in result.stdout


def test_stats_count_below_one_is_a_usage_error():
    for count in ("0", "-3"):
        result = kvmtop("stats", "-p", "1", "--count", count)
        assert_one_line_error(result, 2, "--count must be 1 or more")


def test_an_unknown_option_names_the_help_that_lists_the_options_there():
    # `-d` is the TUI's refresh delay; record's time limit is --duration
    assert_one_line_error(kvmtop("record", "-d", "2", "-p", "1"), 2,
                          "unrecognized arguments: -d 2 (see kvmtop record --help)")  # fmt: skip
    assert_one_line_error(
        kvmtop("--bogus"), 2, "unrecognized arguments: --bogus (see kvmtop --help)"
    )
    assert_one_line_error(kvmtop("report"), 2, "(see kvmtop report --help)")


def test_a_refresh_delay_outside_the_tuis_steps_is_a_usage_error():
    from kvmtop.cli import DELAY_MAX_S, DELAY_MIN_S
    from kvmtop.screens.polled import REFRESH_STEPS

    assert (DELAY_MIN_S, DELAY_MAX_S) == (REFRESH_STEPS[0], REFRESH_STEPS[-1])
    for args, given in ((["-d", "0"], "0"), (["-d", "-1", "demo"], "-1"),
                        (["--delay", "0", "replay", "x"], "0"), (["-d", "100"], "100"),
                        (["-d", "0.2", "demo"], "0.2"), (["-d", "5.5", "replay", "x"], "5.5")):  # fmt: skip
        assert_one_line_error(kvmtop(*args), 2,
                              f"--delay must be from 0.25 to 5 seconds, as + and - set it (not {given})")  # fmt: skip


def test_pid_and_output_work_before_or_after_the_command(tmp_path):
    assert_one_line_error(kvmtop("-p", "999999999", "record"), 3, "no such process: 999999999")
    assert_one_line_error(kvmtop("record", "-p", "999999999"), 3, "no such process: 999999999")
    bad = str(tmp_path / "no" / "such" / "dir.kvmtop")
    for args in (["demo", "-o", bad], ["-o", bad, "demo"], ["-o", bad, "record", "--", "true"]):
        assert_one_line_error(kvmtop(*args), 6, f"cannot create recording {bad}")


def test_a_recording_of_no_exits_never_pushes_a_good_one_out(tmp_path):
    from guests.fixed_recording import write_fixed_recording

    good = write_fixed_recording(str(tmp_path / "kvmtop.data"))
    held = open(good, "rb").read()
    for _ in range(2):
        result = subprocess.run([*KVMTOP, "record", "--", "true"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
    # the first run moved the good one to .old; the second overwrote its own empty recording
    assert (tmp_path / "kvmtop.data.old").read_bytes() == held
    assert "0 exits" in kvmtop("report", str(tmp_path / "kvmtop.data")).stdout


def test_command_not_found():
    assert_one_line_error(
        kvmtop("record", "--", "no-such-vmm-here"), 127, "command not found: no-such-vmm-here"
    )


def test_record_needs_a_pid_or_a_command():
    assert_one_line_error(kvmtop("record"), 2, "record needs either -p PID or -- CMD")


@pytest.mark.parametrize(
    ("content", "text"),
    [(None, "No such file or directory"), (b"garbage garbage garbage", "is not a kvmtop recording"),
     (b"\x89KVMTOP\n\x01\x00", "truncated")],
)  # fmt: skip
def test_bad_recordings(tmp_path, content, text):
    path = tmp_path / "x.kvmtop"
    if content is not None:
        path.write_bytes(content)
    assert_one_line_error(kvmtop("report", str(path)), 6, text)


def test_unwritable_output_fails_before_tracing(tmp_path):
    result = kvmtop("record", "-o", str(tmp_path / "no" / "such" / "dir.kvmtop"), "--", "true")
    assert_one_line_error(result, 6, "cannot create recording")


def _child_of(pid: int, name: str, timeout: float = 10) -> int:
    """The child of ``pid`` (of any of its threads) whose command line holds ``name`` (strace
    first forks short-lived probe children; kvmtop's tracer thread forks a launched command)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = f.read().split()
                for kid in kids:
                    with open(f"/proc/{kid}/cmdline", "rb") as f:
                        if name.encode() in f.read():
                            return int(kid)
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} started no {name} within {timeout} s")


@pytest.mark.kvm
def test_list_shows_a_running_vmm_with_its_vcpus(processes):
    from kvmtop.minivmm.vmm import demo_command

    vmm = subprocess.Popen(demo_command(vcpus=3), stdout=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 3)
    listed = {p["pid"]: p for p in json.loads(kvmtop("list", "--json").stdout)}
    assert listed[vmm.pid]["vcpus"] == 3 and listed[vmm.pid]["vcpu_ids"] == [0, 1, 2]
    assert listed[vmm.pid]["name"] == "kvmtop-demo"
    table = kvmtop("list").stdout
    assert str(vmm.pid) in table and "kvmtop-demo" in table
    (row,) = [line for line in table.splitlines() if line.split()[0] == str(vmm.pid)]
    argv = demo_command(vcpus=3)  # 93 characters: cut between arguments, saying how many are left
    assert row.endswith(f"({command_text(argv, 80)})"), row
    shown = row.split("  (", 1)[1].split(" … (+")[0].split()
    assert shown == argv[: len(shown)] and f"… (+{len(argv) - len(shown)} more)" in row, row


@pytest.mark.kvm
def test_list_json_measures_the_cpu_of_a_busy_guest(processes):
    """psutil's first sample of a process is always 0.0: `list --json` takes two."""
    from kvmtop.minivmm.vmm import counted_command

    busy = subprocess.Popen(counted_command(outs=0, mmio_writes=0, spin=4_000_000_000))
    processes.append(busy)
    wait_for_vcpus(busy.pid)
    listed = {p["pid"]: p for p in json.loads(kvmtop("list", "--json").stdout)}
    assert listed[busy.pid]["cpu_percent"] > 5  # the guest spins in KVM_RUN (2 busy cores here)


def test_the_tui_without_a_terminal_is_one_line_and_a_status(tmp_path):
    out = tmp_path / "out"
    for args in (["demo"], []):
        with open(out, "w") as stdout:
            result = subprocess.run([*KVMTOP, *args], stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=subprocess.PIPE, text=True, timeout=30)  # fmt: skip
        assert_one_line_error(result, 9, "needs a terminal")
        assert "kvmtop record" in result.stderr and out.read_text() == ""


def in_a_terminal(args: list[str], cols: int = 80, rows: int = 24) -> subprocess.Popen[bytes]:
    """kvmtop ARGS on a pseudo-terminal of that size, its output read (and dropped) all along."""
    import fcntl
    import struct
    import termios
    import threading

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color"}
    proc = subprocess.Popen([*KVMTOP, *args], stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)  # fmt: skip
    os.close(slave)

    def drain() -> None:
        try:
            while os.read(master, 65536):
                pass
        except OSError:  # the terminal closed: kvmtop has ended
            pass
        os.close(master)

    threading.Thread(target=drain, daemon=True).start()
    proc.type = lambda keys: os.write(master, keys.encode())  # type: ignore[attr-defined]
    return proc


@pytest.mark.kvm
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_ends_the_demo_tui_and_stops_its_guest(signum, processes):
    tui = in_a_terminal(["demo"])
    processes.append(tui)
    guest = _child_of(tui.pid, "kvmtop.minivmm", timeout=20)
    wait_for_vcpus(guest, 2)
    time.sleep(0.5)  # attached and drawing
    tui.send_signal(signum)
    assert tui.wait(30) == 128 + signum
    assert not os.path.exists(f"/proc/{guest}")


@pytest.mark.kvm
def test_a_jsonl_stream_into_a_full_disk_stops_the_trace_with_status_8():
    """It once said "cannot write to stdout" and exited 0."""
    from kvmtop.minivmm.vmm import counted_command

    with open("/dev/full", "w") as full:
        result = subprocess.run([*KVMTOP, "record", "--jsonl", "-", "--",
                                 *counted_command(outs=10**9, mmio_writes=0, out_sleep_us=200)],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 8, result.stderr
    assert result.stderr.count("cannot write to stdout: No space left on device") == 1


def test_help_into_a_full_disk_is_one_line_and_status_8():
    """argparse ignores a failed write: --help once exited 0 having printed nothing."""
    for args in (["--help"], ["record", "--help"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run([*KVMTOP, *args], stdout=full, stderr=subprocess.PIPE,
                                    text=True, timeout=60)  # fmt: skip
        assert_one_line_error(result, 8, "cannot write to stdout: No space left on device")


@pytest.mark.kvm
def test_the_tui_recording_to_a_full_disk_detaches_says_why_and_quits_with_status_8(processes):
    """It once stayed on "attaching..." and quit with status 0."""

    vmm = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=200)
    tui = in_a_terminal(["-o", "/dev/full", "-p", str(vmm.pid)])
    processes.append(tui)
    time.sleep(3)  # attached, and detached at once: the file refuses its first bytes
    assert tui.poll() is None and tracer_pid(vmm.pid) == 0
    tui.type("q")
    assert tui.wait(20) == 8
    assert vmm.poll() is None and tracer_pid(vmm.pid) == 0


@pytest.mark.kvm
def test_output_to_a_full_disk_is_one_line_and_to_a_closed_pipe_ends_quietly(tmp_path, processes):
    from guests.fixed_recording import write_fixed_recording

    from kvmtop.minivmm.vmm import demo_command

    vmm = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 2)
    recording = write_fixed_recording(str(tmp_path / "fixed.kvmtop"))
    for args in (["list"], ["list", "--json"], ["report", recording], ["report", recording, "--csv"],
                 ["stats", "-p", str(vmm.pid), "--count", "1"]):  # fmt: skip
        with open("/dev/full", "w") as full:
            result = subprocess.run([*KVMTOP, *args], stdout=full, stderr=subprocess.PIPE,
                                    text=True, timeout=60)  # fmt: skip
        assert_one_line_error(result, 8, "cannot write to stdout: No space left on device")
        read_end, write_end = os.pipe()
        os.close(read_end)  # `| head` that has already read all it wanted
        result = subprocess.run([*KVMTOP, *args], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=60)  # fmt: skip
        os.close(write_end)
        assert (result.returncode, result.stderr) == (0, ""), args
    with open(recording, "rb") as f:  # cut short: the closed pipe does not hide that
        (tmp_path / "cut.kvmtop").write_bytes(f.read()[:-40])
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run([*KVMTOP, "report", str(tmp_path / "cut.kvmtop")], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    os.close(write_end)
    assert_one_line_error(result, 6, "is truncated")
