"""A terminal below the size the screens are laid out for: a notice instead of a jumble of
clipped panes, until the terminal is large enough again (then the view underneath returns)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Middle
from textual.screen import ModalScreen
from textual.widgets import Static

MIN_WIDTH, MIN_HEIGHT = 70, 20  # every screen is checked at 80x24 (and 80x23, under tmux)


def too_small(width: int, height: int) -> bool:
    return width < MIN_WIDTH or height < MIN_HEIGHT


class TooSmallScreen(ModalScreen[None]):
    BINDINGS = [Binding("q,ctrl+c,f10", "app.quit", "Quit")]
    DEFAULT_CSS = """
    TooSmallScreen { background: $background; }
    TooSmallScreen Static { width: auto; color: $warning; text-align: center; }
    """

    def compose(self) -> ComposeResult:
        with Middle(), Center():
            yield Static(id="too-small")

    def on_mount(self) -> None:
        self.on_resize()

    def on_resize(self, _event: object = None) -> None:
        width, height = self.app.size
        self.query_one("#too-small", Static).update(
            f"kvmtop needs a terminal of {MIN_WIDTH}x{MIN_HEIGHT} at least;\n"
            f"this one is {width}x{height}.\nq quits"
        )
