"""Finding KVM processes: a real minivmm guest is listed with its vCPUs, other processes are not,
and asking about one that is not a VMM says why in one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import wait_for_vcpus

from kvmtop.errors import NoSuchProcess, NotKvmProcess, PermissionDenied
from kvmtop.host.discovery import (
    KvmProcess,
    display_name,
    holds_a_vm,
    kvm_process,
    list_kvm_processes,
)
from kvmtop.minivmm.vmm import counted_command, demo_command


@pytest.mark.kvm
def test_a_running_demo_is_listed_with_its_name_vcpus_and_owner(processes):
    demo = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    processes.append(demo)
    wait_for_vcpus(demo.pid, 2)
    found = {p.pid: p for p in list_kvm_processes()}
    assert demo.pid in found
    p = found[demo.pid]
    assert (p.name, p.vcpus, p.vcpu_ids) == ("kvmtop-demo", 2, (0, 1))
    assert p.user == psutil.Process().username()
    assert p.cmdline == tuple(demo_command())
    assert p.rss > 0 and p.tracer_pid == 0
    assert 0 <= p.uptime_s < 60
    one = kvm_process(demo.pid)
    assert (one.pid, one.name, one.vcpu_ids, one.cmdline) == (p.pid, p.name, p.vcpu_ids, p.cmdline)


@pytest.mark.kvm
def test_cpu_percent_is_measured_between_two_listings(processes):
    busy = subprocess.Popen(counted_command(outs=0, mmio_writes=0, spin=4_000_000_000))
    processes.append(busy)
    wait_for_vcpus(busy.pid)
    list_kvm_processes()
    time.sleep(0.5)
    again = {p.pid: p for p in list_kvm_processes()}
    assert again[busy.pid].cpu_percent > 5  # the guest spins in KVM_RUN (2 busy cores here)


@pytest.mark.kvm
def test_a_vmm_under_strace_shows_its_tracer(processes):
    if shutil.which("strace") is None:
        pytest.skip("needs strace on PATH")
    strace = subprocess.Popen(
        ["strace", "-f", "-o", os.devnull, *demo_command()], stdout=subprocess.DEVNULL
    )
    processes.append(strace)
    vmms: list[KvmProcess] = []
    try:
        deadline = time.monotonic() + 20
        while not vmms and time.monotonic() < deadline:
            vmms = [p for p in list_kvm_processes() if p.tracer_pid == strace.pid and p.vcpus == 2]
            time.sleep(0.05)
        assert vmms, "the demo under strace was not listed with TracerPid = strace"
        assert vmms[0].name == "kvmtop-demo"
    finally:
        for vmm in vmms:  # killing strace would leave its tracee running: end it by its pid
            os.kill(vmm.pid, signal.SIGKILL)


@pytest.mark.kvm
def test_kvmtop_tracing_a_vmm_is_not_listed_as_one(processes, tmp_path):
    demo = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    processes.append(demo)
    wait_for_vcpus(demo.pid, 2)
    recorder = subprocess.Popen(
        [sys.executable, "-m", "kvmtop", "record", "-o", str(tmp_path / "r.kvmtop"), "-p", str(demo.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    processes.append(recorder)
    wait_for_vcpus(recorder.pid, 2)  # it maps the demo's vCPUs through fds of its own
    listed = {p.pid for p in list_kvm_processes()}
    assert demo.pid in listed and recorder.pid not in listed
    with pytest.raises(NotKvmProcess):
        kvm_process(recorder.pid)


def test_a_process_without_kvm_fds_is_not_a_kvm_process(processes):
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    assert sleeper.pid not in {p.pid for p in list_kvm_processes()}
    with pytest.raises(NotKvmProcess, match=rf"^pid {sleeper.pid} \(sleep\) is not a KVM process$"):
        kvm_process(sleeper.pid)


@pytest.mark.parametrize("pid", [0, -5, 2**22 + 1])
def test_a_pid_that_does_not_exist_is_no_such_process(pid):
    with pytest.raises(NoSuchProcess, match=rf"^no such process: {pid}$"):
        kvm_process(pid)


def test_a_process_that_has_ended_is_no_such_process():
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(NoSuchProcess):
        kvm_process(gone.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_another_users_process_is_permission_denied_and_skipped_by_the_list(processes):
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # as nobody, ask about root's process; report through the pipe
        os.close(read_end)
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            listed = sleeper.pid in {p.pid for p in list_kvm_processes()}
            try:
                kvm_process(sleeper.pid)
                answer = "no error"
            except PermissionDenied as exc:
                answer = f"PermissionDenied {listed} {exc}"
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(child, 0)
    assert answer == (
        f"PermissionDenied False permission denied reading the fds of pid {sleeper.pid} (sleep, "
        "owned by root); run kvmtop as that user or as root"
    )


@pytest.mark.parametrize(
    ("cmdline", "name"),
    [
        (["qemu-system-x86_64", "-name", "guest=web-1,debug-threads=on", "-m", "1G"], "web-1"),
        (["qemu-system-x86_64", "-name", "db"], "db"),
        (["qemu-kvm", "--name", "db,process=qemu:db"], "db"),
        (["qemu-system-x86_64", "-m", "1G"], "qemu-system-x86_64"),
        (["qemu-system-x86_64", "-name"], "qemu-system-x86_64"),
        (["python", "-m", "kvmtop.minivmm", "demo"], "kvmtop-demo"),
        (["python", "-m", "kvmtop.minivmm", "counted"], "kvmtop-minivmm"),
    ],
)
def test_the_name_shown_is_qemus_name_option_else_the_command(cmdline, name):
    assert display_name(cmdline, fallback=cmdline[0]) == name


def test_a_process_holding_only_stats_fds_is_not_a_vmm():
    # kvmtop stats and the exporter hold these; the VMM holds /dev/kvm and anon_inode:kvm-vm
    assert not holds_a_vm(["anon_inode:kvm-vm-stats", "anon_inode:kvm-vcpu-stats:0"])
    assert holds_a_vm(["anon_inode:kvm-vm", "anon_inode:kvm-vcpu:0"])


def test_processes_sort_by_any_column_either_way_unknown_exit_rates_last() -> None:
    from kvmtop.host.discovery import KvmProcess
    from kvmtop.host.process_sort import NAMES, marker, sorted_processes

    def vmm(pid: int, name: str, cpu: float, tracer: int = 0) -> KvmProcess:
        return KvmProcess(pid, "root", name, (name,), 1, (0,), cpu, 1 << 20, 0.0, tracer)

    a, b, c = vmm(30, "qemu", 5.0), vmm(10, "firecracker", 5.0, tracer=99), vmm(20, "ch", 50.0)
    procs = [a, b, c]
    rates = {30: 7.0, 20: 700.0}.get
    assert sorted_processes(procs, "PID", False) == [b, c, a]
    assert sorted_processes(procs, "COMMAND", False) == [c, b, a]
    assert sorted_processes(procs, "CPU%", False) == [c, b, a]  # the most first, ties by pid
    assert sorted_processes(procs, "CPU%", True) == [b, a, c]
    assert sorted_processes(procs, "TRACED BY", False) == [c, a, b]
    assert sorted_processes(procs, "KVM EXITS/S", False, rates) == [c, a, b]
    assert sorted_processes(procs, "KVM EXITS/S", True, rates) == [b, a, c]
    assert (
        marker("CPU%", False) == "▼" and marker("PID", False) == "▲" and marker("PID", True) == "▼"
    )
    assert all(sorted_processes(procs, name, False, rates) for name in NAMES)
