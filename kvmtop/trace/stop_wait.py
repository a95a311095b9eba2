"""Waiting for the next ptrace stop: sleep in waitpid(), or poll first where that is faster.

A tracee's stop wakes the tracer from waitpid(). When the tracer's CPU has gone idle meanwhile,
that wake-up can cost as much as the rest of the stop again (under nested virtualization an idle
CPU halts and is woken through the host), so polling waitpid(WNOHANG) for a window before
sleeping can double the stops/s. But on a host whose CPUs are all busy, wake-ups are cheap and a
polling tracer takes CPU the VMM's threads and other tenants need, while its polls still succeed.
Whether a poll caught the stop says nothing about which is faster; only the stops' pace does. So
:class:`PollChooser` times short epochs of each way, alternated, keeps the faster for a longer
period, and times both again now and then (the host changes by the hour). It polls only where
that can pay: not when the stops come too far apart for a window to catch them, nor when the
host's CPUs are contended (CPU pressure, ``/proc/pressure/cpu``: tasks waited for a CPU a
quarter of the last 10 s or more), since polling there takes CPU from others.

:class:`PollChooser` is pure (fed with the moment each stop was seen and, when it asks, the
host's CPU pressure) and ``kvmtop/native/hotloop.c`` holds the same chooser, number for number;
its ``PollChooser`` type is the C one, so the tests feed both the same timings. Only the tracer
thread waits.

``KVMTOP_POLL_US`` sets the poll window (default 50 µs; 0: never poll).
"""

from __future__ import annotations

import os
import time

POLL_MAX_NS = 50_000
EPOCH_STOPS = 256  # an epoch: at least this many stops...
EPOCH_NS = 4_000_000  # ...over at least this long (the scheduler's own periods are ms)
PROBE_EPOCHS = 4  # a comparison: epochs sleeping, polling, polling, sleeping
EXPLOIT_MIN = 4  # epochs the faster way keeps after a comparison that changed the choice,
EXPLOIT_MAX = 128  # doubling up to this while comparisons confirm it
MARGIN_EIGHTHS = 7  # polling must be at least 1/8 faster: it costs the host CPU
SPARSE_SHARE = 4  # an epoch is sparse when fewer than 1 in 4 stops came within 2 windows:
# polling could not catch them, so sleeping is right without a comparison
GAP_MAX_NS = 10_000_000  # a gap counts for at most this
PRESSURE = "/proc/pressure/cpu"  # Documentation/accounting/psi.rst: "some avg10=12.34 ..."
CONTENDED = 2500  # contended: tasks waited for a CPU 25.00% of the last 10 s or more (its
# "total" moves in steps of tens of ms here, too coarse for an epoch)


def poll_max_ns_from_env() -> int:
    value = os.environ.get("KVMTOP_POLL_US", "")
    try:
        return max(0, int(value) * 1000) if value else POLL_MAX_NS
    except ValueError:
        return POLL_MAX_NS


