"""Waking the tracer thread: it sleeps in waitpid(), which no queue can interrupt, so it keeps a
tiny child of its own; stopping that child with SIGSTOP makes waitpid return at once. Only the
tracer thread waits on it; any thread may kick it.
"""

from __future__ import annotations

import os
import signal

from kvmtop.host.spawn import spawn_kicker


class Kicker:
    def __init__(self) -> None:
        self.pid = 0  # 0: not started (kicking it is then a no-op)
        self._pipe = -1

    def start(self) -> None:
        if self._pipe >= 0:
            os.close(self._pipe)
        self.pid, self._pipe = spawn_kicker()

    def kick(self) -> None:
        try:
            if self.pid:
                os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass  # the tracer is gone or starting a new kicker

    def reported(self, status: int) -> None:
        """Its stop (or end) came through waitpid: let it go on (or start a new one, as someone
        killed it)."""
        if (status & 0xFF) == 0x7F:
            os.kill(self.pid, signal.SIGCONT)
        else:
            self.start()

    def close(self) -> None:
        if not self.pid:
            return
        os.close(self._pipe)  # its `read` sees end of file: it exits
        try:
            os.kill(self.pid, signal.SIGCONT)
            os.waitpid(self.pid, 0)
        except OSError:
            pass
        self.pid = 0
