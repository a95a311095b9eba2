"""A live, scrollable log of a vCPU's latest exits with their decoded details."""

from __future__ import annotations

from textual.widgets import Log

from kvmtop.decoder import describe_exit
from kvmtop.events import ExitEvent
from kvmtop.units import duration


class ExitLog(Log):
    DEFAULT_CSS = """
    ExitLog { height: 1fr; min-height: 5; border: round $primary-darken-2; scrollbar-size-horizontal: 0; }
    ExitLog:focus { border: round $accent; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=2000, auto_scroll=True, **kwargs)  # type: ignore[arg-type]
        self.border_title = "latest exits"
        self._last: ExitEvent | None = None
        self._origin_ns: int | None = None

    def show(self, recent: tuple[ExitEvent, ...], origin_ns: int | None) -> None:
        """Append the exits not shown yet (``recent`` is oldest first)."""
        self._origin_ns = origin_ns
        start = 0
        if self._last is not None:
            for i in range(len(recent) - 1, -1, -1):
                if recent[i] is self._last:
                    start = i + 1
                    break
        fresh = recent[start:]
        if fresh:
            self.write_lines([self._line(e) for e in fresh])
            self._last = fresh[-1]

    def _line(self, e: ExitEvent) -> str:
        t = (e.exit_ns - (self._origin_ns or e.exit_ns)) / 1e9
        return f"{t:12.6f}s  in guest {duration(e.guest_ns):>9}  {describe_exit(e)}"
