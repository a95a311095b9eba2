"""Shared fixtures: skip reasons for tests that need KVM or QEMU, and processes that are always
cleaned up by the pid the test started."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

HAS_KVM = os.path.exists("/dev/kvm")
HAS_QEMU = shutil.which("qemu-system-x86_64") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if ("kvm" in item.keywords or "qemu" in item.keywords) and not HAS_KVM:
            item.add_marker(
                pytest.mark.skip(reason="needs /dev/kvm (real KVM guests); it is absent")
            )
        elif "qemu" in item.keywords and not HAS_QEMU:
            item.add_marker(pytest.mark.skip(reason="needs qemu-system-x86_64 on PATH"))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Append every process a test starts; each is killed (by its pid) at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(10)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


_libc = ctypes.CDLL(None, use_errno=True)


def tgkill(pid: int, tid: int, sig: int) -> None:
    """A signal to one thread of another process."""
    if _libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")


def a_vcpu_thread(pid: int, index: int = 0, timeout: float = 10.0) -> int:
    """The thread of vCPU ``index`` of a minivmm (or QEMU): the one named "CPU i/KVM" (a vCPU's
    fd can exist before its thread has started and named itself)."""
    deadline = time.monotonic() + timeout
    while True:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    if f.read().strip() == f"CPU {index}/KVM":
                        return int(tid)
            except FileNotFoundError:
                continue  # a thread that has just ended
        if time.monotonic() > deadline:
            raise LookupError(f"pid {pid} has no thread for vCPU {index}")
        time.sleep(0.01)


@pytest.fixture
def bios(tmp_path):
    """``bios(outs, mmio_writes, spin)``: the path of a QEMU BIOS image making those exits."""
    from guests.qemu_bios import build_bios

    def make(outs: int = 300, mmio_writes: int = 200, spin: int = 0) -> str:
        path = tmp_path / f"bios-{outs}-{mmio_writes}-{spin}.bin"
        path.write_bytes(build_bios(outs=outs, mmio_writes=mmio_writes, spin_iterations=spin))
        return str(path)

    return make


TIMED_VMM = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "guests", "timed_vmm.c")


@pytest.fixture(scope="session")
def timed_vmm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The path of the C VMM that times itself (benchmarks/guests/timed_vmm.c), built with cc."""
    if shutil.which("cc") is None:
        pytest.skip("needs cc to build the C VMM")
    binary = str(tmp_path_factory.mktemp("timed_vmm") / "timed_vmm")
    subprocess.run(["cc", "-O2", "-o", binary, TIMED_VMM], check=True)
    return binary


def start_qemu(processes: list[subprocess.Popen[bytes]], bios_path: str) -> subprocess.Popen[bytes]:
    """QEMU running ``bios_path``, returned once its vCPU exists; cleaned up with ``processes``."""
    from guests.qemu_bios import qemu_command

    vmm = subprocess.Popen(qemu_command(bios_path), stderr=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    return vmm


def start_minivmm(
    processes: list[subprocess.Popen[bytes]], **counted: Any
) -> subprocess.Popen[bytes]:
    """minivmm's counted guest (:func:`kvmtop.minivmm.vmm.counted_command` ``counted``), its output
    dropped, returned once its vCPU exists; cleaned up with ``processes``."""
    from kvmtop.minivmm.vmm import counted_command

    vmm = subprocess.Popen(counted_command(**counted), stdout=subprocess.DEVNULL)
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    return vmm


def kvm_fds_of(pid: int) -> list[str]:
    """The links of the KVM fds ``pid`` holds (/dev/kvm, VMs, vCPUs, stats): any other file
    whose path says "kvm" (a lock file, a recording) is not one."""
    from kvmtop.host.procfs import fd_table

    return [link for link in fd_table(pid).values()
            if link == "/dev/kvm" or link.startswith("anon_inode:kvm")]  # fmt: skip


def wait_for_vcpus(pid: int, count: int = 1, timeout: float = 10.0) -> None:
    """Until process ``pid`` holds ``count`` vCPU fds (its VM is set up), or fail."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            links = []
        if sum(link.startswith("anon_inode:kvm-vcpu:") for link in links) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} created no {count} vCPU(s) within {timeout} s")


def start_recording(args: list[str], stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """`kvmtop record ARGS`, returned once it says it is recording (attach done)."""
    import sys

    rec = subprocess.Popen([sys.executable, "-m", "kvmtop", "record", *args],
                           stdout=stdout, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert rec.stderr is not None
    line = rec.stderr.readline()
    assert "recording to" in line, line + rec.stderr.read()
    return rec


def json_summary(stderr: str) -> dict:
    """The JSON summary `record --json -- CMD` prints on stderr, after its notices."""
    import json

    return json.loads(stderr[stderr.index("\n{") + 1 :] if not stderr.startswith("{") else stderr)


@pytest.fixture(params=["native", "pure"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the C engine and on the pure-Python one (its reference). The environment
    carries the choice to ``kvmtop`` subprocesses too."""
    import importlib.util

    if request.param == "pure":
        monkeypatch.setenv("KVMTOP_PURE", "1")
    else:
        monkeypatch.delenv("KVMTOP_PURE", raising=False)
        if importlib.util.find_spec("kvmtop.native._hotloop") is None:
            pytest.skip(
                "kvmtop.native._hotloop is not built (no C compiler or Python headers at install)"
            )
    return str(request.param)
