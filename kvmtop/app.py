"""The kvmtop TUI: pick a KVM process, attach with one key, watch every vCPU's exits live.

Owns the one tracing session the TUI drives (attach, launch, the demo, detach, quit) and which
screen is on show. The UI never traces and never computes statistics: the session's threads
feed the aggregate, and the screens read a snapshot of it 4 times a second, so the UI's cost
does not grow with the exit rate. Nothing here blocks on the tracer, except closing it at quit.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from textual import events, work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from kvmtop.aggregate.exits import ExitStats
from kvmtop.counters.held_stats import HeldStats
from kvmtop.errors import CommandNotFound, KvmtopError, KvmUnavailable, NoTerminal, UsageError
from kvmtop.formats.guest_symbols import GuestSymbols
from kvmtop.host.discovery import KvmProcess, list_kvm_processes, others_vmms
from kvmtop.minivmm.vmm import demo_command
from kvmtop.model.messages import Attached, StatsFds
from kvmtop.screens.attached import AttachedScreen
from kvmtop.screens.help import HelpScreen, Sections
from kvmtop.screens.kernel import REFRESH_S as KERNEL_REFRESH_S
from kvmtop.screens.kernel import KernelScreen
from kvmtop.screens.ordered_keys import OrderedKeysApp
from kvmtop.screens.polled import REFRESH_S, REPLAY_BINDINGS, WatchScreen
from kvmtop.screens.process_list import ProcessListScreen
from kvmtop.screens.requests import (
    AttachRequested,
    BackRequested,
    DemoRequested,
    DetachRequested,
    KernelRequested,
    WatchRequested,
)
from kvmtop.screens.too_small import TooSmallScreen, too_small
from kvmtop.screens.vcpu import TYPED_REPLAY_KEYS, VcpuScreen
from kvmtop.screens.watch import SampledScreen
from kvmtop.sources.live import LiveSource
from kvmtop.sources.replay import Replay
from kvmtop.sources.session import SessionState, TraceSession
from kvmtop.sources.watch_feed import SnapshotSource, WatchFeed, open_watcher
from kvmtop.units import command_text, ended_text
from kvmtop.widgets.vcpu_table import VcpuTable

UNLISTED_ACTIONS = frozenset({"quit", "app.quit", "command_palette", "help", "app.pop_screen"})


class KvmtopApp(OrderedKeysApp):
    CSS_PATH = "app.tcss"
    TITLE = "kvmtop"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]  # wide: names in full
    BINDINGS = [
        Binding("q,f10,ctrl+c", "quit", "Quit", key_display="q",
                tooltip="Quit, detaching first: the VMM runs on (also F10, Ctrl+C)"),
        Binding("question_mark,f1,h", "help", "Help", key_display="?",
                tooltip="Every key (also F1, h)"),
    ]  # fmt: skip

    def __init__(
        self,
        pid: int | list[int] | None = None,
        argv: list[str] | None = None,
        replay: str | None = None,
        demo: bool = False,
        record_path: str | None = None,
        process_lister: Callable[[], list[KvmProcess]] = list_kvm_processes,
        others: Callable[[], dict[str, list[int]]] | None = None,
        refresh_s: float | None = None,
        watcher: Callable[[int, float], SnapshotSource] = open_watcher,
        all_vms: bool = False,
        rip: bool = False,
        guest_symbols: GuestSymbols | None = None,
    ) -> None:
        super().__init__()
        self.start_all = all_vms  # every VMM on the host (the tracepoint engine)
        self.rip = rip  # --rip: every exit's guest RIP (the attached view's `g` turns it on too)
        self.guest_symbols = guest_symbols  # --guest-symbols: names for the guest code
        self.watcher = watcher  # opens the watch of a VM (`w`)
        self.feeds: list[WatchFeed] = []  # every watch opened: closed at quit
        self.process_lister = process_lister
        # other users' VMMs, named when none of one's own is found (with the real lister)
        self.others = others or (others_vmms if process_lister is list_kvm_processes else dict)
        self.refresh_s = refresh_s or REFRESH_S  # how often the views poll the aggregate (+/-)
        self.reason_order = "count"  # how the views order the exit reasons (o)
        self.start_pids = [pid] if isinstance(pid, int) else list(pid or [])
        self.start_argv = argv
        self.start_demo_now = demo
        self.record_path = record_path
        self.session: TraceSession | None = None
        self.demo_pidfds: list[int] = []  # every demo guest started: all are stopped at quit
        self.demo_pids: set[int] = set()
        self.left_running: tuple[int, tuple[str, ...]] | None = None  # a launched command, at quit
        self._attempt: Future[Attached] | None = None  # the attach/launch begun last
        self.replay = Replay(replay) if replay else None  # RecordingError before the TUI opens
        self._truncation_told = False
        self.held = HeldStats()  # VMs whose KVM stats fds are held (kernel view, exit rates)
        self._taking: set[int] = set()  # pids whose stats fds are being taken
        self.child_stderr: str | None = None  # launched commands' stderr, to show if they fail
        self._command_pid: int | None = None
        self.exit_message: str | None = None  # for stderr, once the screen is gone
        self.output_error: KvmtopError | None = None  # a recording that could not be written
        # the traced VM's aggregate, its total and IO exits at the held counters' last samples
        self._traced_at: dict[int, ExitStats] = {}  # the counters' moments, and whose counts

    @property
    def attached_pid(self) -> int | None:
        s = self.session
        return s.pid if s is not None and s.state is SessionState.ATTACHED else None

    @property
    def traced_pids(self) -> tuple[int, ...]:
        """Every process of the session with a vCPU, and those attached to."""
        s = self.session
        if s is None or s.state is not SessionState.ATTACHED:
            return ()
        with_vcpus = s.stats.vcpu_pids()
        return tuple(dict.fromkeys([*s.pids, *with_vcpus]))

    def on_mount(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGHUP):  # a kill, the terminal closed: quit cleanly
            loop.add_signal_handler(signum, self.exit, 128 + signum)
        if self.replay is not None:
            self.push_screen(AttachedScreen(self.replay))
            self.set_interval(REFRESH_S, self._tell_truncation)
            return
        self.push_screen(ProcessListScreen(self.process_lister, lambda: self.traced_pids,
                                           self.held.exit_rate, self.others))  # fmt: skip
        self.set_interval(KERNEL_REFRESH_S, self._sample_held)
        if self.start_pids:
            self.attach(*self.start_pids)
        elif self.start_all:
            self._watch(lambda s: s.attach())
        elif self.start_argv:
            argv = self.start_argv
            self._watch(lambda s: s.launch(argv))
        elif self.start_demo_now:
            self.start_demo()
        if self._attempt is not None and (self.start_argv or self.start_demo_now):
            self._attempt.add_done_callback(self._note_command)
        self.set_interval(REFRESH_S, self._take_notices)

    def on_resize(self, event: events.Resize) -> None:
        small = too_small(event.size.width, event.size.height)
        shown = isinstance(self.screen, TooSmallScreen)
        if small and not shown:
            self.push_screen(TooSmallScreen())
        elif shown and not small:
            self.pop_screen()

    # --- the session ---------------------------------------------------------------------------

    def _session(self) -> TraceSession:
        if self.session is None:
            if self.child_stderr is None:
                fd, self.child_stderr = tempfile.mkstemp(prefix="kvmtop-stderr-")
                os.close(fd)
            self.session = TraceSession(record_path=self.record_path, child_stdio=os.devnull,
                                        child_stderr=self.child_stderr, rip=self.rip)  # fmt: skip
        return self.session

    def _watch(self, begin: Callable[[TraceSession], Future[Attached]]) -> None:
        """Begin an attach or launch (the tracer thread does it) and show the attached view."""
        session = self._session()
        if session.state in (SessionState.ATTACHED, SessionState.ATTACHING):
            self.notify(f"already tracing pid {session.pid}: detach first (d)", severity="warning")
            return
        self._attempt = begin(session)
        # the keys typed meanwhile act on the view once attached (`d` detaches), or on the list
        self.hold_keys(lambda: session.state is not SessionState.ATTACHING)
        self.push_screen(AttachedScreen(LiveSource(session), self.kernel_rates, self.watch_vm))

    def attach(self, pid: int, *more: int) -> None:
        session = self.session
        if session is not None and pid in session.pids and session.state is SessionState.ATTACHED:
            if not isinstance(self.screen, AttachedScreen):
                self.push_screen(
                    AttachedScreen(LiveSource(session), self.kernel_rates, self.watch_vm)
                )
            return
        self._watch(lambda s: s.attach(pid, *more))

    def start_demo(self) -> None:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            self.notify(
                "the demo needs /dev/kvm, which is missing or not accessible", severity="error"
            )
            return
        self._watch(lambda s: s.launch(demo_command()))
        if self._attempt is not None:
            self._attempt.add_done_callback(self._hold_demo)

    def _hold_demo(self, attempt: Future[Attached]) -> None:
        """Keep a pidfd of each demo guest started (in the tracer thread, as the launch
        succeeds: the guest is alive), to stop it at quit even after a detach and another
        demo, without ever signalling a pid reused by someone else."""
        if attempt.exception() is None:
            self.demo_pids.add(attempt.result().pid)
            self.demo_pidfds.append(os.pidfd_open(attempt.result().pid))

    def detach(self) -> None:
        if self.session is not None and self.session.state is SessionState.ATTACHED:
            self.session.detach()

    def _note_command(self, attempt: Future[Attached]) -> None:
        if attempt.exception() is None:
            self._command_pid = attempt.result().pid

    def _command_failed(self, session: TraceSession) -> str | None:
        """What the command given on the command line said, if it ended without a vCPU."""
        if session.pid != self._command_pid or session.state is not SessionState.ENDED:
            return None
        if session.exit_status is None or session.stats.vcpu_pids() or session.stats.total:
            return None
        self._command_pid = None
        lines = last_lines(self.child_stderr, 8) if self.child_stderr else []
        said = "".join(f"\n  {line}" for line in lines) if lines else " (it said nothing)"
        what = command_text(session.argv, 60)
        return f"kvmtop: {what} {ended_text(session.exit_status)} before making a vCPU{said}"

    def _take_notices(self) -> None:
        session = self.session
        if session is None:
            return
        failed = self._command_failed(session)
        if failed is not None:
            self.exit_message = failed
            self.exit(session.exit_status)
            return
        for severity, message in session.take_notices():
            self.notify(message, severity=severity, timeout=6)  # type: ignore[arg-type]
        if session.state is SessionState.FAILED and self._attempt is not None:
            self._attempt = None  # the notice said why; back to the list
            if isinstance(self.screen, AttachedScreen):
                self.pop_screen()

    def held_keys_released(self) -> None:
        self._take_notices()  # a failed attach's view is gone before the keys held come

    def _tell_truncation(self) -> None:
        """Once the player has read the whole recording: say if it was cut short (as report
        and export do), since the replay then ends at its last whole record."""
        replay = self.replay
        if replay is not None and replay.truncated and not self._truncation_told:
            self._truncation_told = True
            self.notify(f"{replay.path} is truncated (no end marker): it plays up to its last "
                        "whole record", severity="warning", timeout=10)  # fmt: skip

    def _from_the_list(self) -> bool:
        """A request from the process list that is still on show: Enter or `m` typed fast is
        routed several times before the first one's view opens; the view answered it already."""
        return isinstance(self.screen, ProcessListScreen)

    def on_attach_requested(self, request: AttachRequested) -> None:
        if self._from_the_list():
            self.attach(request.pid)

    def _sample_held(self) -> None:
        """Sample the held VMs' counters, and note the traced exits at the same moment: the
        exit rates KVM counts and the VMM sees are then over the same interval."""
        self.held.tick()
        pid, session = self.attached_pid, self.session
        samples = self.held.samples(pid) if pid is not None else None
        if samples is None or session is None:
            self._traced_at.clear()
            return
        stats = session.stats
        if samples[1].t_ns not in self._traced_at:  # counted by exit time up to the moment
            stats.note_moment(samples[1].t_ns)
            self._traced_at[samples[1].t_ns] = stats
        while len(self._traced_at) > 2:
            del self._traced_at[next(iter(self._traced_at))]

    def kernel_rates(self) -> tuple[float, float | None] | None:
        """KVM's own exits/s of the traced VM, if its counters are held, and the exits/s the
        VMM saw (the traced ones) over the same interval, once known."""
        pid = self.attached_pid
        kernel = self.held.exit_rate(pid) if pid is not None else None
        if kernel is None:
            return None
        return kernel, self._traced_rate(1)

    def traced_io_rate(self) -> float | None:
        """The IO exits/s the VMM saw over the held counters' last interval, once known."""
        return self._traced_rate(2)

    def _traced_rate(self, column: int) -> float | None:
        pid = self.attached_pid
        samples = self.held.samples(pid) if pid is not None else None
        if samples is None:
            return None
        stats = [self._traced_at.get(sample.t_ns) for sample in samples]
        if stats[0] is None or stats[0] is not stats[1]:  # not one attach's counts
            return None
        before, now = (stats[0].exits_until(sample.t_ns) for sample in samples)
        if before is None or now is None:
            return None
        seconds = max(1e-9, (samples[1].t_ns - samples[0].t_ns) / 1e9)
        return (now[column - 1] - before[column - 1]) / seconds

    def on_kernel_requested(self, request: KernelRequested) -> None:
        session, pid = self.session, request.pid
        if pid in self._taking:
            return
        if isinstance(self.screen, KernelScreen):
            self.pop_screen()
            return
        if self.held.get(pid) is not None:  # held already: no attach, no injection
            self._show_kernel(pid)
            return
        via = None
        if session is not None and session.pid == pid and session.state is SessionState.ATTACHED:
            via = session.stats_fds()  # made by the tracer already attached
        else:
            self.notify(f"taking KVM's counters of pid {pid} (a brief attach)...", timeout=2)
        self._taking.add(pid)
        self.hold_keys(lambda: pid not in self._taking)  # `z` typed meanwhile acts on the view
        self._take_kernel(pid, via)

    def _show_kernel(self, pid: int) -> None:
        self._taking.discard(pid)
        if not isinstance(self.screen, KernelScreen):
            traced = self.attached_pid == pid
            io_rate = self.traced_io_rate if traced else lambda: None
            self.push_screen(KernelScreen(self.held, pid, traced, io_rate))

    @work(thread=True, group="kernel")
    def _take_kernel(self, pid: int, via: Future[StatsFds] | None) -> None:
        try:
            self.held.take(pid, via)
        except KvmtopError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error", timeout=6)
            self.call_from_thread(lambda: self._taking.discard(pid))  # (Textual inspects it)
            return
        self.call_from_thread(self._show_kernel, pid)

    def on_watch_requested(self, request: WatchRequested) -> None:
        if not isinstance(self.screen, SampledScreen):  # not `w` typed again before it opened
            self.watch_vm(request.pid)

    def watch_vm(self, pid: int) -> None:
        """`w` in the list or in the traced VM's view: watch it by sampling; if kvmtop traces
        it, once the tracer has detached. (Called by the attached view at once, not through a
        message: the keys typed after `w` then go to the watch view.)"""
        session, after = self.session, None
        if session is not None and pid in session.target_pids and session.state in (
                SessionState.ATTACHED, SessionState.ATTACHING):  # fmt: skip
            session.detach()
            after = session.ended
        if isinstance(self.screen, AttachedScreen) and len(self.screen_stack) > 2:
            self.pop_screen()  # watching replaces tracing
        opener = functools.partial(self.watcher, rip=True) if self.rip else self.watcher
        feed = WatchFeed(pid, after=after, opener=opener)
        self.feeds = [f for f in self.feeds if not f.closed] + [feed]
        self.push_screen(SampledScreen(feed, self.trace_vm))

    def trace_vm(self, pid: int) -> None:
        """`a` in the watch view: exact tracing replaces the watch (at once, as watch_vm)."""
        session = self.session
        if session is not None and session.state in (
                SessionState.ATTACHED, SessionState.ATTACHING) and pid not in session.pids:  # fmt: skip
            self.notify(f"already tracing pid {session.pid}: detach first (d)", severity="warning")
            return
        if isinstance(self.screen, SampledScreen):
            self.pop_screen()  # its watch closes
            self.attach(pid)

    def on_demo_requested(self, _request: DemoRequested) -> None:
        if self._from_the_list():
            self.start_demo()

    def on_detach_requested(self, _request: DetachRequested) -> None:
        self.detach()

    def on_back_requested(self, _request: BackRequested) -> None:
        if isinstance(self.screen, AttachedScreen) and len(self.screen_stack) > 2:
            self.pop_screen()

    # --- help and the command palette ----------------------------------------------------------

    def key_sections(self) -> Sections:
        watch = [b for b in WatchScreen.BINDINGS if b not in REPLAY_BINDINGS]
        return {
            "everywhere": [*self.BINDINGS, Binding("ctrl+p", "", "Command palette: every action")],
            "process list": [
                Binding("up,down", "", "Move", key_display="↑ ↓"),
                *ProcessListScreen.BINDINGS,
            ],
            "attached view": [
                Binding("up,down", "", "Choose a vCPU", key_display="↑ ↓ PgUp PgDn"),
                *[b for b in VcpuTable.BINDINGS if isinstance(b, Binding) and b.show],
                *AttachedScreen.BINDINGS,
                *watch,
            ],
            "vCPU drill-down": [
                Binding("tab", "", "Move between the panes and the exit log (it scrolls)"),
                *[b for b in VcpuScreen.BINDINGS if b not in TYPED_REPLAY_KEYS],
                *watch,
            ],
            "watch view": list(SampledScreen.BINDINGS),
            "kernel view": list(KernelScreen.BINDINGS),
            "replay": list(REPLAY_BINDINGS),
        }

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.key_sections()))

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """Textual's own commands, then every action the screen's keys offer right now."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "Every key of kvmtop (?)", self.action_help)
        seen = set(UNLISTED_ACTIONS)
        for key, active in screen.active_bindings.items():
            binding = active.binding
            if binding.action in seen or not binding.tooltip or not active.enabled:
                continue  # kvmtop's own actions carry a tooltip; cursor keys and the like do not
            seen.add(binding.action)
            run = functools.partial(self.run_action, binding.action, active.node)
            keys = self.get_key_display(binding) or key
            yield SystemCommand(binding.description, f"{binding.tooltip} ({keys})", run)

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> str | None:  # fmt: skip
        """The palette's Screenshot: an SVG in the current directory (Textual's own default,
        ~/Downloads, is often missing on a server), and a notification that names it."""
        try:
            saved = self.save_screenshot(filename, path or os.getcwd(), time_format)
        except OSError as exc:
            self.notify(f"cannot save the screenshot: {exc.strerror or exc}", severity="error")
            return None
        self.notify(f"screenshot saved to {os.path.abspath(saved)}", title="Screenshot")
        return saved

    # --- quitting ------------------------------------------------------------------------------

    async def action_quit(self) -> None:
        self.shutdown()
        self.exit(0)

    def on_unmount(self) -> None:
        self.shutdown()  # however the app ends: never leave a tracer (or the demo) behind
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)

    def shutdown(self) -> None:
        """Detach (the VMM runs on); the demo guests, which kvmtop started, are stopped."""
        session, self.session = self.session, None
        if session is not None:
            session.close()
            self.output_error = self.output_error or session.output_error
            pid = session.pid
            if (session.launched and pid is not None and pid not in self.demo_pids
                    and not session.child_ended.is_set() and running(pid)):  # fmt: skip
                self.left_running = (pid, session.argv)  # an ordinary child: it runs on
        while self.demo_pidfds:
            pidfd = self.demo_pidfds.pop()
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            except (ProcessLookupError, ChildProcessError):
                pass  # it has ended already (and been reaped)
            finally:
                os.close(pidfd)
        while self.feeds:
            self.feeds.pop().close(timeout=2.0)  # every fd a watch took is closed
        if self.replay is not None:
            self.replay.close()
        self.held.close()
        if self.child_stderr is not None:
            try:
                os.unlink(self.child_stderr)
            except FileNotFoundError:
                pass
            self.child_stderr = None


def last_lines(path: str, n: int) -> list[str]:
    """The last ``n`` non-empty lines of a file (its last 8 KiB), as text."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()][-n:]


