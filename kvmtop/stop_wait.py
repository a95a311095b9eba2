"""Waiting for the next ptrace stop: poll briefly, then sleep.

A tracee's stop wakes the tracer from waitpid(). When the tracer's CPU has gone idle meanwhile,
that wake-up costs as much as the rest of the stop again, and far more under nested
virtualization, where an idle CPU halts and is woken through the host. At high exit rates the
next stop comes within tens of µs, so the tracer first polls waitpid(WNOHANG) for a short
window and only then sleeps, as KVM itself polls before it lets a halted vCPU sleep
(``halt_poll_ns``). The window adapts the same way: it grows when a sleep turned out short (a
longer poll would have caught the stop) and shrinks when sleeps are long, so a quiet VMM costs
no polling at all.

``KVMTOP_POLL_US`` sets the largest window (default 50 µs; 0 turns polling off).
"""

from __future__ import annotations

import os
import time

POLL_MAX_NS = 50_000
POLL_GROW_START_NS = 10_000


def poll_max_ns_from_env() -> int:
    value = os.environ.get("KVMTOP_POLL_US", "")
    try:
        return max(0, int(value) * 1000) if value else POLL_MAX_NS
    except ValueError:
        return POLL_MAX_NS


class PollWindow:
    """The adaptive polling window (pure: fed with how long each wait took)."""

    __slots__ = ("max_ns", "ns")

    def __init__(self, max_ns: int = POLL_MAX_NS) -> None:
        self.max_ns = max_ns
        self.ns = max_ns

    def waited(self, waited_ns: int) -> None:
        """A wait that polling did not end: it took ``waited_ns`` from its start."""
        if waited_ns <= self.max_ns:  # a longer window would have caught it
            self.ns = min(self.max_ns, max(POLL_GROW_START_NS, self.ns * 2))
        else:
            self.ns //= 2
            if self.ns < POLL_GROW_START_NS:
                self.ns = 0


class StopWaiter:
    """``waitpid(-1, flags)`` with adaptive polling first. Only the tracer thread calls it."""

    def __init__(self, flags: int, max_ns: int | None = None) -> None:
        self.flags = flags
        self.window = PollWindow(poll_max_ns_from_env() if max_ns is None else max_ns)

    def wait(self) -> tuple[int, int]:
        waitpid = os.waitpid
        monotonic_ns = time.monotonic_ns
        window = self.window
        start = monotonic_ns()
        if window.ns:
            deadline = start + window.ns
            nohang = self.flags | os.WNOHANG
            while True:
                tid, status = waitpid(-1, nohang)
                if tid:
                    return tid, status
                if monotonic_ns() >= deadline:
                    break
        tid, status = waitpid(-1, self.flags)
        if window.max_ns:
            window.waited(monotonic_ns() - start)
        return tid, status
