"""The TUI driven key by key with Textual's Pilot, against a real traced guest and a replayed
recording."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest
from conftest import wait_for_vcpus
from guests.fixed_recording import write_fixed_recording

from kvmtop.app import AttachedScreen, HelpScreen, KvmtopApp, ProcessListScreen, VcpuScreen
from kvmtop.minivmm import counted_command, demo_command
from kvmtop.session import SessionState
from kvmtop.widgets.exit_log import ExitLog
from kvmtop.widgets.vcpu_table import VcpuTable

SIZE = (140, 42)


async def until(pilot, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


@pytest.fixture
def fixed(tmp_path) -> str:
    return write_fixed_recording(str(tmp_path / "fixed.kvmtop"))


async def test_replay_plays_pauses_seeks_and_drills_down(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, AttachedScreen)
        source = app.replay_source
        await pilot.press("space")  # pause
        assert source.paused and "paused" in source.status().state
        await pilot.press("right", "right")  # +20 s
        await pilot.pause(0.3)
        assert source.position_ns - source.start_ns >= 20 * 10**9
        table = app.screen.query_one(VcpuTable)
        assert [v.vcpu for v in table.rows] == [0, 1]
        at_20s = source.stats.snapshot().total
        await pilot.press("left")  # back to 10 s: the aggregate is rebuilt from the start
        await pilot.pause(0.3)
        assert 0 < source.stats.snapshot().total < at_20s
        await pilot.press("]", "]")
        assert source.speed == 5.0
        await pilot.press("down", "enter")
        assert isinstance(app.screen, VcpuScreen) and app.screen.vcpu == 1
        await pilot.pause(0.5)
        assert app.screen.query_one(ExitLog).line_count > 0
        await pilot.press("p")
        assert app.screen.frozen
        await pilot.press("escape")
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "q")
    assert app.return_value == 0


async def test_replay_to_the_end_shows_the_exact_counts(fixed):
    app = KvmtopApp(replay=fixed)
    async with app.run_test(size=SIZE) as pilot:
        app.replay_source.seek_to(1.0)
        await pilot.pause(0.3)
        snap = app.replay_source.stats.snapshot()
        assert snap.total == 1621
        assert {r.label: r.count for r in snap.reasons} == {
            "KVM_EXIT_IO": 992, "KVM_EXIT_MMIO": 540, "KVM_EXIT_HLT": 88, "KVM_EXIT_INTR": 1,
        }  # fmt: skip
        await pilot.press("q")


@pytest.mark.kvm
async def test_live_launch_counts_exactly_and_shows_every_vcpu(tmp_path):
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
        await pilot.press("q")
    assert json.loads(own.read_text())["exits"] == {"KVM_EXIT_IO": 602, "KVM_EXIT_MMIO": 400}


@pytest.mark.kvm
async def test_quit_while_attached_leaves_the_guest_to_finish(processes):
    vmm = subprocess.Popen(counted_command(outs=300, mmio_writes=0, spin=6_000_000, exit_status=9))
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    app = KvmtopApp(pid=vmm.pid)
    async with app.run_test(size=SIZE) as pilot:
        await until(
            pilot, lambda: app.session is not None and app.session.state is SessionState.ATTACHED
        )
        await pilot.press("q")
    assert app.session is None  # closed: detached
    assert await asyncio.to_thread(vmm.wait, 60) == 9


@pytest.mark.kvm
async def test_process_list_filters_sorts_attaches_and_detaches(processes):
    demo = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    processes.append(demo)
    wait_for_vcpus(demo.pid, 2)
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, ProcessListScreen)
        await until(pilot, lambda: any(p.pid == demo.pid for p in screen.procs))
        await pilot.press("slash", *"kvmtop-demo", "enter")
        await pilot.pause(0.2)
        table = screen.query_one("#procs")
        assert str(demo.pid) in [str(k.value) for k in table.rows]  # (other demos may run too)
        demo_row = next(p for p in screen.procs if p.pid == demo.pid)
        assert demo_row.vcpus == 2 and demo_row.name == "kvmtop-demo"
        await pilot.press("slash", *"zzz-no-such")
        await pilot.pause(0.2)
        assert table.row_count == 0 and "No KVM process matches" in str(
            screen.query_one("#empty").render()
        )
        await pilot.press("escape", "s")
        assert screen.sort_key == "cpu"
        await pilot.press("slash", *str(demo.pid), "enter", "a")
        await until(
            pilot, lambda: app.session is not None and app.session.state is SessionState.ATTACHED
        )
        await until(pilot, lambda: app.session.stats.total > 100)
        assert isinstance(app.screen, AttachedScreen)
        await pilot.press("d")
        await until(pilot, lambda: app.session.state is SessionState.ENDED)
        assert demo.poll() is None  # detached: the demo runs on
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ProcessListScreen)
        await pilot.press("q")
    assert demo.poll() is None


async def test_an_empty_machine_offers_the_demo():
    app = KvmtopApp(process_lister=list)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(0.3)
        assert "start the built-in demo" in str(app.screen.query_one("#empty").render())
        await pilot.press("q")


def write_many_vcpus(path: str, vcpus: int = 64) -> str:
    from kvmtop.events import ExitBatch, ExitEvent
    from kvmtop.recording import RecordingMeta, RecordingWriter

    start = 10**12
    meta = RecordingMeta(pid=1, argv=("big-vm",), launched=False, start_ns=start,
                         start_wall=1.7e9, with_data=False)  # fmt: skip
    writer = RecordingWriter.create(path, meta, False)
    events = tuple(
        ExitEvent(
            v,
            2 if i % 3 else 6,
            0,
            start + i * 10**6 + v,
            start + i * 10**6 + v + 5000,
            0x80,
            257,
            1,
        )
        for i in range(100)
        for v in range(vcpus)
    )
    writer.write_batch(ExitBatch(events))
    writer.close()
    return path


async def test_64_vcpus_fit_scroll_and_open(tmp_path):
    app = KvmtopApp(replay=write_many_vcpus(str(tmp_path / "big.kvmtop")))
    async with app.run_test(size=SIZE) as pilot:
        app.replay_source.seek_to(1.0)
        await pilot.pause(0.5)
        table = app.screen.query_one(VcpuTable)
        assert len(table.rows) == 64
        assert table.size.height < 42  # the table scrolls inside the screen
        await pilot.press(*["pagedown"] * 7, "down")
        assert table.selected_vcpu == 63
        assert table.scroll_offset.y > 0  # scrolled to keep the cursor visible
        await pilot.press("enter")
        assert isinstance(app.screen, VcpuScreen) and app.screen.vcpu == 63
        await pilot.press("escape", "q")


async def test_a_failed_attach_is_a_notification_and_the_app_stays_up(processes):
    sleeper = subprocess.Popen(["sleep", "30"])
    processes.append(sleeper)
    app = KvmtopApp(process_lister=list)
    async with app.run_test(size=SIZE) as pilot:
        app.attach(sleeper.pid)
        await until(
            pilot,
            lambda: (
                isinstance(app.screen, ProcessListScreen) and app.session.state is SessionState.IDLE
            ),
        )
        expected = f"pid {sleeper.pid} (sleep) is not a KVM process"
        await until(pilot, lambda: any(expected in n.message for n in app._notifications))
        await pilot.press("q")
    assert sleeper.poll() is None
