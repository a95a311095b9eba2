"""`?`: every key of every screen, taken from the screens' own BINDINGS so it cannot drift from
the footer or the command palette, and what the columns mean."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Group
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

GLOSSARY = (
    ("exits/s", "exits in the last whole second"),
    ("timeline", "exits per second over the last 60 s (as many as fit), each second coloured by "
                 "its most frequent reason; then a bar of the vCPU's exits by reason, and its "
                 "largest reasons"),
    ("g (guest)", "time inside KVM_RUN per run"),
    ("v (VMM)", "handling time: from an exit until that vCPU's next KVM_RUN"),
    ("n (net)", "v less what kvmtop's stops held the vCPU thread (attached), per exit an "
     "estimate cut at 0, with where its mean lies; unknown where the mean cannot be told, "
     "cut where most exits' estimates were cut at 0"),
    ("lost", "exits seen but not decoded: must stay 0"),
    ("stops/s", "ptrace stops per second and per exit, the cost of tracing: attached, 2 per "
                "KVM_RUN and per syscall of a vCPU thread"),
    ("in VMM ±", "watch view: the share of the vCPU's time out of KVM_RUN, the VMM handling an "
                 "exit, sampled from its kvm_run, with its 95% bound; its exits/s are KVM's "
                 "counters, exact; nothing is traced"),
)  # fmt: skip
QUITTING = ("q", "quits on every screen (Esc goes back), detaching first: the VMM runs on "
            "untraced (the demo guest, which kvmtop started, is stopped)")  # fmt: skip

Sections = dict[str, list[BindingType]]


def key_rows(sections: Sections, display: Callable[[Binding], str]) -> list[tuple[str, str, str]]:
    """(where, key, what it does) from each section's bindings."""
    rows = []
    for section, bindings in sections.items():
        where = section
        for b in bindings:
            if isinstance(b, Binding):
                rows.append((where, display(b), b.tooltip or b.description))
                where = ""
        rows.append(("", "", ""))
    return rows


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,question_mark,f1,h", "app.pop_screen", "Close"),
        Binding("q,f10,ctrl+c", "app.quit", "Quit"),  # as on every screen (a modal hides the app's)
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 100; max-width: 100%; max-height: 90%; border: round $accent; background: $surface;
        padding: 0 1;
    }
    HelpScreen > VerticalScroll > Static { width: auto; }
    """

    def __init__(self, sections: Sections) -> None:
        super().__init__()
        self.sections = sections
        self.text = ""  # the help as plain text, once composed

    def compose(self) -> ComposeResult:
        rows = key_rows(self.sections, self.app.get_key_display)
        table = Table(box=None, padding=(0, 1), show_header=False)
        table.add_column("where", style="bold", no_wrap=True)
        table.add_column("key", style="bold", no_wrap=True)
        table.add_column("does")
        for row in rows:
            table.add_row(*row)
        # the terms in a column of their own: a meaning that wraps stays beside its term
        glossary = Table(box=None, padding=(0, 1), show_header=False)
        glossary.add_column("term", style="bold", no_wrap=True)
        glossary.add_column("means")
        for term, meaning in (*GLOSSARY, ("", ""), QUITTING):
            glossary.add_row(term, meaning)
        self.text = "\n".join(
            [*(" ".join(row) for row in rows), *(f"{t}  {m}" for t, m in (*GLOSSARY, QUITTING))]
        )
        with VerticalScroll() as scroll:
            scroll.border_title = "kvmtop keys (Esc closes, q quits)"
            yield Static(Group(table, glossary))
