"""Starting processes for the tracer, with no Python in a forked child (a forked copy of a
threaded Python can deadlock): posix_spawn only. No ptrace here: the tracer seizes what these
return.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import dataclass
from typing import Any

from kvmtop.abi.arch import HOST
from kvmtop.abi.kvm import KVM_CREATE_VCPU, KVM_RUN
from kvmtop.abi.ptrace_abi import WNOTHREAD
from kvmtop.errors import CommandNotFound, KvmtopError

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
# A launched command gets the signal dispositions a shell would give it: those kvmtop itself was
# started with ignored (the SIGINT of a background job, nohup's SIGHUP) stay ignored, kvmtop's
# own handlers never reach it (taken at import, before kvmtop installs any).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
INHERITED_IGNORED = tuple(s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN)
# Python ignores SIGPIPE and SIGXFSZ, and a launched command would inherit that.
CHILD_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ) + tuple(
    s for s in STOP_SIGNALS if s not in INHERITED_IGNORED
)


def spawn_kicker() -> tuple[int, int]:
    """(pid, pipe fd) of a child that only sleeps: `read` on a pipe whose other end only the
    caller holds, so it ends by itself when kvmtop goes, however kvmtop goes. Its own process
    group keeps the terminal's Ctrl-C away from it. Stopping it wakes the tracer's waitpid."""
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(
            "/bin/sh", ["sh", "-c", "read _"], {"PATH": "/usr/bin:/bin"},
            file_actions=[(os.POSIX_SPAWN_DUP2, read_end, 0)], setpgroup=0,
        )  # fmt: skip
    finally:
        os.close(read_end)
    return pid, write_end


@dataclass(frozen=True, slots=True)
class Spawned:
    """A command started stopped: ``filter`` is "notify" (seccomp user notification, the
    listener is fd ``listener`` in the child), "trace" (SECCOMP_RET_TRACE) or "" (none), and
    ``why`` says why a better one is not in place."""

    pid: int
    filter: str
    listener: int = -1
    why: str = ""


def spawn_stopped(
    argv: list[str],
    seccomp: str,
    child_stdio: str | None,
    stdout_to_stderr: bool,
    child_stderr: str | None = None,
) -> Spawned:
    """Start ``argv`` stopped before its first instruction: a shell (or, under a seccomp filter,
    a fresh interpreter that installs it) that stops itself and, once continued, execs the
    command. ``seccomp``: "notify" (user notification, falling back to RET_TRACE), "trace"
    (RET_TRACE only) or "" (no filter). ``child_stdio``: a file for its stdin, stdout and
    stderr; ``child_stderr``: a file its stderr goes to instead (appended)."""
    if not argv:
        raise CommandNotFound("no command given")
    if shutil.which(argv[0]) is None:
        raise CommandNotFound(f"command not found: {argv[0]}")
    actions: list[tuple[Any, ...]] = []
    if child_stdio is not None:
        actions = [(os.POSIX_SPAWN_OPEN, 0, child_stdio, os.O_RDWR, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
    elif stdout_to_stderr:
        actions = [(os.POSIX_SPAWN_DUP2, 2, 1)]
    if child_stderr is not None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        actions.append((os.POSIX_SPAWN_OPEN, 2, child_stderr, flags, 0o600))
    report_r, report_w = os.pipe()
    actions.append((os.POSIX_SPAWN_DUP2, report_w, 3))
    notify = trace = "-"
    if seccomp:
        notify = HOST.seccomp_ioctls((KVM_RUN,), HOST.SECCOMP_RET_USER_NOTIF).hex()
        trace = HOST.seccomp_trace_ioctls(KVM_RUN, KVM_CREATE_VCPU).hex()
    ignored = ",".join(str(int(s)) for s in INHERITED_IGNORED) or "-"
    spawn = [sys.executable, "-I", "-S", LAUNCHER, notify if seccomp == "notify" else "-", trace,
             ignored, *argv]  # fmt: skip
    try:
        pid = os.posix_spawn(
            spawn[0], spawn, os.environ, file_actions=actions, setsigdef=CHILD_DEFAULT_SIGNALS
        )
    finally:
        os.close(report_w)
    _, status = os.waitpid(pid, os.WUNTRACED | WNOTHREAD)
    with os.fdopen(report_r, "rb") as pipe:
        spawned = _reported(pid, pipe.read().decode(errors="replace"))
    if not seccomp:
        spawned = Spawned(pid, "")
    if not os.WIFSTOPPED(status):
        raise KvmtopError(f"cannot start {argv[0]}: its launcher ended with status {status}")
    return spawned


def _reported(pid: int, report: str) -> Spawned:
    """What the launcher said: "notify FD", "trace[ (why not notify)]", "no seccomp: why"."""
    if report.startswith("notify "):
        return Spawned(pid, "notify", int(report.split()[1]))
    if report.startswith("trace"):
        return Spawned(pid, "trace", why=report[5:].strip(" ()"))
    return Spawned(pid, "", why=report.removeprefix("no seccomp: "))
