"""The listener of a launched command's seccomp user notifications: its own thread, no ptrace.

Under kvmtop's notifying filter every ``ioctl(KVM_RUN)`` of the command waits until kvmtop
answers; the engine's :meth:`notify_run` loop (GIL released, in C when built) reads the exit the
vCPU's previous run ended with, records it, and lets the ioctl go on
(SECCOMP_USER_NOTIF_FLAG_CONTINUE). No ptrace stop per exit. It hands back what it does not know
(a thread or vCPU fd seen for the first time), which :attr:`Notifier.on_unknown` resolves before
the same notification is answered. The listener is closed only after every process under the
filter has gone (the kernel then reports a hang-up): closed earlier, each of their KVM_RUNs
would fail with ENOSYS.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable

from kvmtop.abi.seccomp import SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
from kvmtop.trace.engine import NotifyEngine

BATCH_BYTES = 4096 * 32  # records before the tracer is asked to flush


class Notifier:
    def __init__(
        self,
        engine: NotifyEngine,
        listener: int,
        on_unknown: Callable[[int, int, bool], None],
        on_full: Callable[[], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.engine = engine
        self.listener = listener
        self.on_unknown = on_unknown  # (tid, fd, is KVM_RUN): register the thread and vCPU
        self.on_full = on_full  # many records wait: the tracer should flush
        self.on_error = on_error
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvmtop-notify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """End the loop at once (kvmtop is going; the command goes with it: EXITKILL)."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)

    def wait(self, timeout: float) -> None:
        """Until the loop has ended by itself (every process under the filter has gone)."""
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                got = engine.notify_run(self.listener, self._wake_r, BATCH_BYTES)
                if got.why == "unknown":
                    try:
                        self.on_unknown(got.tid, got.fd, bool(got.is_run))
                    finally:
                        engine.notify_continue(self.listener)  # answered whatever happened
                elif got.why == "full":
                    self.on_full()
                elif got.why == "hangup":
                    break
        except OSError as exc:
            self.on_error(f"seccomp listener failed: {exc.strerror or exc}")
        finally:
            os.close(self.listener)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.on_full()  # the last records go out


def set_sync_wakeup(listener: int) -> bool:
    """Ask the kernel to wake the listener on the notifying CPU (Linux 6.6+); False if it can't."""
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
    except OSError:
        return False
    return True