class PollChooser:
    """Whether the next wait polls (``poll_ns``, the window) or sleeps at once (0), judged by
    the mean time per stop of epochs each way (pure: fed with when each stop was seen)."""

    __slots__ = ("max_ns", "poll_ns", "last_ns", "probing", "epoch", "exploit", "chosen",
                 "stops", "near", "spent_ns", "since_ns", "way_ns", "way_stops")  # fmt: skip

    def __init__(self, max_ns: int = POLL_MAX_NS) -> None:
        self.max_ns = max_ns
        self.poll_ns = 0
        self.last_ns = 0  # when the last stop was seen (0: none yet); a poll window starts here
        self.probing = True  # the first comparison begins at once
        self.epoch = 0  # epochs done in this comparison or this period
        self.exploit = EXPLOIT_MIN
        self.chosen = False  # what the last comparison chose (True: polling)
        self.stops = self.near = self.spent_ns = self.since_ns = 0  # this epoch
        self.way_ns = [0, 0]  # this comparison's time per way (0: sleeping, 1: polling)...
        self.way_stops = [0, 0]  # ...and stops

    def seen(self, now_ns: int) -> bool:
        """A stop was seen at ``now_ns``: its gap from the one before counts for this epoch.
        True: call :meth:`pressure` now."""
        if not self.max_ns:
            return False
        last, self.last_ns = self.last_ns, now_ns
        if not last:
            self.since_ns = now_ns
            return True  # the first comparison's start
        gap = now_ns - last
        # A gap over 10 ms is the VMM's own pause, not a wake-up or a scheduler's stall (a
        # polling tracer can cost the VMM a time slice): capped, so that an idle moment in one
        # epoch does not decide the comparison.
        self.spent_ns += min(gap, GAP_MAX_NS)
        self.near += gap <= 2 * self.max_ns
        self.stops += 1
        if self.stops >= EPOCH_STOPS and now_ns - self.since_ns >= EPOCH_NS:
            return self._epoch_done(now_ns)
        return False

    def pressure(self, waited: int) -> None:
        """The host's CPU pressure (PSI "some" avg10 in hundredths of a percent; -1: unknown),
        when :meth:`seen` asked: at a comparison's start."""
        if self.probing and self.epoch == 0 and waited >= CONTENDED:
            self._choose(False)  # contended: polling would take CPU others need

    def _epoch_done(self, now_ns: int) -> bool:
        sparse = self.near * SPARSE_SHARE < self.stops
        polling = 1 if self.poll_ns else 0
        if self.probing:
            self.way_ns[polling] += self.spent_ns
            self.way_stops[polling] += self.stops
        self.stops = self.near = self.spent_ns = 0
        self.since_ns = now_ns
        self.epoch += 1
        if sparse:  # sleep; compare when stops have come close for a period
            self._choose(False)
        elif self.probing and self.epoch == PROBE_EPOCHS:
            sleep_ns, poll_ns = self.way_ns
            sleep_stops, poll_stops = self.way_stops
            self._choose(poll_ns * sleep_stops * 8 < sleep_ns * poll_stops * MARGIN_EIGHTHS)
        elif self.probing:
            self.poll_ns = self.max_ns if self.epoch < PROBE_EPOCHS - 1 else 0
        elif self.epoch >= self.exploit:
            self.probing = True
            self.epoch = 0
            self.poll_ns = 0
            self.way_ns = [0, 0]
            self.way_stops = [0, 0]
            return True
        return False

    def _choose(self, polling: bool) -> None:
        """End a comparison, or a period, with ``polling`` chosen: the longer the same choice
        has held, the longer it holds."""
        confirmed = polling == self.chosen
        self.exploit = min(EXPLOIT_MAX, self.exploit * 2) if confirmed else EXPLOIT_MIN
        self.chosen = polling
        self.poll_ns = self.max_ns if polling else 0
        self.probing = False
        self.epoch = 0


def read_pressure() -> int:
    """The host's CPU pressure ("some" avg10, hundredths of a percent; -1: unreadable, as on a
    kernel without PSI)."""
    try:
        fd = os.open(PRESSURE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        line = os.read(fd, 128)
        start = line.index(b"avg10=") + 6
        whole, _, hundredths = line[start : line.index(b" ", start)].partition(b".")
        return int(whole) * 100 + int(hundredths[:2].ljust(2, b"0") or b"0")
    except (OSError, ValueError):
        return -1
    finally:
        os.close(fd)


class StopWaiter:
    """``waitpid(-1, flags)``, polling first when the chooser says so. Only the tracer thread
    calls it."""

    def __init__(self, flags: int, max_ns: int | None = None) -> None:
        self.flags = flags
        self.chooser = PollChooser(poll_max_ns_from_env() if max_ns is None else max_ns)
        self.polled = 0  # whether a poll caught the last stop (1), or kvmtop slept for it (0)

    # One clock read per stop (when it was seen), used by the caller too; polling adds one per
    # failed poll, and the chooser a read of the CPU pressure per comparison.
    def wait(self) -> tuple[int, int, int]:
        """(tid, status, the moment it was seen in ns)."""
        waitpid = os.waitpid
        monotonic_ns = time.monotonic_ns
        chooser = self.chooser
        self.polled = 1 if chooser.poll_ns else 0
        if chooser.poll_ns:
            deadline = chooser.last_ns + chooser.poll_ns
            nohang = self.flags | os.WNOHANG
            while True:
                tid, status = waitpid(-1, nohang)
                if tid:
                    break
                if monotonic_ns() >= deadline:
                    tid, status = waitpid(-1, self.flags)
                    self.polled = 0
                    break
        else:
            tid, status = waitpid(-1, self.flags)
        now = monotonic_ns()
        if chooser.seen(now):
            chooser.pressure(read_pressure())
        return tid, status, now
