"""The engine in pure Python (:class:`PyEngine`, a :class:`~kvmtop.trace.engine.PtraceEngine`):
the tracer's hot state and loops, and the reference for ``kvmtop.native._hotloop``.

An engine holds what tracing needs per stop: the traced threads (tid -> process, whether it runs
vCPUs, its syscall budget, the run it is in), the vCPUs (process, fd -> a view of that vCPU's
``struct kvm_run``), and packed exit records in the recording's layout (:mod:`kvmtop.model.records`).
Its loops handle the common case (a KVM_RUN entry or return, a seccomp stop or a user
notification on a known vCPU fd) and hand everything else back to the tracer, which decides.
:func:`kvmtop.trace.native_engine.make_engine` picks the C engine when it was built; both have
this exact interface and the tests run the tracer on each.

Only the tracer thread calls :meth:`run`, :meth:`handle` and :meth:`resume` (ptrace); the
notification thread calls only :meth:`notify_run` and :meth:`notify_continue` (no ptrace).
"""

from __future__ import annotations

import errno as errno_module
import fcntl
import select
import threading
import time
from typing import Any

from kvmtop.abi import ptrace_abi as pt
from kvmtop.abi.arch import HOST
from kvmtop.abi.kvm import KVM_CREATE_VCPU, KVM_RUN, KVMIO, RUN_IMMEDIATE_EXIT
from kvmtop.abi.record_layout import EXIT_CYCLE, KIND_VCPU, VCPU_HEAD
from kvmtop.abi.seccomp import (
    NOTIF,
    NOTIF_RESP,
    SECCOMP_IOCTL_NOTIF_RECV,
    SECCOMP_IOCTL_NOTIF_SEND,
    SECCOMP_USER_NOTIF_FLAG_CONTINUE,
)
from kvmtop.decoder import decode_exit, exit_reason_of, is_read
from kvmtop.model.coalesced import RingLook, unreadable_record
from kvmtop.model.events import ExitEvent, GuestRip
from kvmtop.model.records import pack_exit
from kvmtop.trace.engine import (
    MODE_TWO_STOP,
    P_HANDBACK,
    P_NO_RESUME,
    P_SYSCALLS,
    SYSCALL_BUDGET,
    Notified,
    PageOwner,
    Stop,
    Taken,
    ThreadState,
)
from kvmtop.trace.stop_wait import StopWaiter
from kvmtop.xlat_exit import ExitReason

RIP_OFF, RIP_ARMED, RIP_ON = 0, 1, 2  # a page's RIP parts: none; kvm_valid_regs set; a run since
NO_WINDOW = (0, 0, 0, 0, 0)  # stops, seen ns, unseen ns: estimate, least, most (records.HELD)
ROUND_TRIP_BLOCK = 64  # round trips measured per estimate of a stop's unseen cost
ROUND_TRIP_FIRST = 16  # ...and the first estimate, before a whole block
ROUND_TRIP_OTHERS = 16  # the estimate leaves KVM_RUN's out where a block has this many others
ROUND_TRIP_CLASS = 16  # a class's most is taken from a block that has this many of its own
SLEPT, POLLED = 0, 1  # the classes of a stop: kvmtop slept for it, or a poll caught it
StopCosts = tuple[int, int, int, int]  # round_trip_costs: least, estimate, most (slept, polled)
NO_COSTS: StopCosts = (0, 0, 0, 0)  # none measured yet


