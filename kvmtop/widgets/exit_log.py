"""A live, scrollable log of a vCPU's latest exits with their decoded details, each with its
time in the guest and the VMM's time handling it (the vCPU's next entry minus the exit: known
once the vCPU's next exit is in; until then the newest line says so, and is completed then).
In one-stop modes an exit's times span its run and the VMM's handling, which cannot be told
apart: one column, GUEST+VMM, has them. Scrolling up holds it still; scrolling back to the end
(End) resumes following the latest exits. A filter (a regex on the decoded exit: reason, port,
address) shows only the exits it matches. Times are seconds since tracing began, or the time
of day (:meth:`ExitLog.use_clock`). A header row names the columns; it stays in the top row
however the log scrolls."""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from datetime import datetime
from operator import attrgetter

from rich.text import Text
from textual.geometry import Size
from textual.strip import Strip
from textual.widgets import Log

from kvmtop.abi.record_layout import EXIT_CYCLE
from kvmtop.decoder import describe_exit
from kvmtop.model.events import ExitEvent, GuestRip
from kvmtop.units import duration

MAX_LINES = 2000
MAX_NEW_LINES = 400  # per refresh: the log's cost stays flat however fast the vCPU exits
_exit_ns = attrgetter("exit_ns")
HELD = "held: End follows the latest exits"
PENDING = "…"  # the VMM's time of the newest exit: known at the vCPU's next exit
GONE = "?"  # the next exit of the vCPU has left the ring before it was read
WIDTH = 9  # a duration's column
SINCE_WIDTH = 13  # seconds since tracing began: "   12.345678s"
CLOCK_WIDTH = 15  # the time of day: "12:34:56.789012"


