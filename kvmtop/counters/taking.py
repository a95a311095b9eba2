"""Taking a VM's stats fds: kvmtop's own tracer attaches to the VMM for a moment, has one of its
threads make them (:mod:`kvmtop.trace.inject`) and detaches at once, so the VMM runs on
untraced; or, while a tracing session is on, its tracer does the same (:func:`settle_stats`);
or the fds a VMM holds itself (a QEMU that keeps them for ``query-stats``) are copied with
``pidfd_getfd``, with no attach at all. The same moment can also have the VMM answer
KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS) (:func:`take_moment`, for ``watch --rip``). From then on :class:`~kvmtop.counters.vm_stats.VmStats`
reads them. The one module of the counters that needs the tracer: what reads and draws them
never reaches it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from kvmtop.abi.binary_stats import StatsFile, StatsFormatError
from kvmtop.abi.ptrace_abi import pidfd_getfd
from kvmtop.counters.vm_stats import (
    VCPU_STATS_LINK,
    VM_STATS_LINK,
    StatsCancelled,
    StatsUnavailable,
    VmStats,
    close_quietly,
)
from kvmtop.errors import KvmtopError
from kvmtop.host.procfs import check_attachable, is_stopped
from kvmtop.model.messages import StatsFds, close_when_answered
from kvmtop.tracer_thread import Tracer

VCPU_IDENT = re.compile(r"kvm-\d+/vcpu-(\d+)$")  # a vCPU stats fd's id string
CANCEL_POLL_S = 0.05  # how often a take looks whether it is still wanted
T = TypeVar("T")


def settle_stats(
    pid: int, future: Future[StatsFds], timeout: float = 10.0, cancel: threading.Event | None = None
) -> VmStats:
    """The VmStats behind a tracer's :meth:`~kvmtop.tracer_thread.Tracer.stats_fds` answer.
    Given up on (timeout, ``cancel``), the answer may still come: its fds are closed then."""
    try:
        fds = result_unless(future, timeout, cancel)
    except StatsCancelled:
        close_when_answered(future)
        raise
    except TimeoutError:  # first: TimeoutError is an OSError, with no message of its own
        close_when_answered(future)
        if is_stopped(pid, traced=True):
            raise StatsUnavailable(stopped_message(pid)) from None
        raise StatsUnavailable(
            f"no KVM counters for pid {pid}: its vCPU threads did not enter KVM_RUN within "
            f"{timeout:g} s (are its vCPUs paused?); a vCPU's counters can only be made by the "
            "thread that runs it"
        ) from None
    except OSError as exc:
        raise StatsUnavailable(f"no KVM counters for pid {pid}: {exc}") from None
    return VmStats(pid, fds)


def stopped_message(pid: int) -> str:
    return (
        f"no KVM counters for pid {pid}: it is stopped (SIGSTOP; /proc state T), so its vCPUs "
        "are not running and none of its threads can make the counters' fds (KVM makes them "
        f"only for the VM's own process); resume it with kill -CONT {pid}"
    )


def result_unless(future: Future[T], timeout: float, cancel: threading.Event | None) -> T:
    """``future.result(timeout)``, given up at once (StatsCancelled) when ``cancel`` is set."""
    deadline = time.monotonic() + timeout
    while True:
        if cancel is not None and cancel.is_set():
            raise StatsCancelled("cancelled")
        left = deadline - time.monotonic()
        try:
            return future.result(max(0.0, min(left, CANCEL_POLL_S)))
        except TimeoutError:
            if left <= CANCEL_POLL_S:
                raise


def take_stats(pid: int, timeout: float = 10.0, cancel: threading.Event | None = None) -> VmStats:
    """Attach to ``pid``, take its stats fds, detach: the VMM runs on untraced. ``cancel`` set
    (the exporter stopping) gives up at once: the tracer detaches, which is safe at any point,
    since it injects whole syscalls between two of its own steps."""
    taken = take_moment(pid, True, False, timeout, cancel)
    if taken.stats is None:
        raise StatsUnavailable(taken.stats_error)
    return taken.stats


@dataclass(frozen=True, slots=True)
class Moment:
    """What one brief attach took: KVM's counters, the VMM's answers to KVM_CAP_SYNC_REGS
    (``{VM fd: the kvm_valid_regs bits KVM allows, or -errno}``), each where asked and had,
    else why not."""

    stats: VmStats | None = None
    stats_error: str = ""
    sync_allowed: dict[int, int] | None = None
    sync_error: str = ""


def take_moment(pid: int, stats: bool, sync_regs: bool, timeout: float = 10.0,
                cancel: threading.Event | None = None) -> Moment:  # fmt: skip
    """Attach to ``pid`` for one moment: its stats fds (``stats``) and its own
    KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS) answers (``sync_regs``, for ``watch --rip``), asked
    at once; then detach: the VMM runs on untraced. Raises StatsCancelled when ``cancel`` is
    set, KvmtopError when ``pid`` cannot be attached to."""
    check_attachable(pid)
    if is_stopped(pid):  # no thread of it would stop for the tracer: waiting is no use
        raise StatsUnavailable(stopped_message(pid))
    deadline = time.monotonic() + timeout
    tracer = Tracer()
    tracer.start()
    try:
        result_unless(tracer.attach(pid), timeout, cancel)
        try:
            asked_sync = tracer.sync_regs_allowed() if sync_regs else None
            asked_stats = tracer.stats_fds() if stats else None
            return _settle_moment(pid, asked_stats, asked_sync, timeout, deadline, cancel)
        finally:
            tracer.detach()
    finally:
        tracer.stop(timeout)


def _settle_moment(pid: int, asked_stats: Future[StatsFds] | None,
                   asked_sync: Future[dict[int, int]] | None, timeout: float, deadline: float,
                   cancel: threading.Event | None) -> Moment:  # fmt: skip
    taken, stats_error = None, ""
    if asked_stats is not None:  # asked first: it has the whole timeout
        try:
            taken = settle_stats(pid, asked_stats, timeout, cancel)
        except StatsCancelled:
            raise
        except StatsUnavailable as exc:
            stats_error = str(exc)
    allowed, sync_error = None, ""
    try:
        if asked_sync is not None:
            allowed = result_unless(asked_sync, max(0.0, deadline - time.monotonic()), cancel)
    except StatsCancelled:
        if taken is not None:
            taken.close()
        raise
    except TimeoutError:
        sync_error = f"pid {pid}: no thread of it made a syscall kvmtop could ask KVM with"
    except KvmtopError as exc:
        sync_error = str(exc)
    return Moment(taken, stats_error, allowed, sync_error)


def _vcpu_of_stats_fd(fd: int) -> int | None:
    """The vCPU id a vCPU stats fd is of (from its id string), or None if it cannot be read."""
    try:
        found = VCPU_IDENT.search(StatsFile(fd).ident)
    except (OSError, StatsFormatError):
        return None
    return int(found.group(1)) if found is not None else None


def copy_held_stats(
    pid: int, pidfd: int, table: dict[int, str], vcpu_ids: set[int]
) -> VmStats | None:
    """The stats fds the VMM holds itself, copied with ``pidfd_getfd`` (no attach, no stop): when
    it holds one of its only VM and one of each of ``vcpu_ids``, else None (nothing kept)."""
    vm_fds = [fd for fd, link in table.items() if link == VM_STATS_LINK]
    vcpu_fds = [fd for fd, link in table.items() if link.startswith(VCPU_STATS_LINK)]
    if len(vm_fds) != 1 or len(vcpu_fds) < len(vcpu_ids):
        return None
    copies: dict[int, int] = {}
    vm: int | None = None
    try:
        vm = pidfd_getfd(pidfd, vm_fds[0])
        for fd in vcpu_fds:
            copy = pidfd_getfd(pidfd, fd)
            vcpu = _vcpu_of_stats_fd(copy)
            if vcpu is None or vcpu in copies:
                os.close(copy)
                continue
            copies[vcpu] = copy
    except OSError:
        pass  # closed meanwhile, or the VMM ended: nothing is kept
    if vm is None or set(copies) != vcpu_ids:
        for fd in [*copies.values(), vm]:
            close_quietly(fd)
        return None
    try:
        return VmStats(pid, StatsFds(copies, vm, {}))
    except StatsUnavailable:
        return None
