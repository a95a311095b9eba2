"""The `/` filter of a list: a mode of the screen, not a box to focus. The screen keeps the focus
and hands every key to :meth:`TypedFilter.take` in the order the keys came. A focus change would
come too late for keys arriving in one burst (a paste, keys coalesced over SSH): they are all
routed before the first is handled, and would run as commands."""

from __future__ import annotations

import re
from collections.abc import Callable

from rich.text import Text
from textual import events
from textual.widgets import Static


def pattern_for(text: str) -> tuple[re.Pattern[str], str | None]:
    """As kvm_stat's `f`: a case-insensitive regex; text that is no regex (yet: `(` typed
    alone) matches as a plain substring, and why it is no regex is returned beside it."""
    try:
        return re.compile(text, re.IGNORECASE), None
    except re.error as exc:
        return re.compile(re.escape(text), re.IGNORECASE), str(exc.msg)


class TypedFilter:
    """The text typed after `/`, and whether keys still go to it (until Enter or Esc)."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self.text = ""
        self.typing = False
        self.pattern, self.invalid = pattern_for("")  # invalid: why the text is no regex
        self._changed = changed  # called after every change of the text or of the mode

    def matches(self, *fields: str) -> bool:
        """Whether the pattern is found in one of ``fields``, each on its own (`^` and `$`
        anchor to a field's ends)."""
        return not self.text or any(self.pattern.search(f) is not None for f in fields)

    @property
    def not_a_regex(self) -> str:
        """What to say when the text is no regex, so matched as plain text ("" when it is)."""
        return f"not a regex ({self.invalid}): matched as plain text" if self.invalid else ""

    def start(self) -> None:
        self.typing = True
        self._changed()

    def clear(self) -> None:
        self.typing = False
        self._set("")

    def _set(self, text: str) -> None:
        self.text = text
        self.pattern, self.invalid = pattern_for(text)
        self._changed()

    def take(self, event: events.Key) -> bool:
        """Handle ``event`` if it is the filter's; then stop it, so that no binding runs it."""
        if not self.typing:
            if event.key == "slash":
                self.start()
            elif event.key == "escape" and self.text:
                self.clear()
            else:
                return False
        elif event.is_printable and event.character:
            self._set(self.text + event.character)
        elif event.key == "backspace":
            self._set(self.text[:-1])
        elif event.key == "enter":
            self.typing = False  # the filter stays; the screen's keys work again
            self._changed()
        elif event.key == "escape":
            self.clear()
        else:
            return False  # e.g. ↑ ↓ move in the filtered list
        event.stop()
        event.prevent_default()
        return True

    def show_in(self, bar: Static) -> None:
        """The line that says what is filtered and how to change it; hidden without a filter."""
        bar.display = self.typing or bool(self.text)
        warning = (f"   {self.not_a_regex}", "bold") if self.invalid else ""
        if self.typing:
            bar.update(Text.assemble(("/", "bold"), self.text, (" ", "reverse"), warning,
                                     ("   Enter keeps the filter, Esc clears it", "dim")))  # fmt: skip
        else:
            bar.update(Text.assemble("filter: ", (self.text, "bold"), warning,
                                     ("   / edits it, Esc clears it", "dim")))  # fmt: skip
