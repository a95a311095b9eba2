"""The KVM processes on this machine: psutil for the process facts, /proc/PID/fd links for the
KVM fds (psutil's open_files() does not list anon inodes).

Owns what the process list and ``kvmtop list`` show of a VMM. Read-only: it never traces, never
signals, never opens a KVM fd; processes that vanish or deny access are skipped, not errors.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import psutil

from kvmtop.decoder import VM_FD_LINK, is_kvm_fd_link, vcpu_id_of_fd_link
from kvmtop.errors import NoSuchProcess, NotKvmProcess, PermissionDenied
from kvmtop.host.procfs import fd_table, owner_of, tracer_pid


@dataclass(frozen=True, slots=True)
class KvmProcess:
    pid: int
    user: str
    name: str  # QEMU's -name when given, else the command name
    cmdline: tuple[str, ...]
    vcpus: int
    vcpu_ids: tuple[int, ...]
    cpu_percent: float
    rss: int
    create_time: float
    tracer_pid: int

    @property
    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.create_time)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["cmdline"] = list(self.cmdline)
        out["vcpu_ids"] = list(self.vcpu_ids)
        return out


def kvm_fd_links(pid: int) -> list[str] | None:
    """The KVM-related fd links of ``pid``; None when /proc/PID/fd cannot be read."""
    try:
        return [link for link in fd_table(pid).values() if is_kvm_fd_link(link)]
    except OSError:
        return None


def holds_a_vm(links: list[str]) -> bool:
    """A VMM keeps /dev/kvm or its VM fd open; a process holding only vCPU fds (kvmtop itself,
    which maps the vCPUs it traces) or stats fds (``anon_inode:kvm-vm-stats``) is not one."""
    return any(link in ("/dev/kvm", VM_FD_LINK) for link in links)


def display_name(cmdline: list[str], fallback: str) -> str:
    """QEMU's ``-name guest=foo,...`` or ``-name foo``; else the command's base name."""
    for i, arg in enumerate(cmdline[:-1]):
        if arg in ("-name", "--name"):
            value = cmdline[i + 1].split(",")[0]
            return value.removeprefix("guest=") or fallback
    if "kvmtop.minivmm" in cmdline:
        return "kvmtop-demo" if "demo" in cmdline else "kvmtop-minivmm"
    return fallback


def _describe(proc: psutil.Process, links: list[str]) -> KvmProcess:
    with proc.oneshot():
        cmdline = proc.cmdline()
        # a VMM may hold several fds of one vCPU (Python's mmap dup()s the fd it maps)
        vcpu_ids = sorted({v for v in map(vcpu_id_of_fd_link, links) if v is not None})
        return KvmProcess(
            pid=proc.pid,
            user=proc.username(),
            name=display_name(cmdline, proc.name()),
            cmdline=tuple(cmdline),
            vcpus=len(vcpu_ids),
            vcpu_ids=tuple(vcpu_ids),
            cpu_percent=proc.cpu_percent(None),
            rss=proc.memory_info().rss,
            create_time=proc.create_time(),
            tracer_pid=tracer_pid(proc.pid),
        )


_cpu_seen: dict[int, psutil.Process] = {}  # kept so cpu_percent() measures since the last call


def list_kvm_processes(cpu_interval: float = 0.0) -> list[KvmProcess]:
    """Every process with a KVM fd that this user may inspect, by pid. Each ``cpu_percent`` is
    over the time since the previous listing (0.0 at a process's first); ``cpu_interval`` > 0
    lists twice, that many seconds apart, so that a one-off listing measures it too."""
    if cpu_interval > 0:
        _list_kvm_processes()
        time.sleep(cpu_interval)
    return _list_kvm_processes()


def _list_kvm_processes() -> list[KvmProcess]:
    found = []
    alive = set()
    me = os.getpid()
    for pid in psutil.pids():
        links = kvm_fd_links(pid) if pid != me else None
        if not links or not holds_a_vm(links):
            continue
        try:
            proc = _cpu_seen.get(pid) or psutil.Process(pid)
            _cpu_seen[pid] = proc
            found.append(_describe(proc, links))
            alive.add(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for gone in set(_cpu_seen) - alive:
        del _cpu_seen[gone]
    return found


VMM_PROGRAMS = ("qemu-system-", "qemu-kvm", "firecracker", "crosvm", "cloud-hypervisor")


def looks_like_a_vmm(pid: int) -> bool:
    """Told from what any user may read (its command line, its threads' names): a known VMM's
    program, kvmtop's own guest, or a thread QEMU names for a vCPU ("CPU 0/KVM")."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if os.path.basename(argv[0]).decode(errors="replace").startswith(VMM_PROGRAMS):
            return True
        if b"kvmtop.minivmm" in argv:
            return True
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip().endswith("/KVM"):
                    return True
    except OSError:
        pass
    return False


def others_vmms() -> dict[str, list[int]]:
    """{user: pids} of the processes that look like VMMs but whose fds this user may not read:
    what `kvmtop list` names when it finds none of its own."""
    found: dict[str, list[int]] = {}
    for pid in psutil.pids():
        if kvm_fd_links(pid) is None and looks_like_a_vmm(pid):
            found.setdefault(owner_of(pid), []).append(pid)
    return found


def not_yours(others: dict[str, list[int]]) -> str:
    """What to say of the VMMs :func:`others_vmms` found."""
    whose = "; ".join(f"{user}: pid {', '.join(map(str, pids))}" for user, pids in others.items())
    return f"other users' VMMs run here ({whose}), which only their user or root may list and trace"


def kvm_process(pid: int) -> KvmProcess:
    """One KVM process, or a one-line error saying why not."""
    try:
        if pid <= 0:
            raise psutil.NoSuchProcess(pid)
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        raise NoSuchProcess(f"no such process: {pid}") from None
    links = kvm_fd_links(pid)
    if links is None:
        raise PermissionDenied(_denied(proc))
    if not links or not holds_a_vm(links):
        raise NotKvmProcess(f"pid {pid} ({_name(proc)}) is not a KVM process")
    try:
        return _describe(proc, links)
    except psutil.NoSuchProcess:
        raise NoSuchProcess(f"no such process: {pid}") from None
    except psutil.AccessDenied:
        raise PermissionDenied(_denied(proc)) from None


def _name(proc: psutil.Process) -> str:
    try:
        return str(proc.name())
    except psutil.Error:
        return "?"


def _denied(proc: psutil.Process) -> str:
    try:
        owner = proc.username()
    except (psutil.Error, KeyError):
        owner = "another user"
    return (
        f"permission denied reading the fds of pid {proc.pid} ({_name(proc)}, owned by {owner}); "
        "run kvmtop as that user or as root"
    )
