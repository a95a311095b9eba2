"""What a screen asks of the app: messages that bubble up to it, so screens never reach into the
app or the tracing session themselves."""

from __future__ import annotations

from textual.message import Message


class AttachRequested(Message):
    """Attach to (or return to the view of) process ``pid``."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid


class KernelRequested(Message):
    """Show KVM's own counters of process ``pid`` (taking its stats fds first if need be)."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid


class DemoRequested(Message):
    """Start the built-in demo guest under trace."""


class DetachRequested(Message):
    """Detach from the traced VMM; it runs on untraced."""


class BackRequested(Message):
    """Leave the attached view for the process list (tracing goes on)."""


class WatchRequested(Message):
    """Watch process ``pid`` by sampling (detaching first if kvmtop traces it)."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
