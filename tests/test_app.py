"""The TUI driven key by key with Textual's Pilot: against real traced guests (the built-in demo,
the counted guest) and against a fixed recording played back."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import subprocess
import time
from collections import Counter

import pytest
from guests.fixed_recording import START, events, write_fixed_recording
from helpers import kvm_fds_of, start_minivmm, valid_regs, vcpu_valid_regs, wait_for_vcpus
from textual.events import Key
from textual.keys import _character_to_key
from textual.widget import Widget

from kvmtop.app import KvmtopApp
from kvmtop.formats.recording import RecordingMeta, RecordingWriter
from kvmtop.host.discovery import KvmProcess
from kvmtop.minivmm.vmm import counted_command, demo_command
from kvmtop.model.events import ExitEvent
from kvmtop.model.messages import ExitBatch
from kvmtop.native import PURE_ENV
from kvmtop.screens.attached import AttachedScreen
from kvmtop.screens.help import HelpScreen
from kvmtop.screens.process_list import ProcessListScreen
from kvmtop.screens.vcpu import VcpuScreen
from kvmtop.sources.session import SessionState, TraceSession
from kvmtop.widgets.exit_log import MAX_NEW_LINES, ExitLog
from kvmtop.widgets.top_targets import TopTargets
from kvmtop.widgets.vcpu_table import VcpuTable

SIZE = (140, 42)
S = 10**9


async def until(pilot, condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await pilot.pause(0.05)


async def promptly(condition, timeout: float = 10.0) -> None:
    """Until a key posted without the pilot has acted (the pilot would wait for idle); the
    timeout only catches a UI that never answers: how fast it answers is a benchmark's."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"a key did not act within {timeout} s")
        await asyncio.sleep(0.001)


async def settle(pilot) -> None:
    """Until the replay shows its clock's position, and the screen has drawn it."""
    assert await asyncio.to_thread(pilot.app.replay.wait_settled, 20)
    await pilot.pause(0.4)


def exits_until(seconds: float) -> int:
    return sum(e.exit_ns <= START + seconds * S for e in events())


async def burst(app, *keys: str) -> None:
    """Keys arriving in one write, as a paste or keys coalesced over SSH do: all queued before
    the app handles the first (pilot.press waits for the app to go idle after each key). Back
    once the app has taken them all (behind them in its queue): from then on
    ``app.keys_pending`` says whether they have all acted."""
    for key in keys:
        if len(key) == 1:  # a character: the key a terminal's keys are parsed to ("space", "I")
            key, char = _character_to_key(key), key
        else:
            char = {"slash": "/", "enter": "\r", "space": " ", "greater_than_sign": ">",
                    "less_than_sign": "<"}.get(key)  # fmt: skip
        app.post_message(Key(key, char))
    taken = asyncio.Event()
    app.call_later(taken.set)
    await asyncio.wait_for(taken.wait(), 30)


async def routed(pilot) -> None:
    """Until every key sent has acted (each waits for the one before it), and been drawn."""
    await until(pilot, lambda: not pilot.app.keys_pending, what="keys routed")
    await pilot.pause(0.1)


def pane_text(screen, widget) -> str:
    return str(screen.query_one(widget).render())


def footer_keys(app) -> set[str]:
    return {key for key, b in app.screen.active_bindings.items() if b.binding.show}


def start_demo(processes) -> subprocess.Popen[bytes]:
    """The demo guest (2 vCPUs), running, outside kvmtop; cleaned up with ``processes``."""
    demo = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    processes.append(demo)
    wait_for_vcpus(demo.pid, 2)
    return demo


async def until_counting(pilot, pid: int, exits: int = 10) -> None:
    """Until the app is attached to ``pid`` and has counted more than ``exits`` of its exits."""
    await until(pilot, lambda: pilot.app.attached_pid == pid, what="attached")
    await until(pilot, lambda: pilot.app.session.stats.total > exits, what="exits counted")


async def list_shows(pilot, pid: int) -> ProcessListScreen:
    """The process list, once it lists ``pid``."""
    screen = pilot.app.screen
    assert isinstance(screen, ProcessListScreen)
    await until(pilot, lambda: any(p.pid == pid for p in screen.procs), what="listed")
    return screen


async def open_listed(pilot, pid: int, key: str) -> None:
    """Once the process list lists ``pid``: filter it to ``pid``, select it and press ``key``."""
    await list_shows(pilot, pid)
    await pilot.press("slash", *str(pid), "enter", key)


@pytest.fixture
def fixed(tmp_path) -> str:
    return write_fixed_recording(str(tmp_path / "fixed.kvmtop"))


# --- replay: a fixed recording ------------------------------------------------------------------


