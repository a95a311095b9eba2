"""A bordered text pane whose text is coloured by exit reason: the base of the small panes."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import events
from textual.widgets import Static

from kvmtop.widgets import palette

UNBOUNDED = 1000


class ReasonPane(Static):
    """Subclasses set TITLE and draw their text in :meth:`draw`, which may depend on the pane's
    size: it is drawn again on a resize, with what it was shown last. Each subclass gets the
    reason colours as component classes of its own."""

    TITLE: ClassVar[str] = ""
    COMPONENT_CLASSES = set(palette.COMPONENT_CLASSES)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        cls.DEFAULT_CSS = (
            f"{name} {{ height: auto; min-height: 3; border: round $primary-darken-2; "
            "padding: 0 1; text-wrap: nowrap; text-overflow: clip; }\n" + palette.css_for(name)
        )

    def __init__(self, title: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = title or self.TITLE
        self._shown: tuple[Any, ...] | None = None

    def show(self, *args: Any) -> None:
        self._shown = args
        self.update(self.draw(*args))

    def draw(self, *args: Any) -> Text:
        raise NotImplementedError

    def on_resize(self, _event: events.Resize) -> None:
        if self._shown is not None:
            self.update(self.draw(*self._shown))

    @property
    def room(self) -> tuple[int, int]:
        """Columns and lines inside the border and padding (80 columns before the first layout;
        lines without end where the pane's height follows its text)."""
        region, height = self.content_region, self.styles.height
        lines = UNBOUNDED if height is None or height.is_auto else region.height or UNBOUNDED
        return region.width or 80, lines
