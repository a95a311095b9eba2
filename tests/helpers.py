"""What the tests share: the ``kvmtop`` command and how they run it, guests started and waited
for (each cleaned up by the ``processes`` fixture, by the pid it started), recordings made and
read back, and the fixed data of the snapshot tests. Fixtures and skip rules live in conftest.py;
no test module imports another.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from typing import Any

from hypothesis import strategies as st

from kvmtop.host.discovery import KvmProcess
from kvmtop.model.events import ExitEvent

KVMTOP = [sys.executable, "-m", "kvmtop"]


def kvmtop(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVMTOP, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmtop: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """kvmtop ARGS as an unprivileged user without CAP_SYS_PTRACE (imported as root first)."""
    code = (
        "import os, sys, json, locale, shutil, kvmtop.cli, kvmtop.host.discovery, kvmtop.sources.session, "
        "kvmtop.commands.watch, "
        "kvmtop.formats.report; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
        f"sys.exit(kvmtop.cli.main({list(args)!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd="/")  # fmt: skip


MODES = {"two stops": ["--no-seccomp"], "one stop": ["--no-notify"], "notify": []}


def record_json(tmp_path, *args: str, status: int | None = None) -> dict:
    """``kvmtop record -o TMP/r.kvmtop ARGS``, then its ``report --json``. ``status``: the exit
    status the record must end with (the command's own); None: any, but no traceback."""
    out = tmp_path / "r.kvmtop"
    result = subprocess.run([*KVMTOP, "record", "-o", str(out), *args], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    if status is None:
        assert "Traceback" not in result.stderr, result.stderr
    else:
        assert result.returncode == status, result.stderr
    report = subprocess.run([*KVMTOP, "report", str(out), "--json"], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert report.returncode == 0, report.stderr
    return json.loads(report.stdout)


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


def kvm_fds_of(pid: int) -> list[str]:
    """The links of the KVM fds ``pid`` holds (/dev/kvm, VMs, vCPUs, stats): any other file
    whose path says "kvm" (a lock file, a recording) is not one."""
    from kvmtop.host.procfs import fd_table

    return [link for link in fd_table(pid).values()
            if link == "/dev/kvm" or link.startswith("anon_inode:kvm")]  # fmt: skip


def wait_for_vcpus(pid: int, count: int = 1, timeout: float = 10.0) -> None:
    """Until process ``pid`` has mapped the ``kvm_run`` of ``count`` vCPUs (its VM is set up: a
    VMM maps each vCPU's before it runs it, and after any fd it makes for it, such as the copy
    Python's mmap keeps), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                mapped = {line.split()[-1] for line in maps if "anon_inode:kvm-vcpu:" in line}
        except OSError:
            mapped = set()
        if len(mapped) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} created no {count} vCPU(s) within {timeout} s")


def held_timed_vmm(binary: str, *args: str) -> subprocess.Popen[str]:
    """benchmarks/guests/timed_vmm.c, held after its line (TIMED_VMM_HOLD) until its stdin is
    closed: a watcher reads the live process once more after the VMM's own account."""
    return subprocess.Popen([binary, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "TIMED_VMM_HOLD": "1"})  # fmt: skip


def own_clock(vmm: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
    """A held timed_vmm's line: its own clock's account of its run."""
    import select

    assert vmm.stdout is not None
    if not select.select([vmm.stdout], [], [], timeout)[0]:
        raise AssertionError(f"timed_vmm (pid {vmm.pid}) said nothing within {timeout} s")
    return json.loads(vmm.stdout.readline())


def let_go(vmm: subprocess.Popen[str]) -> None:
    """A held timed_vmm ends."""
    assert vmm.stdin is not None
    vmm.stdin.close()
    vmm.wait(10)


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


def start_recording(args: list[str], stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """`kvmtop record ARGS`, returned once it says it is recording (attach done)."""
    rec = subprocess.Popen([sys.executable, "-m", "kvmtop", "record", *args],
                           stdout=stdout, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert rec.stderr is not None
    line = rec.stderr.readline()
    assert "recording to" in line, line + rec.stderr.read()
    return rec


def json_summary(stderr: str) -> dict:
    """The JSON summary `record --json -- CMD` prints on stderr, after its notices."""
    return json.loads(stderr[stderr.index("\n{") + 1 :] if not stderr.startswith("{") else stderr)


START = 5_000_000_000


events_strategy = st.lists(
    st.builds(
        lambda vcpu, reason, errno, entry, guest, a, b, flags, data: ExitEvent(
            vcpu,
            reason,
            errno,
            START + entry,
            START + entry + guest,
            0 if errno else a,
            0 if errno else b,
            0 if errno else flags,
            b"" if errno else data,
        ),  # fmt: skip
        st.integers(0, 511),
        st.integers(0, 2**32 - 1),
        st.sampled_from([0, 0, 0, 4, 14]),
        st.integers(0, 10**12),
        st.integers(0, 10**11),  # up to 100 s in the guest: some need the long-run record
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 7),  # EXIT_WRITE | EXIT_PRIVATE | EXIT_CYCLE
        st.binary(max_size=100),
    ),
    max_size=40,
)


def fixed_processes() -> list[KvmProcess]:
    hour_ago = time.time() - 3600
    return [
        KvmProcess(4242, "root", "web-1", ("qemu-system-x86_64", "-name", "web-1"), 4, (0, 1, 2, 3),
                   12.0, 512 << 20, hour_ago, 0),
        KvmProcess(5151, "alice", "firecracker", ("firecracker", "--api-sock", "/tmp/fc"), 2, (0, 1),
                   3.0, 128 << 20, hour_ago, 777),
    ]  # fmt: skip


def write_elf_symbols(path: str, symbols: list[tuple[str, int, int]]) -> None:
    """An ELF64 file (x86-64) whose only content is a symbol table: (name, address, size) each a
    global function, absolute (as a firmware image's symbols are)."""
    import struct

    strtab = b"\0" + b"".join(name.encode() + b"\0" for name, _, _ in symbols)
    entries = [bytes(24)]  # the null symbol
    at = 1
    for name, address, size in symbols:
        entries.append(
            struct.pack("<IBBHQQ", at, 0x12, 0, 0xFFF1, address, size)
        )  # GLOBAL FUNC ABS
        at += len(name) + 1
    symtab = b"".join(entries)
    shstrtab = b"\0.symtab\0.strtab\0.shstrtab\0"
    body = symtab + strtab + shstrtab
    sections = [
        bytes(64),
        struct.pack("<IIQQQQIIQQ", 1, 2, 0, 0, 64, len(symtab), 2, 1, 8, 24),  # .symtab
        struct.pack("<IIQQQQIIQQ", 9, 3, 0, 0, 64 + len(symtab), len(strtab), 0, 0, 1, 0),
        struct.pack(
            "<IIQQQQIIQQ", 17, 3, 0, 0, 64 + len(symtab) + len(strtab), len(shstrtab), 0, 0, 1, 0
        ),  # fmt: skip
    ]
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, 64 + len(body), 0, 64, 0, 0, 64,
                          len(sections), 3)  # fmt: skip
    with open(path, "wb") as f:
        f.write(header + body + b"".join(sections))


def vcpu_valid_regs(pid: int) -> Any:
    """A writable mapping of the first page of ``pid``'s vCPU 0 (the test's own look at its
    kvm_run, as a VMM has it)."""
    import mmap

    from kvmtop.abi.ptrace_abi import pidfd_getfd
    from kvmtop.decoder import vcpu_id_of_fd_link

    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if vcpu_id_of_fd_link(os.readlink(f"/proc/{pid}/fd/{fd}")) == 0:
                dup = pidfd_getfd(pidfd, int(fd))
                try:
                    return mmap.mmap(dup, 4096, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
                finally:
                    os.close(dup)
    finally:
        os.close(pidfd)
    raise AssertionError(f"pid {pid} has no vCPU 0")


def valid_regs(page: Any) -> int:
    """kvm_run.kvm_valid_regs in ``page`` (vcpu_valid_regs)."""
    from kvmtop.abi.arch import x86_64

    return int.from_bytes(page[x86_64.RUN_VALID_REGS : x86_64.RUN_VALID_REGS + 8], "little")


def stop_once_set(kvmtop_run: subprocess.Popen[str], page: Any, stop: int,
                  timeout: float = 20.0) -> str:  # fmt: skip
    """Once ``kvmtop_run`` (a `record --rip` or `watch --rip`) has set kvm_valid_regs in
    ``page`` (vcpu_valid_regs), the signal ``stop`` to it; its stderr when it has ended."""
    try:
        deadline = time.monotonic() + timeout
        while valid_regs(page) == 0:
            assert time.monotonic() < deadline and kvmtop_run.poll() is None
            time.sleep(0.01)
        time.sleep(0.2)
        kvmtop_run.send_signal(stop)
        return kvmtop_run.communicate(timeout=30)[1]
    finally:
        if kvmtop_run.poll() is None:
            kvmtop_run.kill()


# Runs a command under a seccomp filter of its own that allows everything (as Firecracker, crosvm
# and cloud-hypervisor filter their vCPU threads): `python -c SECCOMP_ALLOW_ALL CMD ARGS...`
SECCOMP_ALLOW_ALL = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
ret_allow = struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000)  # BPF_RET|BPF_K SECCOMP_RET_ALLOW
code = ctypes.create_string_buffer(ret_allow, len(ret_allow))
prog = ctypes.create_string_buffer(struct.pack("<H6xQ", 1, ctypes.addressof(code)))
assert libc.prctl(38, 1, None, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) == 0  # PR_SET_SECCOMP, filter
os.execv(sys.argv[1], sys.argv[1:])
"""