async def test_replay_keys_pause_seek_and_change_speed(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        replay = app.replay
        assert isinstance(app.screen, AttachedScreen)
        assert {"space", "left", "right", "left_square_bracket", "right_square_bracket"} <= (
            footer_keys(app)
        )
        assert "d" not in app.screen.active_bindings  # nothing to detach from
        await pilot.press("space", "home")
        assert replay.paused
        await pilot.press("right", "right")
        await settle(pilot)
        assert replay.now_ns() == START + 20 * S
        assert replay.snapshot().total == exits_until(20)
        assert "paused" in replay.status().state
        await pilot.press("left")  # back: the aggregate is rebuilt from the start
        await settle(pilot)
        assert replay.snapshot().total == exits_until(10)
        await pilot.press("end")
        await settle(pilot)
        assert replay.snapshot().total == 1621 and replay.status().state == "replay ended"
        assert replay.status().length_s == 30.0
        await pilot.press("home")
        await settle(pilot)
        assert replay.snapshot().total == 0
        await pilot.press("right_square_bracket", "right_square_bracket")
        assert replay.speed == 5.0
        await pilot.press("left_square_bracket")
        assert replay.speed == 2.0
        await pilot.press("space")  # play at 2x for a moment
        await pilot.pause(0.6)
        assert not replay.paused and replay.now_ns() > START
        await pilot.press("q")
    assert app.return_value == 0


async def test_replay_to_the_end_shows_the_exact_counts(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("end")
        await settle(pilot)
        snap = app.replay.snapshot(top=None)
        expected = Counter(e.reason for e in events())
        assert snap.total == 1621
        assert {r.label: r.count for r in snap.reasons} == {
            "KVM_EXIT_IO": expected[2], "KVM_EXIT_MMIO": expected[6], "KVM_EXIT_HLT": expected[5],
            "KVM_EXIT_INTR": 1,
        }  # fmt: skip
        table = app.screen.query_one(VcpuTable)
        assert [v.vcpu for v in table.rows] == [0, 1]
        assert sum(v.total for v in table.rows) == 1621
        await pilot.press("q")


async def test_drill_down_shows_one_vcpu_follows_the_replay_and_goes_back(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("space", "home", "right", "right")
        await settle(pilot)
        await pilot.press("down", "enter")
        screen = app.screen
        assert isinstance(screen, VcpuScreen) and screen.vcpu == 1
        await pilot.pause(0.4)
        log = screen.query_one(ExitLog)
        assert log.line_count > 0 and "IO" in log.lines[-1]  # IO or MMIO, decoded
        targets = str(screen.query_one(TopTargets).render())
        assert "COM1" in targets or "PCI" in targets  # well-known ports are named
        await pilot.press("p")  # a replay's view holds still with space: no Freeze to add
        assert not screen.frozen
        lines = log.line_count
        await pilot.press("right")
        await settle(pilot)
        assert log.line_count > lines
        await pilot.press("home")  # back in time: the log starts over
        await settle(pilot)
        assert log.line_count == 0
        await pilot.press("end")
        await settle(pilot)
        assert 0 < log.line_count <= 2000
        await pilot.press("tab", "tab")
        await pilot.press("escape")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("q")


async def test_help_lists_every_key_and_closes(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = app.screen.text
        sections = app.key_sections()
        assert set(sections) == {"everywhere", "process list", "attached view",
                                 "vCPU drill-down", "watch view", "kernel view", "replay"}  # fmt: skip
        for bindings in sections.values():
            for b in bindings:
                assert (b.tooltip or b.description) in text, b
        for needle in ("Attach to the selected VMM", "Start the built-in demo", "Detach",
                       "Freeze", "Seek 10 s back", "Play faster", "drill-down", "Quit",
                       "KVM's own counters", "Reset the counts", "Refresh the view less often",
                       "Watch the selected VM by sampling", "Trace this VM instead",
                       "Detach and watch the VMM by sampling"):  # fmt: skip
            assert needle in text, needle
        assert "escape" not in text and " k esc " in text  # Esc spelt one way everywhere
        await pilot.press("escape")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("question_mark", "question_mark")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("f1")  # htop's and kvm_stat's help keys too
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("h")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("ctrl+c")  # quits, as in htop and perf top
    assert app.return_value == 0


def shown_lines(widget: Widget) -> list[str]:
    """The lines of ``widget`` as drawn at its size."""
    from textual.geometry import Region

    width, height = widget.size
    return [strip.text for strip in widget.render_lines(Region(0, 0, width, height))]


async def test_help_at_80_columns_wraps_beside_its_terms_and_end_shows_its_last_line(fixed):
    from textual.containers import VerticalScroll
    from textual.widgets import Static

    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark", "end")
        await pilot.pause(0.3)
        scroll = app.screen.query_one(VerticalScroll)
        assert scroll.scroll_y == scroll.max_scroll_y > 0
        lines = shown_lines(app.screen.query_one(Static))
        assert "is stopped" in lines[-1]  # the help's last line, at the end
        glossary = lines[next(i for i, line in enumerate(lines) if "exits/s    exits in" in line) :]
        assert all(line.startswith((" " * 12, " ")) for line in glossary)
        assert all(line[:12].strip() == "" or line[1] != " " for line in glossary)
        await pilot.press("q")  # quits here too
    assert app.return_value == 0


async def test_at_80x24_the_list_shows_every_column_and_the_status_line_its_vcpus(fixed):
    from helpers import fixed_processes

    from kvmtop.widgets.status_line import StatusLine

    long = KvmProcess(6060, "bob", "x" * 40, ("qemu",), 2, (0, 1), 40.0, 64 << 20,
                      time.time() - 60, 0)  # fmt: skip
    app = KvmtopApp(process_lister=lambda: [*fixed_processes(), long])
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.screen.listed, what="listed")
        await pilot.pause(0.3)
        table = app.screen.query_one("#procs")
        assert shown_lines(table)[0].rstrip().endswith("TRACED BY  KVM EXITS/S")
        assert "x" * 6 + "…" in shown_lines(table)[3]  # the long name cut, with …
        await pilot.press("q")
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("end")
        await settle(pilot)
        assert "vCPUs 2" in shown_lines(app.screen.query_one(StatusLine))[0]
        await pilot.press("q")


def test_a_narrow_status_line_leaves_out_whole_fields_and_cuts_only_the_file_name():
    from rich.text import Text

    from kvmtop.widgets.status_line import NAME_SHOWN, fitted

    fields = [Text(" attached "), Text("   exits 1.2M"), Text("   lost 0"), Text("   no stops")]
    assert fitted(fields, 31, cut_last=False).plain == " attached    exits 1.2M"
    assert fitted(fields, 32, cut_last=False).plain == " attached    exits 1.2M   lost 0"
    assert fitted(fields, 42, cut_last=False).plain == " attached    exits 1.2M   lost 0"
    assert fitted(fields, 43, cut_last=False).plain.endswith("lost 0   no stops")
    assert fitted(fields, 0, cut_last=False).plain.endswith("no stops")  # not laid out yet
    named = [*fields[:3], Text("   recording to /tmp/" + "r" * 40 + ".kvmtop")]
    shown = fitted(named, 32 + NAME_SHOWN, cut_last=True).plain
    assert shown.startswith(" attached    exits 1.2M   lost 0   recording") and shown.endswith("…")
    assert len(shown) == 32 + NAME_SHOWN
    assert fitted(named, 32 + NAME_SHOWN - 1, cut_last=True).plain.endswith("lost 0")


async def test_command_palette_lists_the_screens_actions_and_runs_them(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        titles = {c.title for c in app.get_system_commands(app.screen)}
        expected = {"Help", "Pause", "-10s", "+10s", "Slower", "Faster", "Open vCPU",
                    "Slower refresh", "Faster refresh"}  # fmt: skip
        assert expected <= titles
        assert not {"Detach", "Freeze", "Reset"} & titles  # live only
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"Pause")
        await pilot.pause(0.4)
        await pilot.press("enter")
        await until(pilot, lambda: app.replay.paused, timeout=5, what="paused from the palette")
        await pilot.press("q")


def write_many_vcpus(path: str, vcpus: int = 64) -> str:
    start = 10**12
    meta = RecordingMeta(pid=1, argv=("big-vm",), launched=False, start_ns=start,
                         start_wall=1.7e9, with_data=False)  # fmt: skip
    writer = RecordingWriter.create(path, meta, False)
    evs = tuple(
        ExitEvent(v, 2 if i % 3 else 6, 0, t, t + 5000, 0x80, 257, 1)
        for i in range(300)
        for v in range(vcpus)
        for t in [start + i * 10**7 + v]
    )
    writer.write_batch(ExitBatch.of(evs, start))
    writer.close()
    return path


async def test_64_vcpus_fit_scroll_and_open(tmp_path):
    app = KvmtopApp(replay=write_many_vcpus(str(tmp_path / "big.kvmtop")))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("end")
        await settle(pilot)
        table = app.screen.query_one(VcpuTable)
        assert len(table.rows) == 64
        assert table.size.height < SIZE[1]  # the table scrolls inside the screen...
        assert app.screen.query_one("LatencyPane").region.height > 0  # ...and the panes show
        await pilot.press(*["pagedown"] * 7, "down")
        assert table.selected_vcpu == 63
        assert table.scroll_offset.y > 0  # scrolled to keep the cursor in view
        await pilot.press("pageup", "up")
        assert table.selected_vcpu == 52
        await pilot.press("enter")
        assert isinstance(app.screen, VcpuScreen) and app.screen.vcpu == 52
        await pilot.press("escape", "q")


def write_long_recording(path: str, vcpus: int = 16, seconds: int = 60, per_s: int = 250) -> int:
    start = 10**12
    meta = RecordingMeta(pid=1, argv=("long-vm",), launched=False, start_ns=start,
                         start_wall=1.7e9, with_data=False)  # fmt: skip
    writer = RecordingWriter.create(path, meta, False)
    for second in range(seconds):
        writer.write_batch(ExitBatch.of((
            ExitEvent(v, (2, 6, 5)[(i + v) % 3], 0, t, t + 20_000, 0x3F8, 257, 1)
            for i in range(per_s)
            for v in range(vcpus)
            for t in [start + second * S + i * (S // per_s) + v]
        ), start))  # fmt: skip
    writer.close()
    return vcpus * seconds * per_s


async def test_seeking_a_long_recording_never_blocks_the_keys(tmp_path, monkeypatch):
    monkeypatch.setenv(PURE_ENV, "1")  # the C aggregate seeks 240k exits too fast to press keys
    total = write_long_recording(str(tmp_path / "long.kvmtop"))
    app = KvmtopApp(replay=str(tmp_path / "long.kvmtop"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("space")
        app.post_message(Key("end", None))  # (pilot.press would wait for the seek to end)
        await until(pilot, lambda: app.replay.status().busy, timeout=5, what="seeking")
        seen_busy = False
        answered_mid_seek = 0  # keys whose action ran while the seek still went on
        while not app.replay.settled:  # the player thread reads; the UI answers meanwhile
            seen_busy |= app.replay.status().busy
            before = app.refresh_s
            app.post_message(Key("plus", "+") if before == 0.25 else Key("minus", "-"))
            await promptly(lambda before=before: app.refresh_s != before)
            answered_mid_seek += not app.replay.settled
            await asyncio.sleep(0.02)
        # how fast a key answers is benchmarks/bench_tui.py's to measure; here: it does, at once
        assert seen_busy and answered_mid_seek >= 3
        assert app.replay.snapshot().total == total
        await pilot.press("q")


async def test_an_empty_machine_says_so_and_offers_the_demo():
    app = KvmtopApp(process_lister=list)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        text = str(app.screen.query_one("#empty").render())
        assert "No KVM process found" in text and "built-in demo" in text
        assert "m" in footer_keys(app)
        await pilot.press("q")


async def test_with_no_vmm_of_ones_own_the_list_names_other_users_vmms():
    app = KvmtopApp(process_lister=list, others=lambda: {"root": [4242, 5151]})
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "other users" in str(app.screen.query_one("#empty").render()),
                    what="the others named")  # fmt: skip
        text = str(app.screen.query_one("#empty").render())
        assert text.startswith(
            "No KVM process of yours: other users' VMMs run here (root: pid "
            "4242, 5151), which only their user or root may list and trace."
        )
        await pilot.press("q")


async def test_a_failed_attach_is_a_notification_and_the_app_stays_up(processes):
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    app = KvmtopApp(process_lister=list)
    async with app.run_test(size=SIZE) as pilot:
        why = f"pid {sleeper.pid} (sleep) is not a KVM process"
        for attempt in (1, 2):  # and again: still a notification, still up
            app.attach(sleeper.pid)
            await pilot.pause(0.05)
            await until(
                pilot,
                lambda n=attempt: (
                    isinstance(app.screen, ProcessListScreen)
                    and sum(why in m.message for m in app._notifications) == n
                ),
                what=f"notification {attempt}, back on the list",
            )
        await pilot.press("q")
    assert sleeper.poll() is None


async def test_keys_typed_in_one_burst_after_slash_all_go_to_the_filter():
    from helpers import fixed_processes

    app = KvmtopApp(process_lister=fixed_processes)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await until(pilot, lambda: screen.listed, what="listed")
        for typed in ("qemu", "sss", "demo", "kmad?"):  # each letter also a key of the list
            await burst(app, "slash", *typed)
            await routed(pilot)
            assert app.is_running and app.screen is screen and app.session is None
            assert screen.filter.text == typed and screen.sort_key == "PID"
            await pilot.press("escape")
            assert screen.filter.text == ""
        await burst(app, "slash", *"qx", "backspace", *"emu")
        await routed(pilot)
        assert screen.filter.text == "qemu"
        await burst(app, "escape", "s")  # Esc closes the filter: `s` sorts again
        await routed(pilot)
        assert screen.filter.text == "" and screen.sort_key == "USER"
        await burst(app, "slash", *"web", "enter", "s")  # Enter keeps the filter: `s` sorts again
        await routed(pilot)
        assert screen.filter.text == "web" and screen.sort_key == "COMMAND"
        await pilot.press("q")
    assert app.return_value == 0


async def test_the_list_filter_anchors_to_each_field_and_says_when_it_is_no_regex():
    from helpers import fixed_processes

    app = KvmtopApp(process_lister=fixed_processes)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await until(pilot, lambda: screen.listed, what="listed")
        for typed, pids in (("^42", [4242]), ("42$", [4242]), ("^4242$", [4242]),
                            ("^web-1$", [4242]), ("^alice$", [5151]), ("^(root|alice)$", [4242, 5151]),
                            ("sock /tmp/fc$", [5151]), ("^fc$", [])):  # fmt: skip
            await burst(app, "slash", *typed, "enter")
            await routed(pilot)
            assert screen.filter.text == typed and listed_order(screen) == pids, typed
            await pilot.press("escape")
        await burst(app, "slash", *"[(")
        await routed(pilot)
        assert listed_order(screen) == []
        empty = str(screen.query_one("#empty").render())
        assert empty.startswith("'[(' is not a regex (") and "matches no KVM process" in empty
        assert "not a regex" in str(screen.query_one("#filter").render())
        await pilot.press("backspace")  # `[` alone is no regex either: matched as text
        assert "not a regex" in str(screen.query_one("#filter").render())
        await pilot.press("escape", "q")


def three_processes():
    from helpers import fixed_processes

    demo = KvmProcess(6060, "bob", "kvmtop-demo", ("python", "-m", "kvmtop.minivmm", "demo"), 2,
                      (0, 1), 40.0, 64 << 20, time.time() - 60, 0)  # fmt: skip
    return [*fixed_processes(), demo]


def listed_order(screen) -> list[int]:
    return [int(row.key.value) for row in screen.query_one("#procs").ordered_rows]


def sorted_header(screen) -> str:
    labels = [str(c.label) for c in screen.query_one("#procs").columns.values()]
    return next(label for label in labels if label[-1] in "▲▼")


async def test_process_list_sorts_by_any_column_either_way_by_key_or_header_click():
    rates = {4242: 100.0, 6060: 5000.0}  # KVM's exits/s; 5151's counters are not held
    app = KvmtopApp(process_lister=three_processes)
    app.held.exit_rate = rates.get  # type: ignore[method-assign]
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        await until(pilot, lambda: screen.listed, what="listed")
        assert listed_order(screen) == [4242, 5151, 6060] and sorted_header(screen) == "PID▲"
        await burst(app, *["greater_than_sign"] * 8)  # htop's `>`, in one burst: to KVM EXITS/S
        await routed(pilot)
        assert sorted_header(screen) == "KVM EXITS/S▼"
        assert listed_order(screen) == [6060, 4242, 5151]  # the busiest first, unknown last
        await burst(app, "I")  # htop's invert
        await routed(pilot)
        assert (
            listed_order(screen) == [5151, 4242, 6060] and sorted_header(screen) == "KVM EXITS/S▲"
        )
        await burst(app, "less_than_sign")  # a new column: its own natural order again
        await routed(pilot)
        assert sorted_header(screen) == "TRACED BY▲"
        assert listed_order(screen) == [4242, 6060, 5151]  # untraced first, ties by pid
        table = screen.query_one("#procs")
        x = sum(c.get_render_width(table) for c in list(table.columns.values())[:4])
        await pilot.click("#procs", offset=(x + 1, 0))  # the CPU% header
        await pilot.pause(0.3)
        assert sorted_header(screen) == "CPU%▼" and listed_order(screen) == [6060, 4242, 5151]
        await pilot.click("#procs", offset=(x + 1, 0))  # again: the other way
        await pilot.pause(0.3)
        assert sorted_header(screen) == "CPU%▲" and listed_order(screen) == [5151, 4242, 6060]
        await pilot.press("s")  # the next column
        assert sorted_header(screen) == "RSS▼" and listed_order(screen) == [4242, 5151, 6060]
        await pilot.press("end")
        assert screen.selected_pid == 6060
        await pilot.press("home")
        assert screen.selected_pid == 4242
        assert "sorted by RSS ▼" in str(screen.query_one("#title").render())
        await pilot.press("q")


async def test_o_orders_the_exit_reasons_by_count_rate_or_latency_on_both_views(fixed):
    from kvmtop.widgets.latency_pane import LatencyPane
    from kvmtop.widgets.reason_bars import ReasonBars

    def shown(screen) -> list:
        bars = screen.query_one(ReasonBars)
        reasons = bars._shown[0]
        names = [line.split()[0] for line in str(bars.render()).splitlines()]
        assert names == [palette.short(r.label) for r in reasons]  # as drawn, top to bottom
        assert screen.query_one(LatencyPane)._shown[0] == reasons  # the latencies follow
        return list(reasons)

    from kvmtop.widgets import palette

    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("end")
        await settle(pilot)
        screen = app.screen
        by_count = shown(screen)
        assert [r.count for r in by_count] == sorted((r.count for r in by_count), reverse=True)
        assert by_count[0].label == "KVM_EXIT_IO" and by_count[1].label == "KVM_EXIT_MMIO"
        await pilot.press("o")
        await pilot.pause(0.3)
        by_rate = shown(screen)
        assert [r.rate for r in by_rate] == sorted((r.rate for r in by_rate), reverse=True)
        assert by_rate[-1].label == "KVM_EXIT_MMIO"  # none in the last second
        assert screen.query_one(ReasonBars).border_title.endswith(", by rate")
        await pilot.press("o")
        await pilot.pause(0.3)
        by_latency = shown(screen)
        medians = [r.handling.median for r in by_latency]
        assert medians == sorted(medians, reverse=True) and by_latency != by_count
        await pilot.press("enter")  # the drill-down keeps the order
        assert isinstance(app.screen, VcpuScreen)
        await pilot.pause(0.4)
        assert app.screen.query_one(ReasonBars).border_title.endswith(", by VMM p50")
        medians = [r.handling.median for r in shown(app.screen)]
        assert medians == sorted(medians, reverse=True)
        await pilot.press("o")  # the most VMM time in all first
        await pilot.pause(0.3)
        totals = [r.handling.total_ns for r in shown(app.screen)]
        assert totals == sorted(totals, reverse=True)
        assert app.screen.query_one(ReasonBars).border_title.endswith(", by VMM total")
        await pilot.press("o")  # and round to by count
        await pilot.pause(0.3)
        counts = [r.count for r in shown(app.screen)]
        assert counts == sorted(counts, reverse=True)
        await pilot.press("q")


async def test_the_drill_downs_timelines_follow_o_and_say_the_seconds_shown(fixed):
    from kvmtop.widgets.reason_bars import ReasonBars
    from kvmtop.widgets.reason_timelines import ReasonTimelines

    def names(screen, widget) -> list[str]:
        return [line.split()[0] for line in pane_text(screen, widget).splitlines()]

    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("end")
        await settle(pilot)
        await pilot.press("down", "enter")
        await pilot.pause(0.4)
        screen = app.screen
        timelines = screen.query_one(ReasonTimelines)
        seconds = int(re.search(r"last (\d+) s$", timelines.border_title)[1])
        assert 15 < seconds < 60  # 80 columns: not all 60 s
        assert all(len(line) <= 78 for line in pane_text(screen, ReasonTimelines).splitlines())
        for _ in ("rate", "VMM p50", "VMM total", "count"):
            await pilot.press("o")
            await pilot.pause(0.3)
            assert names(screen, ReasonTimelines) == names(screen, ReasonBars)
        await pilot.press("q")


def write_two_stop_recording(path: str) -> str:
    """One vCPU, IO to one port and MMIO to one address, each exit's handling held by 2 of
    kvmtop's stops (as two-stop tracing records it): guest, VMM and net times."""
    start = 10**12
    meta = RecordingMeta(pid=1, argv=("vm",), launched=False, start_ns=start, start_wall=1.7e9,
                         with_data=False)  # fmt: skip
    writer = RecordingWriter.create(path, meta, False)
    evs = tuple(
        ExitEvent(0, 2 if i % 2 else 6, 0, t, t + 5000, 0x80 if i % 2 else 0xD0000, 257, 1,
                  held_stops=2, held_seen_ns=2000)
        for i in range(400)
        for t in [start + i * 10**7]
    )  # fmt: skip
    writer.write_batch(ExitBatch.of(evs, start))
    writer.close()
    return path


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_the_drill_downs_latencies_keep_every_time_a_reason_where_there_is_room(
    tmp_path, size
):
    """At 160x48 each reason has its guest, VMM and net lines with min, max and a histogram
    (two reasons, the IO and MMIO panes beside them short); at 80x24 too, as the lines allow,
    else one line a reason that keeps the VMM's median (`o` orders by it)."""
    from kvmtop.widgets.latency_pane import LatencyPane

    app = KvmtopApp(replay=write_two_stop_recording(str(tmp_path / "net.kvmtop")))
    async with app.run_test(size=size) as pilot:
        await pilot.press("end")
        await settle(pilot)
        await pilot.press("enter")
        await pilot.pause(0.4)
        screen = app.screen
        assert isinstance(screen, VcpuScreen)
        pane = screen.query_one(LatencyPane)
        reasons = pane._shown[0]
        assert len(reasons) == 2 and all(r.handling_net.count for r in reasons)
        lines = pane_text(screen, LatencyPane).splitlines()
        if size == (160, 48) or lines[0].split()[1] == "p50":  # a line per time, as room allows
            kinds = [line.split()[1 if line[0] != " " else 0] for line in lines[1:]]
            assert kinds == ["g", "v", "n"] * len(reasons)
        else:  # a line a reason
            assert lines[0].split() == ["exit", "g", "p50", "g", "p99", "v", "p50", "n", "p50"]
            assert len(lines) == 1 + len(reasons)
        if size == (160, 48):
            assert lines[0].split()[:5] == ["exit", "min", "p50", "p99", "max"]
            assert pane.border_title.endswith("log2 histogram")
        await pilot.press("q")


def exit_lines(log: ExitLog) -> list[str]:
    return [line for line in log.lines if not line.startswith("   ...")]  # not the notices


def log_rows(log: ExitLog) -> list[str]:
    """The exit log's rows as it draws them, inside its border."""
    return [log.render_line(y).text.rstrip() for y in range(log.scrollable_content_region.height)]


def columns(row: str) -> list[tuple[int, int]]:
    """Where each column's text starts and ends in a row of the exit log (2 spaces apart)."""
    return [m.span() for m in re.finditer(r"\S+(?: \S+)*", row)]


def column_names(row: str) -> list[str]:
    return [row[start:end] for start, end in columns(row)]


def assert_under_their_names(rows: list[str]) -> None:
    """Below the header, each exit's times end where their column's name ends, and its
    decoded exit starts where EXIT does."""
    names = columns(rows[0])
    for row in rows[1:]:
        spans = columns(row)
        assert len(spans) == len(names), (rows[0], row)
        assert [end for _, end in spans[:-1]] == [end for _, end in names[:-1]], (rows[0], row)
        assert spans[-1][0] == names[-1][0], (rows[0], row)


async def test_slash_filters_the_exit_log_with_keys_in_one_burst_and_esc_clears_it(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("end")
        await settle(pilot)
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, VcpuScreen) and screen.vcpu == 0
        await pilot.pause(0.4)
        log = screen.query_one(ExitLog)
        every = list(log.lines)
        assert any("HLT" in line for line in every) and any("0xcfc" in line for line in every)
        paused = app.replay.paused
        await burst(app, "slash", *"hlt|0x3f8")  # `h` is help, `|` and `0` are keys elsewhere
        await routed(pilot)
        assert app.screen is screen and screen.filter.text == "hlt|0x3f8"
        shown = exit_lines(log)
        assert shown and all(re.search("HLT|0x3f8", line) for line in shown)
        assert {line for line in every if "HLT" in line} <= set(shown)  # none left out
        await burst(app, "escape", "slash", *"in port", "enter")  # space pauses a replay, not here
        await routed(pilot)
        assert app.replay.paused == paused and screen.filter.text == "in port"
        assert exit_lines(log) and all("IO in port=0xcfc" in line for line in exit_lines(log))
        assert "matching in port" in str(log.border_title)
        await pilot.press("space")  # the filter kept, the keys are the replay's again
        assert app.replay.paused != paused
        await pilot.press("space")
        await pilot.press("escape")  # clears the filter: every exit again
        await pilot.pause(0.3)
        assert app.screen is screen and log.lines == every
        await pilot.press("escape")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("q")


async def test_a_filter_matching_nothing_says_once_that_exits_were_missed():
    """A vCPU exiting faster than its ring is read: each refresh has missed some. With a filter
    that matches none of them, the log says so once, not once per refresh."""
    from textual.app import App

    class One(App):
        def compose(self):
            yield ExitLog()

    def ring(first: int) -> tuple[ExitEvent, ...]:  # 100 IO exits, none of the last ring's
        return tuple(ExitEvent(0, 2, 0, START + i * 1000, START + i * 1000 + 500, 0x80, 1)
                     for i in range(first, first + 100))  # fmt: skip

    app = One()
    async with app.run_test(size=SIZE) as pilot:
        log = app.query_one(ExitLog)
        log.filter(re.compile("HLT"))
        for refresh in range(5):
            log.show(ring(refresh * 1000), START)
            await pilot.pause()
        assert list(log.lines) == [
            "   ... more exits came meanwhile than the ring holds; some are not shown"
        ]
        log.filter(None)  # every exit: the log starts over from the last ring
        log.show(ring(5000), START)
        await pilot.pause()
        gaps = [line for line in log.lines if line.startswith("   ... more exits")]
        assert len(gaps) == 1 and len(exit_lines(log)) == 200


async def test_t_gives_the_exit_log_the_time_of_day_of_each_exit_and_back(fixed):
    """The fixed recording started at Unix time 1,760,000,000.0: its exits' times of day follow
    from that, here in local time; t again gives the seconds since tracing began."""
    from datetime import datetime

    from guests.fixed_recording import START as FIXED_START
    from guests.fixed_recording import events as fixed_events

    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("end")
        await settle(pilot)
        await pilot.press("enter")
        await pilot.pause(0.4)
        log = app.screen.query_one(ExitLog)
        relative = exit_lines(log)
        assert relative and "seconds since tracing began" in str(log.border_title)
        await pilot.press("t")
        await pilot.pause(0.3)
        assert "time of day" in str(log.border_title).split("(")[0]
        clock = exit_lines(log)
        assert len(clock) == len(relative)
        last = [e for e in fixed_events() if e.vcpu == 0][-1]
        at = datetime.fromtimestamp(1_760_000_000.0 + (last.exit_ns - FIXED_START) / 1e9)
        assert clock[-1].startswith(at.strftime("%H:%M:%S.%f") + "  ")
        assert [c.split("  ", 1)[1] for c in clock] == [r.split("s  ", 1)[1] for r in relative]
        await pilot.press("t")
        await pilot.pause(0.3)
        assert exit_lines(log) == relative
        await pilot.press("q")


def _record(path, *args: str) -> None:
    import sys

    argv = [sys.executable, "-m", "kvmtop", "record", "-o", str(path), *args, "--",
            *counted_command(outs=150, mmio_writes=100)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


async def _drill_down_log_at_the_end(path) -> list[str]:
    app = KvmtopApp(replay=str(path))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("end")
        await settle(pilot)
        await pilot.press("enter")
        assert isinstance(app.screen, VcpuScreen) and app.screen.vcpu == 0
        log = app.screen.query_one(ExitLog)
        await until(pilot, lambda: log.line_count > 0, what="the exit log")
        await pilot.pause(0.2)
        lines, rows = list(log.lines), log_rows(log)
        await pilot.press("q")
    return lines, rows


@pytest.mark.kvm
async def test_the_exit_log_gives_each_exits_vmm_time_up_to_the_vcpus_next_entry(tmp_path):
    """Two stops per exit: each line's VMM time is the vCPU's next entry minus its exit, as
    recorded; the last exit's is not known (no next entry), and says so."""
    from kvmtop.decoder import describe_exit
    from kvmtop.formats.recording import open_recording
    from kvmtop.units import duration

    path = tmp_path / "two-stop.kvmtop"
    _record(path, "--no-seccomp")
    exits = [e for b in open_recording(str(path)).batches() for e in b.events if e.vcpu == 0]
    assert len(exits) == 251  # 150 outs, 100 MMIO writes, the debug-exit `out`
    lines, rows = await _drill_down_log_at_the_end(path)
    assert len(lines) == len(exits)
    for line, e, after in zip(lines, exits, [*exits[1:], None], strict=True):
        vmm = duration(after.entry_ns - e.exit_ns) if after else "…"
        assert line.split()[1:3] == [duration(e.guest_ns), vmm], line
        assert line.endswith(f"  {describe_exit(e)}")
    assert column_names(rows[0]) == ["SINCE START", "GUEST", "VMM", "EXIT"]
    assert_under_their_names(rows)


@pytest.mark.kvm
async def test_the_live_exit_log_completes_each_lines_vmm_time_at_the_next_exit(processes):
    """Live, the newest line waits for the vCPU's next exit ("…"); once that is in, the line
    gets its VMM time, the same as the aggregate's ring of the vCPU's latest exits gives."""
    from kvmtop.units import duration

    demo = start_demo(processes)
    app = KvmtopApp(pid=demo.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until_counting(pilot, demo.pid)
        table = app.screen.query_one(VcpuTable)
        await until(pilot, lambda: len(table.rows) == 2, what="both vCPUs listed")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, VcpuScreen), what="drill-down")
        assert app.screen.vcpu == 0
        log = app.screen.query_one(ExitLog)
        await until(pilot, lambda: log.line_count > 300, what="refreshes of the exit log")
        await pilot.press("p")  # the view holds still while the tracing goes on
        await pilot.pause(0.3)
        lines = exit_lines(log)
        ring = app.screen._shown_vcpu.recent  # what the log was last given
        origin = app.session.stats.snapshot().first_ns
        await pilot.press("p", "q")
    assert "…" in lines[-1] and not any("…" in line for line in lines[:-1])
    by_time = {f"{(e.exit_ns - origin) / 1e9:12.6f}s": i for i, e in enumerate(ring)}
    checked = 0
    for line in lines[:-1]:
        i = by_time.get(line[:13])
        if i is not None and i + 1 < len(ring) and " ? " not in line:
            vmm = duration(ring[i + 1].entry_ns - ring[i].exit_ns)
            assert line.split()[2] == vmm, (line, vmm)
            checked += 1
    assert checked > 100


@pytest.mark.kvm
async def test_the_exit_log_says_guest_and_vmm_times_are_one_span_in_one_stop_mode(tmp_path):
    path = tmp_path / "one-stop.kvmtop"
    _record(path)  # seccomp user notification: exits read at the next entry
    lines, rows = await _drill_down_log_at_the_end(path)
    assert len(lines) == 251
    assert all(re.fullmatch(r" +\d+\.\d{6}s +\d\S*s  (IO|MMIO) .*", line) for line in lines), lines
    assert column_names(rows[0]) == ["SINCE START", "GUEST+VMM", "EXIT"]  # one span a line
    assert_under_their_names(rows)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_the_exit_log_names_its_columns_in_a_row_that_stays_on_top_as_it_scrolls(fixed, size):
    """In seconds since tracing began and in the time of day (t), at the end and scrolled up:
    the top row names the columns, each over its values; the newest exit is not hidden."""
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=size) as pilot:
        await pilot.press("end")
        await settle(pilot)
        await pilot.press("enter")
        log = app.screen.query_one(ExitLog)
        await until(pilot, lambda: log.line_count > 100, what="the exit log")
        for time_column in ("SINCE START", "TIME OF DAY"):
            await pilot.pause(0.3)
            rows = log_rows(log)
            assert column_names(rows[0]) == [time_column, "GUEST", "VMM", "EXIT"]
            assert rows[-1] == log.lines[-1] and len(rows) >= 6  # the newest exit, at the bottom
            assert_under_their_names(rows)
            await pilot.press("pageup", "pageup")
            await pilot.pause(0.3)
            top = int(log.scroll_y)
            assert 0 < top < log.max_scroll_y - 1
            rows = log_rows(log)
            assert column_names(rows[0]) == [time_column, "GUEST", "VMM", "EXIT"]
            assert rows[1:] == [line.rstrip() for line in log.lines[top : top + len(rows) - 1]]
            assert_under_their_names(rows)
            await pilot.press("t")  # the time of day (it follows the latest exits again)
        await pilot.press("q")


async def test_enter_three_times_fast_opens_one_vcpu_screen(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("end")
        await settle(pilot)
        await burst(app, "enter", "enter", "enter")
        await until(pilot, lambda: isinstance(app.screen, VcpuScreen), what="drill-down")
        await pilot.pause(0.3)
        assert sum(isinstance(s, VcpuScreen) for s in app.screen_stack) == 1
        await pilot.press("escape")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("q")


def live_widgets() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, Widget))


async def test_a_drill_down_opened_and_closed_again_and_again_leaves_no_widget_behind(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("end")
        await settle(pilot)

        async def drill_in_and_out() -> None:
            await pilot.press("enter")
            assert isinstance(app.screen, VcpuScreen)
            await pilot.pause(0.2)
            await pilot.press("escape")
            assert isinstance(app.screen, AttachedScreen)

        await drill_in_and_out()
        await pilot.pause(0.3)
        baseline = live_widgets()
        for _ in range(8):
            await drill_in_and_out()
        # each return to the attached view remakes its footer's keys: the old ones must go
        back = "as many live widgets of each kind as after the first drill-down"
        await until(pilot, lambda: not live_widgets() - baseline, timeout=5, what=back)
        await pilot.press("q")


# --- live: real guests, traced ------------------------------------------------------------------


@pytest.mark.kvm
async def test_the_demo_shows_two_vcpus_moving_drills_in_detaches_and_quits():
    app = KvmtopApp(process_lister=list)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        await until(pilot, lambda: app.attached_pid is not None, what="demo attached")
        demo_pid = app.attached_pid
        assert isinstance(app.screen, AttachedScreen)
        table = app.screen.query_one(VcpuTable)
        await until(
            pilot,
            lambda: len(table.rows) == 2 and all(v.rate > 0 and v.total > 0 for v in table.rows),
            what="both vCPUs exiting",
        )
        first = [v.total for v in table.rows]
        await pilot.pause(1.0)
        assert all(v.total > t for v, t in zip(table.rows, first, strict=True))  # they move
        assert app.session.stats.snapshot().lost == 0
        await pilot.press("enter")
        assert isinstance(app.screen, VcpuScreen) and app.screen.vcpu == 0
        log = app.screen.query_one(ExitLog)
        assert app.focused is log
        await until(pilot, lambda: log.line_count > 100, what="exits in the log")

        def at_end() -> bool:
            return log.scroll_y == log.max_scroll_y

        await until(pilot, at_end, timeout=10, what="the log following the latest exits")
        await pilot.press("pageup", "pageup", "pageup")
        top_line = log.lines[int(log.scroll_y)]
        await pilot.pause(0.8)
        assert log.lines[int(log.scroll_y)] == top_line  # scrolled up: what it shows holds still
        assert log.scroll_y < log.max_scroll_y
        assert log.border_subtitle == "held: End follows the latest exits"
        held_last = log.lines[-1]
        await pilot.press("end")
        # following again: the hint gone, and the newest exits appended, the view on them (at
        # the end, or one refresh's lines before it while they come in)
        await until(pilot, lambda: not log.border_subtitle, timeout=10, what="the hint gone")
        await until(pilot, lambda: log.lines[-1] != held_last, timeout=10, what="newer exits")
        assert log.scroll_y >= log.max_scroll_y - MAX_NEW_LINES, "the view on the newest exits"
        await pilot.press("p", "p", "escape")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("d")
        await until(pilot, lambda: app.session.state is SessionState.ENDED, what="detached")
        assert os.path.exists(f"/proc/{demo_pid}")  # detached: the demo runs on
        await pilot.press("escape")
        assert isinstance(app.screen, ProcessListScreen)
        await pilot.press("q")
    await asyncio.sleep(0.2)
    assert not os.path.exists(f"/proc/{demo_pid}")  # kvmtop started the demo; q stopped it


@pytest.mark.kvm
@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_every_footer_key_fits_whole_at_80_and_160_columns(size):
    """The live attached screen has the most keys: at 80 columns they fit compact, the command
    palette's key given up for them; at 160 the palette's key is back at the right."""
    from textual.widgets._footer import FooterKey

    def keys() -> list[tuple[str, int]]:
        return [
            (key.key_display or key.key, key.region.right) for key in app.screen.query(FooterKey)
        ]

    app = KvmtopApp(process_lister=list)
    async with app.run_test(size=size) as pilot:
        for press, screen in (("m", AttachedScreen), ("escape", ProcessListScreen)):
            await pilot.press(press)
            shown: list[tuple[str, int]] = []

            def laid_out(s: type = screen, shown: list[tuple[str, int]] = shown) -> bool:
                # the footer remakes its keys as the screen's bindings change (attached, say)
                shown[:] = keys() if isinstance(app.screen, s) else []
                return [key for key, _ in shown if key != "^p"][-2:] == ["q", "?"]

            await until(pilot, laid_out, what=f"{screen.__name__}'s keys, the help last")
            assert all(right <= size[0] for _, right in shown), shown
            assert ("^p" in dict(shown)) == (size[0] >= 100)
        await pilot.press("q")


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.kvm
async def test_every_demo_guest_started_is_stopped_at_quit_also_after_a_detach():
    app = KvmtopApp(process_lister=list)
    async with app.run_test(size=SIZE) as pilot:
        await burst(app, "m", "m", "m")  # typed fast: one demo
        await until(pilot, lambda: app.attached_pid is not None, what="demo attached")
        first = app.attached_pid
        await pilot.pause(0.3)
        assert sum(isinstance(s, AttachedScreen) for s in app.screen_stack) == 1
        assert not [n for n in app._notifications if "already tracing" in n.message]
        await pilot.press("d")
        await until(pilot, lambda: app.session.state is SessionState.ENDED, what="detached")
        await pilot.press("escape", "m")
        await until(pilot, lambda: app.attached_pid not in (None, first), what="second demo")
        second = app.attached_pid
        assert not gone(first)  # detached: the first one runs on while kvmtop does
        await pilot.press("q")
    await until(pilot, lambda: gone(first) and gone(second), timeout=5, what="both stopped")


@pytest.mark.kvm
async def test_launching_a_command_counts_its_exits_exactly(tmp_path):
    own = tmp_path / "own.json"
    argv = counted_command(vcpus=2, outs=300, mmio_writes=200, spin=2_000_000, report_json=str(own))
    app = KvmtopApp(argv=argv)
    async with app.run_test(size=SIZE) as pilot:
        await until(
            pilot, lambda: app.session is not None and app.session.state is SessionState.ENDED
        )
        assert isinstance(app.screen, AttachedScreen)
        table = app.screen.query_one(VcpuTable)
        await until(pilot, lambda: [(v.vcpu, v.total) for v in table.rows] == [(0, 501), (1, 501)])
        assert app.session.exit_status == 0
        status = app.screen.query_one("StatusLine")
        await until(pilot, lambda: "exited with status 0" in status.render().plain,
                    what="the status line saying how it ended")  # fmt: skip
        await pilot.press("q")
    assert json.loads(own.read_text())["exits"] == {"KVM_EXIT_IO": 602, "KVM_EXIT_MMIO": 400}


@pytest.mark.kvm
async def test_quit_while_attached_detaches_and_the_guest_finishes(processes):
    vmm = subprocess.Popen(counted_command(outs=300, mmio_writes=0, spin=6_000_000, exit_status=9))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    app = KvmtopApp(pid=vmm.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.attached_pid == vmm.pid, what="attached")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("q")
    assert app.session is None  # closed: detached
    assert await asyncio.to_thread(vmm.wait, 60) == 9


@pytest.mark.kvm
async def test_keys_answer_quickly_at_the_highest_exit_rate(processes):
    vmm = subprocess.Popen(counted_command(outs=10**9, mmio_writes=0, spin=0))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    app = KvmtopApp(pid=vmm.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.session.stats.total > 2000, what="exits flowing")
        screen = app.screen
        for _ in range(6):  # not pilot.press: it waits for the whole process to go idle
            before, exits = screen.frozen, app.session.stats.total
            app.post_message(Key("p", "p"))
            await promptly(lambda before=before: screen.frozen != before)
            # the key acted while tracing went on at full rate (how fast: benchmarks/bench_tui.py;
            # the tracepoint engine hands exits over in batches, every 0.1 s at the least)
            await promptly(lambda exits=exits: app.session.stats.total > exits)
        assert app.session.stats.snapshot().lost == 0
        await pilot.press("q")


@pytest.mark.kvm
async def test_process_list_moves_filters_sorts_attaches_and_detaches(processes):
    demo = start_demo(processes)
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await list_shows(pilot, demo.pid)
        await pilot.press("down", "up")
        await pilot.press("slash", *"kvmtop-demo", "enter")
        await pilot.pause(0.2)
        table = screen.query_one("#procs")
        assert str(demo.pid) in [str(k.value) for k in table.rows]  # (other demos may run too)
        assert all(p.name == "kvmtop-demo" for p in screen.procs if str(p.pid) in table.rows)
        assert str(table.get_row(str(demo.pid))[3]).strip() == "2"  # vCPUs
        await pilot.press("slash", *"zzz-no-such")
        await pilot.pause(0.2)
        assert table.row_count == 0
        assert "No KVM process matches" in str(screen.query_one("#empty").render())
        await pilot.press("escape", "s")
        assert screen.sort_key == "USER" and table.row_count >= 1
        await pilot.press(*"s" * 8)  # every column, then round to the first
        assert screen.sort_key == "PID"
        await pilot.press("slash", *str(demo.pid), "enter")
        assert [str(k.value) for k in table.rows] == [str(demo.pid)]
        await pilot.press("a")
        await until(pilot, lambda: app.attached_pid == demo.pid, what="attached")
        await until(pilot, lambda: app.session.stats.total > 100, what="exits counted")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("escape")  # back to the list: tracing goes on
        assert isinstance(app.screen, ProcessListScreen)
        await until(pilot, lambda: table.get_row(str(demo.pid))[7] == "kvmtop", what="marked")
        assert "d" in footer_keys(app)
        await pilot.press("enter")  # the traced one: back to its view
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("escape", "d")  # detach from the list
        await until(pilot, lambda: app.session.state is SessionState.ENDED, what="detached")
        assert demo.poll() is None  # detached: the demo runs on
        await pilot.press("q")
    assert demo.poll() is None


@pytest.mark.kvm
async def test_back_from_the_attached_view_the_cursor_is_on_the_traced_vm(processes):
    first, second = start_demo(processes), start_demo(processes)
    app = KvmtopApp(pid=second.pid)  # as with `m`: the list never had its cursor on it
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.attached_pid == second.pid, what="attached")
        await pilot.press("escape")
        screen = await list_shows(pilot, second.pid)
        table = screen.query_one("#procs")
        await until(pilot, lambda: str(second.pid) in table.rows, what="listed")
        await pilot.pause(0.3)
        assert table.cursor_row > 0 and screen.selected_pid == second.pid  # below the first
        row = table.get_row(str(second.pid))
        assert row[7] == "kvmtop" and "▶" in str(row[0])  # marked as the traced one
        assert "▶" not in str(table.get_row(str(first.pid))[0])
        await pilot.press("up", "a")  # another VM: its view opens, the traced one stays traced
        await pilot.pause(0.5)
        assert app.attached_pid == second.pid
        await pilot.press("q")


@pytest.mark.kvm
async def test_kernel_view_without_tracing_and_beside_the_traced_view(processes):
    """`k` in the list: KVM's own counters of a VM kvmtop does not trace (a brief attach for the
    fds); the list then shows its exit rate. `k` in the attached view: the same, via the tracer."""
    from kvmtop.host.procfs import tracer_pid
    from kvmtop.screens.kernel import KernelScreen
    from kvmtop.widgets.counter_grid import CounterGrid

    demo = start_demo(processes)
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await list_shows(pilot, demo.pid)
        await pilot.press("slash", *str(demo.pid), "enter", "k")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        assert app.session is None and tracer_pid(demo.pid) == 0  # never traced
        grid = app.screen.query_one(CounterGrid)
        await until(pilot, lambda: "exits" in grid.rows, what="counters shown")
        assert [str(c.label) for c in grid.columns.values()][:4] == [
            "counter", "all vCPUs", "vCPU 0", "vCPU 1"]  # fmt: skip
        exits = lambda: str(grid.get_row("exits")[1])  # noqa: E731
        first = exits()
        await until(pilot, lambda: exits() != first and "/s)" in exits(), what="counters moving")
        assert "hypercalls" not in grid.rows  # 0 on this guest: hidden, as kvm_stat does
        await pilot.press("z")
        await until(pilot, lambda: "hypercalls" in grid.rows, what="zero rows shown")
        await pilot.press("k")  # back to the list: the exit rate column fills in
        table = screen.query_one("#procs")
        await until(pilot, lambda: str(table.get_row(str(demo.pid))[8]).strip() not in ("", "0"),
                    what="exit rate listed")  # fmt: skip
        await pilot.press("a")
        await until(pilot, lambda: app.attached_pid == demo.pid, what="attached")
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        assert app.screen.traced
        await pilot.press("escape")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("q")
    assert demo.poll() is None and tracer_pid(demo.pid) == 0
    assert not kvm_fds_of(os.getpid())  # all closed


@pytest.mark.kvm
async def test_slash_filters_the_kernel_views_counters_by_name_typed_in_one_burst(processes):
    from kvmtop.screens.kernel import KernelScreen
    from kvmtop.widgets.counter_grid import CounterGrid

    demo = start_demo(processes)
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        await list_shows(pilot, demo.pid)
        await pilot.press("slash", *str(demo.pid), "enter", "k")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        screen = app.screen
        grid = screen.query_one(CounterGrid)
        await until(pilot, lambda: "exits" in grid.rows, what="counters shown")
        await burst(app, "slash", *"zkzk")  # `z` shows zeros and `k` goes back, but not after `/`
        await routed(pilot)
        assert app.screen is screen and not screen.show_zeros
        assert list(grid.rows) == ["-vm-"]  # no counter is called that
        await burst(app, "escape", "slash", *"^(IO|mmio)_exits$", "enter", "z")  # a regex, any case
        await routed(pilot)
        assert screen.show_zeros and screen.filter.text == "^(IO|mmio)_exits$"
        assert list(grid.rows) == ["io_exits", "mmio_exits", "-vm-"]
        assert "filtered out (/)" in str(screen.query_one("#title").render())
        await pilot.press("escape")  # clears the filter, stays
        assert app.screen is screen and "halt_exits" in grid.rows
        await pilot.press("escape")
        assert isinstance(app.screen, ProcessListScreen)
        await pilot.press("q")


@pytest.mark.kvm
async def test_k_typed_twice_in_one_burst_opens_the_kernel_view_and_goes_back(processes):
    """The first `k` takes KVM's counters (a moment, in a thread) before the view opens; the
    second, typed before that, goes back as it would in the view: the attached view stays."""
    from kvmtop.screens.kernel import KernelScreen

    demo = start_demo(processes)
    app = KvmtopApp(pid=demo.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until_counting(pilot, demo.pid)
        attached = app.screen
        await burst(app, "k", "k", "p")
        await until(pilot, lambda: app.held.get(demo.pid) is not None, what="counters taken")
        await until(pilot, lambda: not app.keys_pending, what="every key acted")
        # (a screen a key pushed or popped shows a moment after the key acted: waited for)
        await until(pilot, lambda: app.screen is attached and attached.frozen,
                    what="the attached view frozen: `p` reached it")  # fmt: skip
        await burst(app, "p", "k", "k", "k")  # held now: the view opens at once, and so goes back
        await until(pilot, lambda: not app.keys_pending, what="every key acted")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen) and not attached.frozen,
                    what="the kernel view over the running attached view")  # fmt: skip
        await pilot.pause(0.3)
        assert isinstance(app.screen, KernelScreen) and not attached.frozen  # and it stays
        await pilot.press("q")


@pytest.mark.kvm
async def test_keys_in_one_burst_act_in_order_on_the_screen_each_lands_on(processes):
    """`a` `d` in one burst attaches, and once attached detaches; `k` `z` takes KVM's counters,
    then shows the zero rows in the view that opened; `k` `k` `p` opens that view, goes back
    and freezes the attached view."""
    from kvmtop.host.procfs import tracer_pid
    from kvmtop.screens.kernel import KernelScreen

    demo = start_demo(processes)
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        await list_shows(pilot, demo.pid)
        await pilot.press("slash", *str(demo.pid), "enter")
        await burst(app, "a", "d")
        await until(pilot, lambda: app.session is not None and app.session.pid == demo.pid
                    and app.session.state is SessionState.ENDED, what="attached, then detached")  # fmt: skip
        assert isinstance(app.screen, AttachedScreen) and tracer_pid(demo.pid) == 0
        await burst(app, "escape", "k", "z")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        await until(pilot, lambda: not app.keys_pending, what="every key acted")
        await until(pilot, lambda: getattr(app.screen, "show_zeros", False), what="`z` acted")
        await burst(app, "escape", "a", "k", "k", "p")
        await until(pilot, lambda: app.held.get(demo.pid) is not None and app.attached_pid,
                    what="attached, counters held")  # fmt: skip
        await until(pilot, lambda: not app.keys_pending, what="every key acted")
        await until(pilot, lambda: isinstance(app.screen, AttachedScreen) and app.screen.frozen,
                    what="the attached view frozen: `k` `k` went there and back, `p` froze it")  # fmt: skip
        await pilot.pause(0.3)
        assert isinstance(app.screen, AttachedScreen) and app.screen.frozen  # and it stays
        await pilot.press("q")
    assert demo.poll() is None and tracer_pid(demo.pid) == 0


@pytest.mark.kvm
async def test_kernel_view_of_the_traced_vm_comes_through_its_tracer(processes):
    from kvmtop.screens.kernel import KernelScreen
    from kvmtop.widgets.counter_grid import CounterGrid

    demo = start_demo(processes)
    app = KvmtopApp(pid=demo.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until_counting(pilot, demo.pid)
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        assert app.screen.traced and "also traced" in str(app.screen.query_one("#title").render())
        made_by = app.held.get(demo.pid).made_by
        assert set(made_by) == {-1, 0, 1}  # the VM and both vCPUs, by the VMM's own threads
        await until(pilot, lambda: "exits" in app.screen.query_one(CounterGrid).rows,
                    what="counters shown")  # fmt: skip
        await pilot.press("escape")  # the traced view now says how many exits reach the VMM
        title = app.screen.query_one("#title")
        await until(pilot, lambda: str(title.render()).startswith("[KVM: ")
                    and "/s of them reach the VMM: k]" in str(title.render()),
                    what="both rates shown")  # fmt: skip
        # over the same second: every exit the VMM sees is one KVM counted (its own handling
        # makes the rest), so KVM's rate is never the smaller one (but for runs signals end)
        kernel, vmm = app.kernel_rates()
        assert 0 < vmm <= kernel * 1.02 + 20, (kernel, vmm)
        await pilot.press("d")
        await until(pilot, lambda: app.session.state is SessionState.ENDED, what="detached")
        assert app.held.exit_rate(demo.pid) is not None  # the counters outlive the trace
        await pilot.press("q")
    assert demo.poll() is None


@pytest.mark.kvm
@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_the_kernel_views_scrollbar_thumb_starts_and_ends_on_a_row_edge(processes, size):
    """Every counter shown (z) overflows both sizes; wherever the grid is scrolled, the thumb
    is whole rows (Textual's default draws its ends as eighth-of-a-row glyphs)."""
    from kvmtop.screens.kernel import KernelScreen
    from kvmtop.widgets.counter_grid import CounterGrid

    partial = set("▁▂▃▄▅▆▇")
    vmm = subprocess.Popen(counted_command(outs=0, mmio_writes=0, spin=4_000_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    app = KvmtopApp()
    async with app.run_test(size=size) as pilot:
        await open_listed(pilot, vmm.pid, "k")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        grid = app.screen.query_one(CounterGrid)
        await pilot.press("z")
        await until(pilot, lambda: grid.max_scroll_y > 0, what="counters to scroll")
        seen = set()
        for row in range(0, grid.row_count, 7):
            grid.move_cursor(row=row, animate=False)  # the grid keeps the cursor in view

            def in_view(row: int = row) -> bool:
                return grid.scroll_y <= row <= grid.scroll_y + grid.size.height - 2

            await until(pilot, in_view, what=f"row {row} in view")
            seen.add(grid.vertical_scrollbar.position)
            assert not partial & set(app.export_screenshot()), f"a partial thumb at row {row}"
        assert len(seen) >= 3  # the thumb was seen at the top, on the way and at the bottom
        await pilot.press("q")


@pytest.mark.kvm
async def test_k_on_a_stopped_vmm_says_it_is_stopped(processes):
    """Its counters cannot be had (no thread of it runs): one notification says why, at once,
    and kvmtop goes on; resumed, the same `k` opens the kernel view."""
    import signal

    from kvmtop.host.procfs import is_stopped
    from kvmtop.screens.kernel import KernelScreen

    vmm = subprocess.Popen(counted_command(outs=0, mmio_writes=0, spin=4_000_000_000))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = await list_shows(pilot, vmm.pid)
        await pilot.press("slash", *str(vmm.pid), "enter")
        os.kill(vmm.pid, signal.SIGSTOP)
        try:
            await until(pilot, lambda: is_stopped(vmm.pid), what="stopped")
            await pilot.press("k")
            said = lambda: [n.message for n in app._notifications]  # noqa: E731
            await until(pilot, lambda: any("it is stopped" in m for m in said()), what="told")
        finally:
            os.kill(vmm.pid, signal.SIGCONT)
        assert app.screen is screen
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        await pilot.press("q")
    assert vmm.poll() is None


@pytest.mark.kvm
async def test_kernel_view_says_where_kvm_counted_the_io_exits_the_vmm_handles(processes):
    """This host's KVM emulates real-mode code: the guest's `out`s reach the VMM as IO exits,
    yet KVM counts them in insn_emulation, not io_exits. The note says so while it is so, and
    goes once nothing grows (the VMM stopped; what is left is the note on kvmtop's own signal
    exits, if its attach made any)."""
    import signal

    from kvmtop.counters.kernel_table import io_note
    from kvmtop.host.procfs import is_stopped
    from kvmtop.screens.kernel import KernelScreen
    from kvmtop.widgets.counter_grid import CounterGrid

    vmm = subprocess.Popen(counted_command(outs=50_000_000, mmio_writes=0))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    app = KvmtopApp(pid=vmm.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until_counting(pilot, vmm.pid)
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, KernelScreen), what="kernel view")
        note = app.screen.query_one("#note")
        shown = lambda: str(note.render()) if note.display else ""  # noqa: E731
        await until(pilot, lambda: "the VMM saw" in shown(), what="the note")
        stats = app.held.get(vmm.pid)

        def as_the_counters_say() -> bool:  # the samples move on each second: once, in step
            before, now = app.held.samples(vmm.pid)
            grew = {name: now.vcpus[0][name] - before.vcpus[0][name]
                    for name in ("io_exits", "insn_emulation")}  # fmt: skip
            assert grew["io_exits"] == 0 and grew["insn_emulation"] > 0
            return shown() == f"note: {io_note(stats, before, now, app.traced_io_rate())}"

        await until(pilot, as_the_counters_say, what="the note, from the counters shown")
        assert app.traced_io_rate() > 0
        assert shown().startswith("note: io_exits did not grow while the VMM saw ")
        grid = app.screen.query_one(CounterGrid)
        assert str(grid.get_row("io_exits")[1]) == "0"  # shown beside the note, though 0
        os.kill(vmm.pid, signal.SIGSTOP)
        try:
            await until(pilot, lambda: is_stopped(vmm.pid, traced=True), what="stopped")
            await until(pilot, lambda: "io_exits" not in shown(), what="no IO note: nothing grows")
        finally:
            os.kill(vmm.pid, signal.SIGCONT)
        await until(pilot, lambda: "the VMM saw" in shown(), what="the note again")
        await pilot.press("q")
    assert vmm.poll() is None


async def test_a_command_that_fails_before_making_a_vcpu_ends_kvmtop_with_its_status():
    app = KvmtopApp(argv=["sh", "-c", "echo one >&2; echo 'bad option -x' >&2; exit 3"])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.exit_message is not None, what="the command's end")
    assert app.return_value == 3
    assert app.exit_message.startswith("kvmtop: sh -c echo one")
    assert app.exit_message.endswith(
        "exited with status 3 before making a vCPU\n  one\n  bad option -x"
    )
    assert app.child_stderr is None  # its file is gone with the session


# --- what the status line, the title and the notices say ----------------------------------------


def status_text(app) -> str:
    return app.screen.query_one("StatusLine").render().plain


async def test_replay_offers_pause_not_freeze_and_shows_the_speed_while_paused(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=(80, 24)) as pilot:
        assert "space" in footer_keys(app) and "p" not in footer_keys(app)
        await pilot.press("right_square_bracket", "space")
        await pilot.pause(0.4)
        assert status_text(app).strip().startswith("paused at 2x")
        await pilot.press("space", "left_square_bracket", "left_square_bracket", "space")
        await pilot.pause(0.4)
        assert status_text(app).strip().startswith("paused at 0.5x")
        await pilot.press("p", "r")  # not replay keys: nothing happens
        assert not app.screen.frozen
        await pilot.press("q")


async def test_a_truncated_recording_says_so_when_the_replay_opens(tmp_path, fixed):
    data = open(fixed, "rb").read()
    cut = tmp_path / "cut.kvmtop"
    cut.write_bytes(data[: len(data) // 2 + 7])
    app = KvmtopApp(replay=str(cut))
    async with app.run_test(size=(80, 24)) as pilot:
        told = f"{cut} is truncated (no end marker): it plays up to its last whole record"
        await until(pilot, lambda: any(told == n.message for n in app._notifications),
                    what="the truncation told")  # fmt: skip
        await pilot.press("end")
        await settle(pilot)
        assert status_text(app).strip().startswith("replay ended, truncated")
        assert sum(told == n.message for n in app._notifications) == 1  # once
        await pilot.press("q")


async def test_the_palettes_screenshot_lands_in_the_current_directory_and_says_where(
    tmp_path, monkeypatch, fixed
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "no-such-home"))  # no ~/Downloads either
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=(80, 24)) as pilot:
        [shot] = [c for c in app.get_system_commands(app.screen) if c.title == "Screenshot"]
        shot.callback()
        await until(pilot, lambda: list(tmp_path.glob("*.svg")), what="a screenshot saved")
        [svg] = tmp_path.glob("*.svg")
        await until(pilot, lambda: any(f"screenshot saved to {svg}" == n.message
                                       for n in app._notifications), what="its path told")  # fmt: skip
        await pilot.press("q")


@pytest.mark.kvm
async def test_detach_clock_counts_from_the_detach_and_o_shows_the_recording(tmp_path, processes):
    demo = start_demo(processes)
    out = tmp_path / "demo.kvmtop"
    app = KvmtopApp(pid=demo.pid, record_path=str(out))
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: app.attached_pid == demo.pid, what="attached")
        # the file's name as far as it fits (its end cut, with …, on a narrow line)
        await until(pilot, lambda: "● rec " in status_text(app)
                    and f"recording to {str(out)[:12]}" in status_text(app), what="rec shown")  # fmt: skip
        await pilot.pause(2.2)
        await pilot.press("d")
        await until(pilot, lambda: app.session.state is SessionState.ENDED, what="detached")
        clock = re.compile(r" detached   0:(\d\d) ago, after 0:(\d\d) traced")
        await until(pilot, lambda: (m := clock.match(status_text(app))) and m[1] != "00",
                    what="a second since the detach")  # fmt: skip
        status = status_text(app)
        ago, traced = map(int, clock.match(status).groups())
        assert ago <= 2 <= traced < 8, status  # the clock counts from the detach
        assert "recording to" not in status  # the recording is finished
        await pilot.press("q")


@pytest.mark.kvm
async def test_r_resets_the_view_and_plus_minus_change_how_often_it_refreshes(processes):
    demo = start_demo(processes)
    app = KvmtopApp(pid=demo.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until_counting(pilot, demo.pid, exits=500)
        tids = {v.vcpu: v.tid for v in app.session.stats.snapshot().vcpus}
        pressed_ns = time.monotonic_ns()
        await pilot.press("r")
        await until(pilot, lambda: app.session.stats.snapshot().first_ns is not None,
                    what="exits counted since the reset")  # fmt: skip
        snap = app.session.stats.snapshot()
        # every exit counted came after the reset (but those of a batch on its way, ≤ 100 ms)
        assert snap.first_ns > pressed_ns - 0.2 * S
        assert {v.vcpu: v.tid for v in snap.vcpus} == tids  # the vCPUs and their threads stay
        assert "r" not in footer_keys(app) and "r" in app.screen.active_bindings  # in help
        await pilot.press("plus", "plus")
        assert app.refresh_s == 1.0 and app.screen._timer._interval == 1.0
        await pilot.press("minus", "minus", "minus")
        assert app.refresh_s == 0.25
        await pilot.press("q")


async def test_d_sets_how_often_the_views_refresh(fixed):
    app = KvmtopApp(replay=fixed, refresh_s=2.0)  # kvmtop -d 2 replay FILE
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.screen._timer._interval == 2.0
        await pilot.press("plus")
        assert app.refresh_s == 5.0
        await pilot.press("q")


@pytest.mark.kvm
async def test_quit_with_a_launched_command_running_says_it_runs_on():
    from kvmtop.app import left_running_notice

    app = KvmtopApp(argv=counted_command(outs=10**9, mmio_writes=0, spin=0))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.attached_pid is not None, what="launched")
        pid = app.attached_pid
        await pilot.press("q")
    try:
        assert app.left_running is not None and app.left_running[0] == pid
        assert not gone(pid)  # an ordinary child: it runs on, untraced
        notice = left_running_notice(*app.left_running)
        assert notice.startswith(f"pid {pid} (python") and f"`kill {pid}` stops it" in notice
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


@pytest.mark.kvm
async def test_two_vmms_attached_at_once_show_each_vm_and_are_marked_in_the_list(processes):
    demos = [start_demo(processes), start_demo(processes)]
    pids = [d.pid for d in demos]
    app = KvmtopApp(pid=pids, process_lister=lambda: [])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.attached_pid == pids[0], what="attached")
        table = app.screen.query_one(VcpuTable)
        await until(pilot, lambda: len(table.rows) == 4, what="both VMs' vCPUs")
        labels = sorted(v.label for v in table.rows)
        assert [label.split(":")[0] for label in labels] == [
            str(p) for p in sorted(pids) for _ in (0, 1)
        ]
        assert {label.split(":")[2] for label in labels} == {"0", "1"}
        assert table.border_title.startswith("vCPUs (PID:VM:vCPU) of 2 VMs: ")
        assert all(f"{pid}:" in table.border_title for pid in pids)
        assert set(app.traced_pids) == set(pids)  # the process list marks both
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, VcpuScreen), what="the drill-down")
        title = app.screen.query_one("#title").render().plain
        assert re.match(rf"vCPU [01] of VM \d+ in pid ({pids[0]}|{pids[1]}) \(python", title), title
        await pilot.press("escape", "q")
    assert all(d.poll() is None for d in demos)  # detached: both run on