def round_trip_costs(block: list[tuple[int, bool, int]],
                     before: StopCosts = NO_COSTS) -> StopCosts:  # fmt: skip
    """A stop's unseen cost per the round trips of ``block`` ((ns, was it KVM_RUN's, the class
    of the stop that ended it: SLEPT or POLLED), not empty): (least, estimate, most after a stop
    kvmtop slept for, most after one a poll caught). Each round trip is one unseen resume-to-stop
    plus a syscall (a run's: plus KVM's part and the guest's run) or the VMM's work in user
    space, so it is at least its own stop's cost. Where the block has enough others' round
    trips, the least is the shortest of them and the estimate their mean; else the least is 0
    (a run's round trip holds KVM's part, which can be most of it: it bounds nothing from
    below) and the estimate the mean of all. A most is the mean of
    the slowest quarter of its class's (kvmtop's own wake-up is most of what a stop costs, and
    one from sleep is the slow one), kept from ``before`` for a class the block has fewer than
    ROUND_TRIP_CLASS of. The same integer arithmetic as ``round_trip_costs`` in
    native/hotloop.c."""
    times = [ns for ns, _run, _class in block]
    others = [ns for ns, run, _class in block if not run]
    if len(others) >= ROUND_TRIP_OTHERS:
        least, estimate = min(others), sum(others) // len(others)
    else:
        least, estimate = 0, sum(times) // len(times)
    mosts = []
    for way in (SLEPT, POLLED):
        ways = sorted(ns for ns, _run, class_ in block if class_ == way)
        if len(ways) < ROUND_TRIP_CLASS:
            mosts.append(before[2 + way])
            continue
        slower = ways[len(ways) - len(ways) // 4 :]
        mosts.append(max(1, sum(slower) // len(slower)))
    return least, estimate, mosts[SLEPT], mosts[POLLED]


def stop_cost(costs: StopCosts, way: int) -> tuple[int, int, int]:
    """(least, estimate, most) of a stop whose unseen part ended in a stop of class ``way``
    (SLEPT or POLLED), per ``costs`` (round_trip_costs): a stop a poll caught costs at most
    what one kvmtop slept for does, where its own class has no figure yet; the estimate lies
    within the bound. No most (0) where neither has one."""
    least, estimate, most_slept, most_polled = costs
    most = (most_polled or most_slept) if way == POLLED else most_slept
    if not most:
        return least, estimate, 0
    return least, min(max(estimate, least), most), most


def window_with_stop(window: tuple[int, int, int, int, int],
                     seen: int) -> tuple[int, int, int, int, int]:  # fmt: skip
    """``window`` (NO_WINDOW's fields) with one more stop, seen for ``seen`` ns; its unseen part
    comes with the thread's next stop (window_with_unseen)."""
    stops, seen_ns, unseen, least, most = window
    return stops + 1, seen_ns + seen, unseen, least, most


def window_with_unseen(window: tuple[int, int, int, int, int],
                       costs: tuple[int, int, int]) -> tuple[int, int, int, int, int]:  # fmt: skip
    """``window`` with the unseen part of its latest stop, which costs ``costs`` (stop_cost; a
    most of 0: none measured yet, and then the window has no most: 0)."""
    stops, seen_ns, unseen, least, most = window
    least_cost, estimate, most_cost = costs
    bounded = most_cost and (most or stops == 1)
    return (stops, seen_ns, unseen + estimate, least + least_cost,
            most + most_cost if bounded else 0)  # fmt: skip


class _Thread:
    __slots__ = ("tid", "pid", "runner", "in_run", "creating", "budget", "entry_ns", "page",
                 "handling", "open", "entered", "resumed_ns", "resumed_run")  # fmt: skip

    def __init__(self, tid: int, pid: int) -> None:
        self.tid = tid
        self.pid = pid
        self.runner = False  # has run KVM_RUN or created a vCPU: always syscall-traced
        self.in_run = False
        self.creating = False
        self.budget = SYSCALL_BUDGET
        self.entry_ns = 0
        self.page: _Page | None = None  # set between KVM_RUN entry and exit
        # Two stops: the time stopped for kvmtop between a KVM_RUN return and the next entry
        self.handling = False  # in that window
        self.open = NO_WINDOW  # ...the time stopped in it so far
        self.entered = NO_WINDOW  # the window that ended at this run's entry
        self.resumed_ns = 0  # resumed from a syscall stop at (0: not from one)
        self.resumed_run = False  # ...of KVM_RUN


class _Page:
    __slots__ = ("vcpu", "tid", "read", "view", "open_since", "open_immediate", "held",
                 "held_window", "ring", "rip")  # fmt: skip

    def __init__(self, vcpu: int, tid: int, read: Any, view: memoryview | None) -> None:
        self.vcpu = vcpu
        self.tid = tid
        self.read = read  # () -> the kvm_run bytes (a live view, or a fresh copy), or None
        self.view = view  # released when the page goes, so that its mapping can be closed
        self.open_since = 0  # one stop / notify: entry of the run not yet accounted for
        self.open_immediate = False  # ...and that run was entered with immediate_exit set
        self.held: tuple[int, int] | None = None  # two stops, --data: a read's (entry, exit)
        self.ring: _Ring | None = None  # the VM's coalesced MMIO ring, through this vCPU's mapping
        # ns, recorded at the next entry, where the VMM has put the value for the guest
        self.held_window = NO_WINDOW  # ...and the time stopped before that read's entry
        # RIP_ON: KVM syncs the guest's registers at the end of every run begun since the
        # tracer set kvm_valid_regs (RIP_ARMED): its exits carry a RIP part
        self.rip = RIP_OFF

    def guest_rip(self, view: memoryview | bytes) -> GuestRip | None:
        """The RIP part of the exit ``view`` holds, if this page's exits carry one."""
        if self.rip != RIP_ON:
            return None
        found = HOST.guest_rip(view)
        return None if found is None else GuestRip(*found)

    def entered(self) -> None:
        """A run begins: after kvm_valid_regs was set, KVM syncs at its end."""
        if self.rip == RIP_ARMED:
            self.rip = RIP_ON


class _Ring:
    """A page's view of its VM's coalesced MMIO ring, and the VM's look at it (shared)."""

    __slots__ = ("look", "view")

    def __init__(self, look: RingLook, view: memoryview) -> None:
        self.look = look
        self.view = view


class PyEngine:
    """The engine in Python (see the module docstring); slower, and the reference."""

    native = False

    def __init__(
        self, base_ns: int, with_data: bool, poll_max_ns: int, wait_flags: int,
        sys_ioctl: int = HOST.SYS_IOCTL,
    ) -> None:  # fmt: skip
        self.base_ns = base_ns
        self.with_data = with_data
        self.sys_ioctl = sys_ioctl
        self._waiter = StopWaiter(wait_flags, poll_max_ns)
        self._lock = threading.Lock()
        self._threads: dict[int, _Thread] = {}
        self._pages: dict[tuple[int, int], _Page] = {}
        self._modes: dict[int, tuple[int, int]] = {}  # pid -> (mode, P_* flags)
        self._records = bytearray()
        self._seen = bytearray()
        self._stops = self._notifications = self._lost = self._exits = 0
        self._info = pt.SyscallInfo()
        self._pending: tuple[int, ...] | None = None
        self._notif = bytearray(NOTIF.size)
        self._op = 0  # the syscall stop's PTRACE_SYSCALL_INFO_* op (0: not a syscall stop)
        self._round_trips: list[tuple[int, bool, int]] = []  # (ns, was it KVM_RUN's, class)
        self._stop_costs = NO_COSTS  # round_trip_costs of the latest block
        # ...and stop_cost of it per class (SLEPT, POLLED): made once a block, read per stop
        self._cost_by_way = (stop_cost(NO_COSTS, SLEPT), stop_cost(NO_COSTS, POLLED))
        self._rings: dict[tuple[int, int], RingLook | None] = {}  # (pid, VM fd) -> its look
        self._coalesced = bytearray()

    # --- ptrace stops (tracer thread) -----------------------------------------------------------

    def run(self, deadline_ns: int, max_bytes: int) -> Stop | None:
        wait = self._waiter.wait
        while True:
            try:
                tid, status, now = wait()
            except InterruptedError:
                return None
            th = self._threads.get(tid)
            if th is None or self._modes.get(th.pid, (0, P_HANDBACK))[1] & P_HANDBACK:
                return Stop(tid, status, now)
            if not self.handle(tid, status, now):
                return Stop(tid, status, now)
            if len(self._records) >= max_bytes or now >= deadline_ns:
                return None

    # Per KVM exit in two-stop mode: 2 stops (KVM_RUN entry and exit), each waitpid +
    # PTRACE_GET_SYSCALL_INFO + PTRACE_SYSCALL; one stop: 1 such stop; the exit is read from our
    # own mapping of kvm_run (no syscall).
    def handle(self, tid: int, status: int, now: int) -> bool:
        if (status & 0xFF) != 0x7F:
            return False
        th = self._threads.get(tid)
        if th is None:
            return False
        mode, flags = self._modes.get(th.pid, (MODE_TWO_STOP, 0))
        with self._lock:
            if th.handling and th.open[0]:
                # this stop ends the unseen part of the window's latest one: what it cost
                # depends on whether kvmtop slept for this stop or a poll caught it
                th.open = window_with_unseen(th.open, self._cost_by_way[self._waiter.polled])
            try:
                handled = self._handle(th, mode, status, now)
            except pt.PtraceError as exc:
                if exc.errno != errno_module.ESRCH:
                    raise
                return False  # killed while stopped: the tracer sees it exit next
        if handled:
            self._stops += 1
            if not flags & P_NO_RESUME:
                if mode == MODE_TWO_STOP and th.runner:
                    # read before the resume: after it, the thread may already run, and kvmtop
                    # may not (a wake-up can preempt it)
                    resumed = time.monotonic_ns()
                    self._resume(th, mode, flags, 0)
                    self._held_stop(th, now, resumed)
                else:
                    self._resume(th, mode, flags, 0)
        return handled

    def _held_stop(self, th: _Thread, now: int, resumed: int) -> None:
        """After a vCPU thread's stop, seen at ``now``, was handled and the thread resumed (the
        resume began at ``resumed``)."""
        if th.resumed_ns and (self._op == pt.PTRACE_SYSCALL_INFO_EXIT or not th.in_run):
            # resume to the next stop: one stop's unseen round trip, plus a syscall (entry to
            # exit), or the VMM's own work in user space (exit to an entry other than KVM_RUN)
            block = self._round_trips
            block.append((now - th.resumed_ns, th.resumed_run, self._waiter.polled))
            if len(block) == ROUND_TRIP_BLOCK or (
                len(block) == ROUND_TRIP_FIRST and not self._stop_costs[2]
            ):
                costs = self._stop_costs = round_trip_costs(block, self._stop_costs)
                self._cost_by_way = (stop_cost(costs, SLEPT), stop_cost(costs, POLLED))
                if len(block) == ROUND_TRIP_BLOCK:
                    block.clear()
        th.resumed_ns = resumed
        th.resumed_run = th.in_run
        if th.handling:
            th.open = window_with_stop(th.open, resumed - now)

    def _handle(self, th: _Thread, mode: int, status: int, now: int) -> bool:
        self._op = 0
        if status >> 8 == pt.SYSCALL_STOP:
            info = self._info.fetch(th.tid)
            op = self._op = info[0]
            if op == pt.PTRACE_SYSCALL_INFO_ENTRY:
                if mode != MODE_TWO_STOP:
                    return True  # its KVM_RUN entries are seccomp stops or notifications
                nr, fd, request = pt.SYSCALL_INFO_ENTRY.unpack_from(info)
                if nr == self.sys_ioctl and (request >> 8) & 0xFF == KVMIO:
                    request &= 0xFFFFFFFF
                    if request == KVM_RUN:
                        page = self._run_page(th.pid, fd, th.tid, now)
                        if page is None:
                            return False
                        if page.held is not None:
                            self._record_held(page, reads=True)
                        page.entered()
                        th.runner = th.in_run = True
                        th.page = page
                        th.entry_ns = now
                        th.entered = th.open if th.handling else NO_WINDOW
                        th.handling = False
                    elif request == KVM_CREATE_VCPU:
                        th.runner = th.creating = True
                    else:
                        th.budget = SYSCALL_BUDGET  # a KVM thread: keep watching it
                elif th.budget > 0:
                    th.budget -= 1
            elif op == pt.PTRACE_SYSCALL_INFO_EXIT:
                if th.in_run:
                    th.in_run = False
                    self._look(th.page, now)
                    rval = pt.SYSCALL_INFO_EXIT.unpack_from(info)[0]
                    self._record_exit(th, rval, now)
                    th.handling = True  # this stop starts the VMM's handling of the exit
                    th.open = NO_WINDOW
                elif th.creating:
                    return False  # a new vCPU fd: the tracer maps it
            return True
        if status >> 16 == pt.PTRACE_EVENT_SECCOMP and (status >> 8) & 0xFF == 5:
            info = self._info.fetch(th.tid)
            _nr, fd, request = pt.SYSCALL_INFO_ENTRY.unpack_from(info)
            request &= 0xFFFFFFFF
            if request == KVM_RUN:
                page = self._run_page(th.pid, fd, th.tid, now)
                if page is None:
                    return False
                self._look(page, now)
                if page.open_since:
                    self._record_cycle(page, now)
                self._open_run(page, now)
                return True
            if request == KVM_CREATE_VCPU:
                th.creating = True  # resumed with PTRACE_SYSCALL: its return gives the fd
                return True
        return False

    def _record_exit(self, th: _Thread, rval: int, now: int) -> None:
        page = th.page
        th.page = None
        view = page.read() if page is not None else None
        if page is None or view is None:
            if rval == 0:
                self._lost += 1  # an exit happened, but its kvm_run could not be read
            return
        if rval == 0:
            reason, a, b, flags, data = decode_exit(view, self.with_data)
            if self.with_data and is_read(reason, flags):
                page.held = (th.entry_ns, now)  # its value comes at the next entry
                page.held_window = th.entered
                return
            event = ExitEvent(page.vcpu, reason, 0, th.entry_ns, now, a, b, flags, data,
                              *th.entered, rip=page.guest_rip(view))  # fmt: skip
        else:
            event = ExitEvent(page.vcpu, exit_reason_of(view), -rval, th.entry_ns, now, 0, 0, 0,
                              b"", *th.entered, rip=page.guest_rip(view))  # fmt: skip
        self._emit(event)

    def _record_cycle(self, page: _Page, now: int) -> None:
        """The exit that ended the run entered at ``page.open_since``; its times span the run
        and the VMM's handling (EXIT_CYCLE)."""
        since, page.open_since = page.open_since, 0
        view = page.read()
        if view is None:
            self._lost += 1
            return
        reason = ExitReason.INTR if page.open_immediate else exit_reason_of(view)
        if reason == ExitReason.INTR:  # the kernel sets it when a signal ends the run (EINTR)
            event = ExitEvent(page.vcpu, reason, errno_module.EINTR, since, now, flags=EXIT_CYCLE,
                              rip=page.guest_rip(view))  # fmt: skip
        else:
            _r, a, b, flags, data = decode_exit(view, self.with_data, reads=True)
            event = ExitEvent(page.vcpu, reason, 0, since, now, a, b, flags | EXIT_CYCLE, data,
                              rip=page.guest_rip(view))  # fmt: skip
        self._emit(event)

    def _record_held(self, page: _Page, reads: bool) -> None:
        """A read held for its value: at the next entry (``reads``), or as it is when the vCPU
        goes without running again."""
        (entry, exit_ns), page.held = page.held, None
        view = page.read()
        if view is None:
            self._lost += 1
            return
        reason, a, b, flags, data = decode_exit(view, self.with_data, reads=reads)
        self._emit(ExitEvent(page.vcpu, reason, 0, entry, exit_ns, a, b, flags, data,
                             *page.held_window, rip=page.guest_rip(view)))  # fmt: skip

    def _open_run(self, page: _Page, now: int) -> None:
        view = page.read()
        page.open_since = now
        page.entered()
        # With immediate_exit set, KVM_RUN returns EINTR at once and leaves exit_reason as it
        # was: remember it, or the previous exit would be counted twice.
        page.open_immediate = bool(view[RUN_IMMEDIATE_EXIT]) if view is not None else False

    def _emit(self, event: ExitEvent) -> None:
        pack_exit(self._records, event, self.base_ns)
        self._exits += 1

    def _run_page(self, pid: int, fd: int, tid: int, now: int) -> _Page | None:
        """The vCPU that thread ``tid`` runs with ``fd``, noting a thread new to it."""
        page = self._pages.get((pid, fd))
        if page is not None and page.tid != tid:
            self._saw(page, tid, now)
        return page

    def _saw(self, page: _Page, tid: int, now: int) -> None:
        page.tid = tid
        if page.vcpu >= 0:  # not a vCPU whose kvm_run cannot be read
            self._seen += VCPU_HEAD.pack(KIND_VCPU, page.vcpu, tid, now - self.base_ns)

    def _resume(self, th: _Thread, mode: int, flags: int, sig: int) -> None:
        if flags & P_SYSCALLS:
            syscalls = True
        elif mode == MODE_TWO_STOP:
            syscalls = th.runner or th.budget > 0
        else:  # only the filter stops it, and KVM_CREATE_VCPU's return
            syscalls = th.creating
        try:
            pt.ptrace(pt.PTRACE_SYSCALL if syscalls else pt.PTRACE_CONT, th.tid, 0, sig)
        except pt.PtraceError as exc:
            if exc.errno != errno_module.ESRCH:
                raise
            # Killed while stopped (SIGKILL needs no tracer): its exit status follows.

    def resume(self, tid: int, sig: int) -> None:
        th = self._threads[tid]
        self._resume(th, *self._modes.get(th.pid, (MODE_TWO_STOP, 0)), sig)

    # --- tables ---------------------------------------------------------------------------------

    def add_process(self, pid: int, mode: int) -> None:
        self._modes[pid] = (mode, 0)

    def set_process(self, pid: int, mode: int, flags: int) -> None:
        if pid in self._modes:
            self._modes[pid] = (mode, flags)

    def remove_process(self, pid: int) -> None:
        with self._lock:
            self._modes.pop(pid, None)
            self._rings = {k: v for k, v in self._rings.items() if k[0] != pid}
            for tid in [t for t, th in self._threads.items() if th.pid == pid]:
                del self._threads[tid]

    def add_thread(self, tid: int, pid: int) -> bool:
        with self._lock:
            if tid in self._threads:
                return False
            self._threads[tid] = _Thread(tid, pid)
            return True

    def remove_thread(self, tid: int) -> bool:
        with self._lock:
            return self._threads.pop(tid, None) is not None

    def thread(self, tid: int) -> ThreadState | None:
        th = self._threads.get(tid)
        if th is None:
            return None
        return ThreadState(th.pid, th.runner, th.budget, th.creating, th.in_run)

    def set_thread(self, tid: int, runner: bool, creating: bool) -> bool:
        """Also out of KVM_RUN: a run that ended is the caller's to account for."""
        th = self._threads.get(tid)
        if th is None:
            return False
        th.runner, th.creating = runner, creating
        th.in_run, th.page = False, None
        th.handling, th.resumed_ns = False, 0
        return True

    def threads_of(self, pid: int) -> list[int]:
        return [t for t, th in list(self._threads.items()) if th.pid == pid]

    def add_page(
        self, pid: int, fd: int, vcpu: int, tid: int, mapping: Any, remote_address: int
    ) -> None:
        view = None
        if mapping is not None:
            live = view = memoryview(mapping)
            read = lambda: live  # noqa: E731 - a live view: no syscall per read
        elif not remote_address:
            read = lambda: None  # noqa: E731 - a vCPU whose kvm_run cannot be read
        else:
            reader = pt.RemoteReader(pid, HOST.RUN_MAP_SIZE)

            def read() -> memoryview | None:
                try:
                    return reader.read(remote_address)
                except OSError:
                    return None

        with self._lock:
            self._drop((pid, fd))
            self._pages[(pid, fd)] = _Page(vcpu, tid, read, view)

    def _drop(self, key: tuple[int, int]) -> bool:
        page = self._pages.pop(key, None)
        if page is None:
            return False
        if page.held is not None:
            self._record_held(page, reads=False)
        for th in self._threads.values():
            if th.page is page:
                th.page = None
        if page.view is not None:
            page.view.release()
        if page.ring is not None:
            page.ring.view.release()
        return True

    def remove_page(self, pid: int, fd: int) -> bool:
        with self._lock:
            return self._drop((pid, fd))

    def set_rip(self, pid: int, fd: int, on: bool) -> bool:
        """The tracer has set the page's kvm_valid_regs (``on``: its exits carry RIP parts
        from its next run on), or is about to restore it (none from now)."""
        with self._lock:
            page = self._pages.get((pid, fd))
            if page is not None:
                page.rip = RIP_ARMED if on else RIP_OFF
            return page is not None

    def page(self, pid: int, fd: int) -> PageOwner | None:
        page = self._pages.get((pid, fd))
        return None if page is None else PageOwner(page.vcpu, page.tid)

    def close_runs(self, pid: int, tid: int, now: int) -> None:
        """A vCPU thread (``tid``; 0: all of ``pid``) has ended: the exit of its last run is
        final. A last run that a dying process's kill cut short (KVM_EXIT_INTR) is no exit."""
        with self._lock:
            for (page_pid, _fd), page in self._pages.items():
                if page_pid != pid or not page.open_since or (tid and page.tid != tid):
                    continue
                self._look(page, now)
                view = page.read()
                if page.open_immediate or view is None or exit_reason_of(view) == ExitReason.INTR:
                    page.open_since = 0
                else:
                    self._record_cycle(page, now)

    # --- the coalesced MMIO ring (kvmtop.model.coalesced) ---------------------------------------------

    def add_ring(self, pid: int, fd: int, vm: int, mapping: Any) -> None:
        """The coalesced MMIO ring of the vCPU at (pid, fd), after its add_page: a mapping of
        the ring's page, or None where it cannot be read (said once per VM, nothing counted)."""
        with self._lock:
            page = self._pages.get((pid, fd))
            if page is None:
                return
            key = (pid, vm)
            if mapping is None:
                if key not in self._rings:
                    self._rings[key] = None
                    t = time.monotonic_ns() - self.base_ns
                    self._coalesced += unreadable_record(max(page.vcpu, 0), t)
                return
            view = memoryview(mapping)
            look = self._rings.get(key)
            if look is None:
                look = self._rings[key] = RingLook(view)
            if page.ring is not None:
                page.ring.view.release()
            page.ring = _Ring(look, view)

    def _look(self, page: _Page | None, now: int) -> None:
        """At each exit seen: the writes its VM's ring took since the previous look."""
        ring = page.ring if page is not None else None
        if ring is not None:
            ring.look.look(ring.view, page.vcpu, now - self.base_ns, self._coalesced)

    def take_coalesced(self) -> bytes:
        with self._lock:
            out = bytes(self._coalesced)
            self._coalesced.clear()
        return out

    def take(self) -> Taken:
        with self._lock:
            out = Taken(bytes(self._records), bytes(self._seen), self._stops, self._notifications,
                        self._lost, self._exits)  # fmt: skip
            self._records.clear()
            self._seen.clear()
            self._stops = self._notifications = self._lost = self._exits = 0
        return out

    def pending(self) -> int:
        return (
            len(self._records)
            + len(self._seen)
            + len(self._coalesced)
            + self._stops
            + self._notifications
            + self._lost
        )

    def set_base(self, base_ns: int) -> None:
        self.base_ns = base_ns

    # --- seccomp user notification (notification thread) -----------------------------------------

    def notify_run(self, listener: int, wake: int, max_bytes: int) -> Notified:
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(wake, select.POLLIN)
        buf = self._notif
        while True:
            events = dict(poller.poll())
            if wake in events:
                return Notified("wake")
            if events.get(listener, 0) & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return Notified("hangup")
            buf[:] = bytes(NOTIF.size)
            try:
                fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
            except OSError as exc:
                if exc.errno in (errno_module.EINTR, errno_module.ENOENT):
                    continue  # ENOENT: withdrawn, its caller took a signal
                raise
            notif = NOTIF.unpack(buf)
            with self._lock:
                answered = self._answer(listener, notif, force=False)
                if not answered:
                    self._pending = notif
            if not answered:
                _id, tid, _flags, nr, _arch, _ip, fd, request = notif[:8]
                is_run = nr == self.sys_ioctl and request & 0xFFFFFFFF == KVM_RUN
                return Notified("unknown", tid, fd, is_run)
            if len(self._records) >= max_bytes:
                return Notified("full")

    def notify_continue(self, listener: int) -> None:
        with self._lock:
            notif, self._pending = self._pending, None
            if notif is not None:
                self._answer(listener, notif, force=True)

    def _answer(self, listener: int, notif: tuple[int, ...], force: bool) -> bool:
        now = time.monotonic_ns()
        notif_id, tid, _flags, nr, _arch, _ip, fd, request = notif[:8]
        th = self._threads.get(tid)
        page = None
        if th is not None and nr == self.sys_ioctl and request & 0xFFFFFFFF == KVM_RUN:
            page = self._pages.get((th.pid, fd))
        if page is None and not force:
            return False
        if page is not None:
            if page.tid != tid:
                self._saw(page, tid, now)
            self._look(page, now)
            if page.open_since:  # the previous run ended when this one is asked for
                self._record_cycle(page, now)
        self._notifications += 1
        resp = NOTIF_RESP.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        try:
            fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, resp)
        except OSError as exc:
            if exc.errno != errno_module.ENOENT:
                raise
            return True  # its caller took a signal: the run was not entered; it asks again
        if page is not None:
            self._open_run(page, now)  # counted once, when the run it ends was really entered
        return True
