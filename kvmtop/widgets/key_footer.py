"""The footer of every screen: Textual's Footer, which lets go of the keys it replaces."""

from __future__ import annotations

from textual import events
from textual.widgets import Footer

COMPACT_BELOW = 120  # columns: narrower, the keys lose their padding so that more of them fit
NO_PALETTE_BELOW = 100  # columns: narrower, no ^p key (the help, ?, names the palette)


class KeyFooter(Footer):
    """Textual's Footer makes its keys anew whenever the screen's bindings change (each time the
    screen comes back on top, as a drill-down closes) and binds each key's ``compact`` to its
    own. Textual forgets such a binding only when ``compact`` changes, which here it never does,
    so every key the footer ever showed stayed alive, its rendered lines with it: about 50 KiB a
    key, 18 keys for each drill-down opened and closed (Textual 8.2.8, issue #6666). After each
    remake, the bindings of the keys just removed are dropped.

    Narrower than :data:`COMPACT_BELOW` columns the keys go compact, and narrower than
    :data:`NO_PALETTE_BELOW` the command palette's key goes: at 80 columns every screen's keys
    then fit, the help key last, where the attached screen's were cut at "w Wat"."""

    DEFAULT_CSS = """
    KeyFooter.-compact FooterLabel {
        margin: 0 1 0 0;  /* a group's label (Seek 10s) keeps its space before the next key */
    }
    """

    def on_resize(self, event: events.Resize) -> None:
        self.compact = event.size.width < COMPACT_BELOW
        palette = event.size.width >= NO_PALETTE_BELOW
        if palette != self.show_command_palette:
            self.show_command_palette = palette
            self.refresh(recompose=True)  # Footer composes that key only when it remakes them

    async def recompose(self) -> None:
        await super().recompose()
        # Textual keeps the bindings made to a node on the node, as (binder, setter) pairs
        for bound in getattr(self, "__watchers", {}).values():
            bound[:] = [(key, setter) for key, setter in bound if key.is_attached]