class ExitLog(Log):
    COMPONENT_CLASSES = {"exit-log--header"}
    DEFAULT_CSS = """
    ExitLog { height: 1fr; min-height: 6; border: round $primary-darken-2; scrollbar-size-horizontal: 0; }
    ExitLog:focus { border: round $accent; }
    ExitLog > .exit-log--header { text-style: bold; color: $text-muted; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(max_lines=MAX_LINES, auto_scroll=True, **kwargs)  # type: ignore[arg-type]
        self.code_of: Callable[[GuestRip], str] | None = None  # names guest code (--rip)
        self.border_title = "latest exits"
        self._last_ns: int | None = None  # exit time of the last exit written
        self._origin_ns: int | None = None
        self._followed_to: float | None = None  # where the log last scrolled itself to
        self._recent: tuple[ExitEvent, ...] = ()  # the exits last shown, to filter them again
        self._pattern: re.Pattern[str] | None = None
        self._pending: ExitEvent | None = None  # the exit of the last line, its VMM time unknown
        self._gap_last = False  # the last line says exits were missed (no exit line since)
        self._clock: tuple[int, float] | None = None  # time of day: (monotonic ns, Unix time)
        self._one_stop = False  # the newest exit's times span its run and the VMM's handling

    def action_scroll_end(self) -> None:
        """End: follow the latest exits again, wherever the panes above have since moved the
        log's end to (its height changes with theirs)."""
        self._followed_to = None
        super().action_scroll_end()

    def filter(self, pattern: re.Pattern[str] | None, title: str = "latest exits") -> None:
        """Show only the exits whose decoded text ``pattern`` finds (None: every exit), those
        already shown too."""
        self._pattern = pattern
        self.border_title = title
        self._start_over()
        self.show(self._recent, self._origin_ns)

    def use_clock(self, clock: tuple[int, float] | None) -> None:
        """Time each exit by the time of day (``clock``: a monotonic ns and the Unix time of the
        same instant), or (None) in seconds since tracing began; the lines shown too."""
        self._clock = clock
        self._start_over()
        self.refresh()  # the header's time column too
        self.show(self._recent, self._origin_ns)

    def _start_over(self) -> None:
        self.clear()
        self._last_ns = None
        self._followed_to = None
        self._pending = None
        self._gap_last = False

    def show(self, recent: tuple[ExitEvent, ...], origin_ns: int | None) -> None:
        """Append the exits not shown yet (``recent`` is one vCPU's latest, oldest first)."""
        self._origin_ns = origin_ns
        self._recent = recent
        last = self._last_ns
        if not recent or (last is not None and recent[-1].exit_ns < last):
            if last is not None:  # a replay went back in time: start over
                self._start_over()
            if not recent:
                return
            last = None
        # follow unless the reader scrolled up; then hold still (appending would push what they
        # read out of the ring within a second at high rates) until they scroll back to the end.
        # The panes above can change the log's height, so "at the very end" alone is not the test.
        following = self._followed_to is None or self.scroll_y >= min(
            self._followed_to, self.max_scroll_y
        )
        self.border_subtitle = "" if following else HELD
        if not following:
            return
        lines = []
        start = 0 if last is None else bisect.bisect_right(recent, last, key=_exit_ns)
        self._complete_pending(recent, start)
        if last is not None and start == 0 and not self._gap_last:  # once until an exit is shown
            lines.append("   ... more exits came meanwhile than the ring holds; some are not shown")
            self._gap_last = True
        fresh = recent[start:]
        if fresh:
            self._last_ns = fresh[-1].exit_ns
        if self._pattern is not None:
            pattern = self._pattern
            fresh = tuple(e for e in fresh if pattern.search(self._described(e)))
        if len(fresh) > MAX_NEW_LINES:
            lines.append(
                f"   ... {len(fresh) - MAX_NEW_LINES} exits since the last refresh not shown"
            )
            fresh = fresh[-MAX_NEW_LINES:]
        if fresh:
            after = {id(e): n for e, n in zip(recent[start:], recent[start + 1 :], strict=False)}
            lines += [self._line(e, after.get(id(e))) for e in fresh]
            self._gap_last = False
            newest = fresh[-1]
            if self._one_stop != bool(newest.flags & EXIT_CYCLE):
                self._one_stop = not self._one_stop
                self.refresh()  # the header's time columns too
            self._pending = (
                newest if id(newest) not in after and newest.flags & EXIT_CYCLE == 0 else None
            )
        if lines:
            self.write_lines(lines, scroll_end=False)
            self.scroll_end(animate=False, immediate=True, x_axis=False)
            self._followed_to = self.scroll_y

    def _complete_pending(self, recent: tuple[ExitEvent, ...], start: int) -> None:
        """The last line's VMM time, now that the vCPU's next exit is in (``recent[start]``),
        or known to be lost (it left the ring unread)."""
        pending = self._pending
        if pending is None or start >= len(recent):
            return  # no exit since: still unknown
        self._pending = None
        if not self._lines or self._lines[-1] != self._line(pending, None):
            return  # not the last line any more
        self._lines[-1] = self._line(pending, recent[start] if start else None, gone=start == 0)
        self.refresh_lines(len(self._lines) - 1)

    def _line(self, e: ExitEvent, after: ExitEvent | None, gone: bool = False) -> str:
        """``after``: the vCPU's next exit, whose entry ends the VMM's handling of ``e``."""
        if self._clock is not None:
            mono_ns, unix = self._clock
            at = datetime.fromtimestamp(unix + (e.exit_ns - mono_ns) / 1e9).strftime("%H:%M:%S.%f")
        else:
            at = f"{(e.exit_ns - (self._origin_ns or e.exit_ns)) / 1e9:{SINCE_WIDTH - 1}.6f}s"
        if e.flags & EXIT_CYCLE:  # entry to the next entry: the run and the VMM's handling
            times = f"{duration(e.guest_ns):>{WIDTH}}"
        else:
            vmm = duration(after.entry_ns - e.exit_ns) if after else GONE if gone else PENDING
            times = f"{duration(e.guest_ns):>{WIDTH}}  {vmm:>{WIDTH}}"
        return f"{at}  {times}  {self._described(e)}"

    def _described(self, e: ExitEvent) -> str:
        """The decoded exit and, with --rip, the guest code it came from (named by
        :attr:`code_of`, the screen's, else its address)."""
        if e.rip is None:
            return describe_exit(e)
        code = self.code_of(e.rip) if self.code_of is not None else f"{e.rip.linear:#x}"
        return f"{describe_exit(e)}  @ {code}"

    @property
    def header(self) -> str:
        """The columns' names, each right-aligned over its column as its values are."""
        at = f"{'TIME OF DAY':>{CLOCK_WIDTH}}" if self._clock else f"{'SINCE START':>{SINCE_WIDTH}}"
        times = (
            f"{'GUEST+VMM':>{WIDTH}}" if self._one_stop else f"{'GUEST':>{WIDTH}}  {'VMM':>{WIDTH}}"
        )
        return f"{at}  {times}  EXIT"

    # The header takes the top row: the lines are drawn one row lower, and the log's height
    # counts one row more, so that scrolled to its end the last line still shows.

    def validate_virtual_size(self, size: Size) -> Size:
        return Size(size.width, size.height + 1)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        if y > 0:
            return self._render_line(scroll_y + y - 1, scroll_x, width)
        style = self.rich_style + self.get_component_rich_style("exit-log--header")
        text = Text(self.header, style=style, no_wrap=True, end="")
        strip = Strip(text.render(self.app.console), text.cell_len)
        return strip.crop_extend(scroll_x, scroll_x + width, style)

    def refresh_lines(self, y_start: int, line_count: int = 1) -> None:
        """Lines ``y_start`` and on, drawn a row below where Log puts them."""
        super().refresh_lines(y_start + 1, line_count)  # their rows (and lines y_start + 1...)
        self._render_line_cache.discard(y_start)
