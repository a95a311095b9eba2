"""Facts about a process read from /proc: who traces it, whether it is a KVM process, why
ptrace may be refused. Read-only; never touches a tracee."""

from __future__ import annotations

import os
import pwd

from kvmtop.decoder import VM_FD_LINK
from kvmtop.errors import KvmtopError, NoSuchProcess, NotKvmProcess, PermissionDenied


def task_ids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def run_delays(pid: int) -> dict[int, int] | None:
    """Per thread of ``pid``, the ns it has waited on a run queue for a CPU
    (/proc/PID/task/TID/schedstat); None where none can be read."""
    delays = {}
    for tid in task_ids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                delays[tid] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that has just ended
    return delays or None


def is_stopped(pid: int, traced: bool = False) -> bool:
    """Whether every thread of ``pid`` is stopped by a signal (SIGSTOP, SIGTSTP: state T in
    /proc/PID/task/TID/stat); a stopped VMM runs no vCPU and makes no syscall until SIGCONT.
    ``traced``: kvmtop traces it, and a tracee's group-stop shows as t (tracing stop), as do
    the tracer's own brief stops."""
    stopped = ("T", "t") if traced else ("T",)
    states = []
    for tid in task_ids(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rpartition(")")[2].split()[0])
        except (OSError, IndexError):
            continue  # a thread that has just ended
    return bool(states) and all(state in stopped for state in states)


def tgid_of(tid: int) -> int:
    tgid = status_field(tid, "Tgid")
    return int(tgid) if tgid else -1


def tracer_pid(pid: int) -> int:
    """The pid tracing ``pid`` (gdb, strace, kvmtop...), 0 when none."""
    tracer = status_field(pid, "TracerPid")
    return int(tracer) if tracer else 0


def fd_table(pid: int) -> dict[int, str]:
    """{fd: link target} of process ``pid``; PermissionError/FileNotFoundError as os raises."""
    table = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            table[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
    return table


def seccomp_of(pid: int, tid: int) -> tuple[int, int]:
    """(seccomp mode, filters) of a thread: mode 0 none, 1 strict, 2 filter; the filter count
    (Linux 5.9+; 0 where the kernel does not say)."""
    mode = filters = 0
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    mode = int(line.split()[1])
                elif line.startswith("Seccomp_filters:"):
                    filters = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return mode, filters


def status_field(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def owner_of(pid: int) -> str:
    """The user name of the process's real uid ("uid N" if it has none, "?" if it is gone)."""
    uid = status_field(pid, "Uid")
    if not uid:
        return "?"
    try:
        return pwd.getpwuid(int(uid.split()[0])).pw_name
    except KeyError:
        return f"uid {uid.split()[0]}"


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def permission_hint(pid: int) -> str:
    """Why ptrace was refused, as far as can be told from outside."""
    tracer = status_field(pid, "TracerPid")
    if tracer and tracer != "0":
        return (
            f"pid {pid} is traced by another process (TracerPid {tracer}, {_comm(int(tracer))}); "
            "detach it first"
        )
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = None
    if os.geteuid() != 0:
        owner = owner_of(pid)
        why = f"permission denied tracing pid {pid} ({_comm(pid)}, owned by {owner})"
        if scope == "1":
            return (f"{why}: kernel.yama.ptrace_scope=1 lets only CAP_SYS_PTRACE (or root) "
                    "trace a process kvmtop did not start")  # fmt: skip
        if scope and scope != "0":
            return f"{why}: kernel.yama.ptrace_scope={scope} lets only root trace"
        if owner != owner_of(os.getpid()):
            run_as = "root" if owner == "root" else f"{owner} or as root"
            return f"{why}: ptrace needs its user or CAP_SYS_PTRACE; run kvmtop as {run_as}"
        return f"{why}: it cannot be traced by its own user (setuid?); run kvmtop as root"
    why = f"kernel.yama.ptrace_scope={scope}" if scope and scope != "0" else "a security module"
    return f"permission denied tracing pid {pid}: {why} refuses it, even to root"


def check_attachable(pid: int) -> tuple[str, ...]:
    """The argv of ``pid`` if it is a KVM process kvmtop may trace; else a clear error."""
    if not 0 < pid < 2**22 or not os.path.exists(f"/proc/{pid}"):  # 2**22: PID_MAX_LIMIT
        raise NoSuchProcess(f"no such process: {pid}")
    if pid == os.getpid():
        raise KvmtopError("kvmtop cannot trace itself")
    tracer = status_field(pid, "TracerPid")
    if tracer and tracer != "0" and int(tracer) != os.getpid():
        raise PermissionDenied(permission_hint(pid))
    try:
        links = list(fd_table(pid).values())
    except PermissionError:
        raise PermissionDenied(permission_hint(pid)) from None
    except FileNotFoundError:
        raise NoSuchProcess(f"no such process: {pid}") from None
    if not any(link in ("/dev/kvm", VM_FD_LINK) for link in links):
        raise NotKvmProcess(
            f"pid {pid} ({_comm(pid)}) is not a KVM process: it has no /dev/kvm or VM fd"
        )
    return cmdline(pid)


def cmdline(pid: int) -> tuple[str, ...]:
    """The argv of ``pid`` (its comm when that cannot be read, or a kernel thread's empty one)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        argv = ()
    return argv or (_comm(pid),)


def parent_of(pid: int) -> int:
    ppid = status_field(pid, "PPid")
    return int(ppid) if ppid else 0