def run_tui(
    *,
    pids: list[int] | None = None,
    argv: list[str] | None = None,
    replay: str | None = None,
    demo: bool = False,
    record_path: str | None = None,
    refresh_s: float | None = None,
    all_vms: bool = False,
    rip: bool = False,
    guest_symbols: GuestSymbols | None = None,
) -> int:
    """The TUI; returns the exit status. Errors a user can fix are raised before it opens."""
    from kvmtop.host.procfs import check_attachable

    for pid in pids or ():
        check_attachable(pid)
    if argv and shutil.which(argv[0]) is None:
        raise CommandNotFound(f"command not found: {argv[0]}")
    if demo and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise KvmUnavailable("kvmtop demo needs /dev/kvm (KVM), which is missing or not accessible")
    if record_path is not None:
        from kvmtop.formats.recording import check_writable

        check_writable(record_path)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):  # it would draw into a file, blind
        what = "kvmtop demo" if demo else "kvmtop replay" if replay else "the TUI"
        raise NoTerminal(
            f"{what} needs a terminal on stdin and stdout; without one, use "
            "kvmtop record (-p PID or -- CMD), report or stats"
        )
    if all_vms:
        from kvmtop.tracer_thread import choose_engine

        engine, why = choose_engine()
        if engine != "tracepoints":
            raise UsageError(f"-a needs the tracepoint engine: {why}")
    app = KvmtopApp(pid=pids, argv=argv, replay=replay, demo=demo, record_path=record_path,
                    refresh_s=refresh_s, all_vms=all_vms, rip=rip,
                    guest_symbols=guest_symbols)  # fmt: skip
    try:
        result = app.run()
    finally:
        app.shutdown()
        if app.left_running is not None:
            print(f"kvmtop: {left_running_notice(*app.left_running)}", file=sys.stderr)
    if app.exit_message:
        print(app.exit_message, file=sys.stderr)
    failed = app.output_error
    if failed is not None and not result:  # the recording could not be written: tracing stopped
        print(f"kvmtop: {failed}", file=sys.stderr)
        return failed.exit_code
    return int(result or 0)


def running(pid: int) -> bool:
    from kvmtop.host.procfs import status_field

    state = status_field(pid, "State")
    return state is not None and not state.startswith(("Z", "X"))  # not a zombie, not dead


def left_running_notice(pid: int, argv: tuple[str, ...]) -> str:
    what = command_text((os.path.basename(argv[0]), *argv[1:]) if argv else (), 60)
    return (f"pid {pid} ({what}), which kvmtop started, runs on untraced, its "
            f"output to /dev/null; `kill {pid}` stops it")  # fmt: skip