@pytest.mark.kvm
async def test_w_watches_a_vm_untraced_a_traces_it_and_w_watches_it_again(processes):
    """`w` in the list: the watch view of a guest whose VMM takes 30 µs per `out`, never traced;
    `a` traces it exactly, `w` there detaches and watches again, also typed in one burst; at
    the end every fd kvmtop took is closed and the VMM's fd table is as it was."""
    from kvmtop.host.procfs import fd_table, tracer_pid
    from kvmtop.screens.watch import SampledScreen
    from kvmtop.widgets.sampled_targets import SampledTargets
    from kvmtop.widgets.vmm_reasons import VmmReasons

    vmm = start_minivmm(processes, outs=10**8, mmio_writes=0, out_sleep_us=30)
    fds_before = fd_table(vmm.pid)
    tracers: set[int] = set()

    def watching(screen) -> bool:
        """The watch view shows the guest's `out 0x80` as most of its VMM time."""
        tracers.add(tracer_pid(vmm.pid))
        snap = screen.feed.latest() if isinstance(screen, SampledScreen) else None
        io = snap.vm.by_reason.get("KVM_EXIT_IO") if snap is not None else None
        return io is not None and io.low > 0.5 and screen._shown_version == screen.feed.version

    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_listed(pilot, vmm.pid, "w")
        await until(pilot, lambda: watching(app.screen), what="IO sampled and shown")
        first = app.screen
        assert tracers == {0} and app.session is None  # never traced, no session made
        reasons = pane_text(first, VmmReasons)
        assert "in KVM_RUN" in reasons and re.search(r"\nIO +\d+\.\d% ±\d", reasons), reasons
        assert re.search(r"0x0080 out POST +\d+\.\d% ±", pane_text(first, SampledTargets))
        assert "watched, not traced" in str(first.query_one("#title").render())
        await pilot.press("a")  # exact tracing instead
        await until_counting(pilot, vmm.pid)
        assert isinstance(app.screen, AttachedScreen) and tracer_pid(vmm.pid) != 0
        await until(pilot, lambda: first.feed.closed, what="the first watch closed")
        await pilot.press("w")  # detach, watch again
        tracers.clear()
        await until(pilot, lambda: watching(app.screen), what="watching again")
        assert app.screen is not first and app.session.state is SessionState.ENDED
        assert tracers == {0}
        second = app.screen
        await burst(app, "a", "w")  # traced and watched again, the keys in one burst
        await until(pilot, lambda: app.screen is not second and watching(app.screen),
                    what="watching after a burst")  # fmt: skip
        assert app.session.state is SessionState.ENDED and tracer_pid(vmm.pid) == 0
        await pilot.press("escape")
        assert isinstance(app.screen, ProcessListScreen)
        await pilot.press("q")
    assert vmm.poll() is None and tracer_pid(vmm.pid) == 0
    assert not kvm_fds_of(os.getpid())  # all closed
    assert fd_table(vmm.pid) == fds_before


