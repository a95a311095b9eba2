"""A bordered text pane whose text is coloured by exit reason: the base of the small panes."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.widgets import Static

from kvmtop.widgets import palette


class ReasonPane(Static):
    """Subclasses set TITLE; each gets the reason colours as component classes of its own."""

    TITLE: ClassVar[str] = ""
    COMPONENT_CLASSES = set(palette.COMPONENT_CLASSES)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__
        cls.DEFAULT_CSS = (
            f"{name} {{ height: auto; min-height: 3; border: round $primary-darken-2; padding: 0 1; }}\n"
            + palette.css_for(name)
        )

    def __init__(self, title: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.border_title = title or self.TITLE
