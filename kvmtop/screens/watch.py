"""The watch view (`w`): a VM watched by sampling, never traced. One line per vCPU (KVM's exits/s,
the share of time in the VMM and its 60 s timeline, the VMM's time by reason), the whole VM's
time by exit reason and its busiest IO ports and MMIO addresses by VMM time, each share with
its 95% bound; KVM's counters are exact, the shares sampled, and the view says which is which.
`a` switches to exact tracing of the same VM (`w` there comes back here). With ``--rip``, a
guest code pane: the guest RIPs (or symbols) the VM's time in the VMM went to, sampled.

The watcher runs in a :class:`~kvmtop.sources.watch_feed.WatchFeed` thread; this screen only polls it.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Static

from kvmtop.formats.guest_symbols import code_text
from kvmtop.sampling.shares import WatchSnapshot
from kvmtop.sources.watch_feed import WatchFeed
from kvmtop.units import elapsed, human
from kvmtop.widgets.key_footer import KeyFooter
from kvmtop.widgets.sampled_code import SampledCode, SampledCodeRow
from kvmtop.widgets.sampled_code import lines_for as code_lines
from kvmtop.widgets.sampled_targets import SampledTargets, lines_for
from kvmtop.widgets.sampled_vcpus import SampledVcpus
from kvmtop.widgets.vcpu_table import MAX_LINES_PER_VCPU
from kvmtop.widgets.vmm_reasons import VmmReasons

POLL_S = 0.25


class SampledScreen(Screen[None]):
    BINDINGS = [
        Binding("a", "trace", "Trace exactly",
                tooltip="Trace this VM instead: every exit exactly, at a cost to the VM (w there "
                "comes back to watching)"),
        Binding("escape,w", "back", "Back", key_display="esc w",
                tooltip="Back to the process list (watching stops); q quits, as everywhere"),
    ]  # fmt: skip

    def __init__(self, feed: WatchFeed, trace: Callable[[int], None]) -> None:
        super().__init__()
        self.feed = feed
        self.trace = trace  # exact tracing of the pid instead (the app's)
        self._shown_version = -1
        self._snap: WatchSnapshot | None = None

    @property
    def pid(self) -> int:
        return self.feed.pid

    def compose(self) -> ComposeResult:
        yield Static(f"pid {self.pid}: taking its vCPUs' run pages and KVM's counters...",
                     id="title")  # fmt: skip
        with Vertical(id="body"):
            yield SampledVcpus(id="vcpus")
            with Horizontal(id="watch-row"):
                yield VmmReasons()
                yield SampledTargets()
            yield SampledCode()
        yield Static("", id="watch-status")
        yield KeyFooter()

    def on_mount(self) -> None:
        self.query_one(SampledVcpus).focus()
        self.query_one(SampledCode).display = False  # until a snapshot with guest RIPs asked
        self.set_interval(POLL_S, self._tick)

    def on_unmount(self) -> None:
        self.feed.close()  # its thread closes the watcher's fds

    def _tick(self) -> None:
        feed = self.feed
        if feed.error is not None:
            self.notify(feed.error, severity="error", timeout=6)
            feed.error = None
            if self.app.screen is self:
                self.app.pop_screen()
            return
        if feed.version == self._shown_version or not self.is_current:
            return
        self._shown_version = feed.version
        if feed.ended:
            self.refresh_bindings()  # `a` leaves the footer
        snap = feed.latest()
        if snap is not None:
            self.show(snap)

    def show(self, snap: WatchSnapshot) -> None:
        self._snap = snap
        self.query_one("#title", Static).update(self.title_text(snap))
        self.fit()
        self.query_one(SampledVcpus).show(snap.vcpus)
        vm = snap.vm
        self.query_one(VmmReasons).show(vm, snap.entry)
        self.query_one(SampledTargets).show(snap.top_ports, snap.top_addresses)
        code = self.query_one(SampledCode)
        code.display = snap.rip
        if snap.rip:
            code.show(self.code_rows(snap), snap.code_note)
        self.query_one("#watch-status", Static).update(self.status_text(snap))

    def code_rows(self, snap: WatchSnapshot) -> tuple[SampledCodeRow, ...]:
        """The VM's guest code, largest share first, named with the app's guest symbols."""
        symbols = getattr(self.app, "guest_symbols", None)
        top = snap.vm.code.top if snap.vm.code is not None else ()
        ranked = sorted(top, key=lambda c: -c.share.hits)
        return tuple((c.reason, c.share, code_text(c, symbols)) for c in ranked)

    def title_text(self, snap: WatchSnapshot) -> str:
        if self.feed.ended:
            return f"pid {self.pid} has ended: the watch is closed (Esc goes back)"
        rate = snap.vm.exits_per_s
        kvm = f"KVM: {human(rate)} exits/s (exact)" if rate is not None else "KVM's counters: -"
        return f"pid {self.pid}: watched, not traced: no cost to the VM   {kvm}"

    def status_text(self, snap: WatchSnapshot) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(" ended " if self.feed.ended else " watching ", style="reverse")
        text.append(f"  for {elapsed(self.feed.watched_s)}   samples {human(snap.vm.samples)} "
                    f"in {snap.seconds:.1f} s ({human(snap.rate_hz)}/s a vCPU)   "
                    f"vCPUs {len(snap.vcpus)}   ")  # fmt: skip
        if snap.note:
            text.append(snap.note, style="bold red" if not snap.reset_seen else "")
        else:
            text.append("exact: KVM's counters; sampled: shares ±95%", style="dim")
        return text

    def on_resize(self, _event: events.Resize) -> None:
        self.fit()

    def fit(self) -> None:
        """The vCPU pane's lines as in the attached view: what the VM's panes leave."""
        snap = self._snap
        if snap is None:
            return
        body = self.query_one("#body").size.height
        vcpus = max(1, len(snap.vcpus))
        reasons = 3 + 1 + max(1, len(snap.vm.by_reason))
        panes = max(reasons, 2 + lines_for(len(snap.top_ports), len(snap.top_addresses)))
        code = 0
        if snap.rip:  # up to 6 addresses, as far as the vCPUs leave room
            rows = len(snap.vm.code.top) if snap.vm.code is not None else 0
            code = 2 + code_lines(min(rows, max(1, (body - panes - 8) // 2), 6))
            self.query_one(SampledCode).styles.height = code
        room = body - panes - code
        per_vcpu = max(1, min(MAX_LINES_PER_VCPU, (room - 3) // vcpus))
        height = max(min(room, 3 + vcpus * per_vcpu), 3 + min(vcpus, 4))
        self.query_one(SampledVcpus).styles.height = height

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "trace":
            return not self.feed.ended  # nothing left to trace
        return True

    def action_trace(self) -> None:
        if self.app.screen is self:
            self.trace(self.pid)

    def action_back(self) -> None:
        if self.app.screen is self:
            self.app.pop_screen()