@pytest.mark.kvm
async def test_with_rip_the_watch_view_shows_the_guest_code_and_esc_and_q_restore_the_field(
    processes, tmp_path
):
    """kvmtop --rip: the watch view's guest code pane names minivmm's `out` from a kallsyms
    file; its kvm_valid_regs is set while watched, 0 again after Esc and after q."""
    from kvmtop.formats.guest_symbols import load_guest_symbols
    from kvmtop.minivmm.guestcode import counted_rips
    from kvmtop.minivmm.vmm import CODE_SEGMENT
    from kvmtop.screens.watch import SampledScreen
    from kvmtop.widgets.sampled_code import SampledCode

    vmm = start_minivmm(processes, outs=10**8, mmio_writes=0, out_sleep_us=100)
    at = CODE_SEGMENT * 16 + counted_rips(10**8, 0)["out"]
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(f"{at - 8:016x} T counted_loop\n{at:016x} t after_out\n"
                        f"{at + 3:016x} t later\n")  # fmt: skip
    page = vcpu_valid_regs(vmm.pid)

    def named(screen) -> bool:
        return isinstance(screen, SampledScreen) and "after_out" in pane_text(screen, SampledCode)

    app = KvmtopApp(rip=True, guest_symbols=load_guest_symbols(str(kallsyms)))
    async with app.run_test(size=SIZE) as pilot:
        await open_listed(pilot, vmm.pid, "w")
        await until(pilot, lambda: named(app.screen), what="the guest code named")
        assert valid_regs(page) != 0
        assert re.search(r"IO +\d+\.\d% ±\d+\.\d  after_out", pane_text(app.screen, SampledCode))
        await pilot.press("escape")
        await until(pilot, lambda: valid_regs(page) == 0, what="the field back to 0 at Esc")
        await pilot.press("w")
        await until(pilot, lambda: named(app.screen), what="watched again")
        assert valid_regs(page) != 0
        await pilot.press("q")
    assert valid_regs(page) == 0 and vmm.poll() is None


