"""The TUI's watch of one VM: a thread that opens a :class:`~kvmtop.sampling.watcher.Watcher` and takes
its snapshot every interval, so that nothing the UI thread does waits for it (opening may
attach for a moment to take KVM's counters; a snapshot reads every vCPU's counters).

The screen polls :meth:`WatchFeed.latest`, as the other views poll their aggregate. The feed
never ptraces: what it holds is the watcher's, closed by the thread itself when it stops.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from kvmtop.errors import KvmtopError
from kvmtop.sampling.shares import WatchSnapshot

RATE_HZ = 1000.0  # samples per second and vCPU
INTERVAL_S = 1.0  # one snapshot a second: the timeline's step


class SnapshotSource(Protocol):
    """What the feed needs of a watcher (:class:`kvmtop.sampling.watcher.Watcher`)."""

    @property
    def alive(self) -> bool: ...

    def snapshot(self) -> WatchSnapshot: ...

    def close(self) -> None: ...


def open_watcher(pid: int, rate_hz: float, rip: bool = False) -> SnapshotSource:
    """The watch of ``pid``; with ``rip`` (kvmtop --rip), the guest code at its exits too."""
    from kvmtop.sampling.watcher import Watcher

    return Watcher(pid, rate_hz, rip=rip)


class WatchFeed:
    """Watches ``pid`` from a thread of its own until :meth:`close` or the VMM's end. With
    ``after``, it first waits for that event (the tracer's detach: a VMM being traced by kvmtop
    cannot give its counters to another of kvmtop's attaches)."""

    def __init__(
        self,
        pid: int,
        rate_hz: float = RATE_HZ,
        interval_s: float = INTERVAL_S,
        after: threading.Event | None = None,
        opener: Callable[[int, float], SnapshotSource] = open_watcher,
    ) -> None:
        self.pid = pid
        self.rate_hz = rate_hz
        self.interval_s = interval_s
        self._after = after
        self._opener = opener
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._latest: WatchSnapshot | None = None
        self.version = 0  # one more at each snapshot taken
        self.error: str | None = None  # why the watch could not start
        self.ended = False  # the VMM ended: the watcher is closed
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kvmtop-watch", daemon=True)
        self._thread.start()

    def latest(self) -> WatchSnapshot | None:
        with self._lock:
            return self._latest

    def _run(self) -> None:
        if self._after is not None and not self._after.wait(10.0):
            self.error = f"pid {self.pid} is still traced: detach first"
            return
        try:
            watcher = self._opener(self.pid, self.rate_hz)
        except KvmtopError as exc:
            self.error = str(exc)
            return
        try:
            first = True
            while not self._stop.wait(self.interval_s / 4 if first else self.interval_s):
                first = False
                snap = watcher.snapshot()
                ended = not watcher.alive
                with self._lock:  # the end and its last snapshot are seen together
                    self._latest, self.ended = snap, ended
                    self.version += 1
                if ended:
                    return
        except KvmtopError as exc:
            self.error = str(exc)
        finally:
            watcher.close()

    @property
    def watched_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def closed(self) -> bool:
        return self._stop.is_set() and not self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Stop watching; with ``timeout``, wait that long for the watcher's fds to close."""
        self._stop.set()
        if timeout is not None:
            self._thread.join(timeout)