@pytest.mark.kvm
async def test_a_then_w_in_one_burst_from_a_first_watch_watches_again(processes, monkeypatch):
    """From the first watch of a fresh app (no VMM traced before): `a` begins an attach and the
    `w` typed with it, before the attach is done, detaches and watches again. (The session takes
    the attach's news a second late, so that the `w` surely comes first.)"""
    from kvmtop.host.procfs import tracer_pid
    from kvmtop.screens.watch import SampledScreen

    taken = TraceSession._on_attached

    def late(self, attached) -> None:
        time.sleep(1.0)
        taken(self, attached)

    monkeypatch.setattr(TraceSession, "_on_attached", late)

    vmm = start_minivmm(processes, outs=10**8, mmio_writes=0, out_sleep_us=30)
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_listed(pilot, vmm.pid, "w")
        await until(pilot, lambda: isinstance(app.screen, SampledScreen), what="the watch view")
        first = app.screen
        await burst(app, "a", "w")
        await until(pilot, lambda: isinstance(app.screen, SampledScreen) and app.screen is not first
                    and app.screen.feed.latest() is not None, what="watching again")  # fmt: skip
        assert app.session.state in (SessionState.ENDED, SessionState.FAILED)
        await until(pilot, lambda: tracer_pid(vmm.pid) == 0, what="untraced")
        await pilot.press("escape", "q")
    assert vmm.poll() is None and tracer_pid(vmm.pid) == 0


@pytest.mark.kvm
async def test_g_shows_which_guest_code_makes_the_exits_named_and_ordered_by_o(processes, tmp_path):
    """Attached without --rip, `g` turns guest RIPs on: the guest code pane appears with the
    demo guest's addresses named from a System.map, the drill-down and its exit log too, `o`
    orders the pane by the VMM's time; the quit leaves kvm_valid_regs as it found it."""
    from kvmtop.formats.guest_symbols import load_guest_symbols
    from kvmtop.minivmm.guestcode import demo_code
    from kvmtop.minivmm.vmm import CODE_SEGMENT
    from kvmtop.widgets.guest_code import GuestCodePane

    base = CODE_SEGMENT * 16  # vCPU 0's code
    labels = demo_code(0).labels
    path = tmp_path / "System.map"
    path.write_text("".join(f"{base + at:016x} t demo_{name}\n"
                            for name, at in labels.items() if "." not in name))  # fmt: skip
    demo = start_demo(processes)
    app = KvmtopApp(pid=demo.pid, guest_symbols=load_guest_symbols(str(path)))
    async with app.run_test(size=SIZE) as pilot:
        await until_counting(pilot, demo.pid)
        pane = app.screen.query_one(GuestCodePane)
        assert not pane.display and app.screen.check_action("guest_rip", ()) is True
        await pilot.press("g")
        await until(pilot, lambda: app.session.stats.snapshot().rip_seen, what="RIPs")
        await until(pilot, lambda: "demo_" in str(pane.render()), what="named code")
        assert app.screen.check_action("guest_rip", ()) is False  # on: the key has gone
        assert "guest code by exits" in pane.border_title
        await pilot.press("o", "o", "o")  # by VMM total
        await until(pilot, lambda: "by VMM time" in pane.border_title, what="ordered by time")
        table = app.screen.query_one(VcpuTable)
        await until(pilot, lambda: len(table.rows) == 2, what="both vCPUs listed")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, VcpuScreen), what="drill-down")
        log = app.screen.query_one(ExitLog)
        await until(pilot, lambda: any(" @ demo_" in line for line in log.lines), what="named")
        page = vcpu_valid_regs(demo.pid)
        assert valid_regs(page) != 0
        await pilot.press("q")
    assert valid_regs(page) == 0 and demo.poll() is None
