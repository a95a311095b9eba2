"""What each screen looks like, fed from fixed data so the pictures never vary.
Update after an intended change: pytest tests/test_snapshots.py --snapshot-update"""

from __future__ import annotations

import asyncio

import pytest
from guests.fixed_recording import write_fixed_recording
from helpers import fixed_processes

from kvmtop.app import KvmtopApp
from kvmtop.host.discovery import KvmProcess

SIZE = (140, 42)
SIZES = pytest.mark.parametrize(
    "size", [(80, 24), (100, 30), (160, 48)], ids=lambda s: f"{s[0]}x{s[1]}"
)


@pytest.fixture(autouse=True)
def an_hour_of_uptime(monkeypatch: pytest.MonkeyPatch) -> None:
    """The listed VMs have run an hour, however long the screen takes to be drawn."""
    monkeypatch.setattr(KvmProcess, "uptime_s", property(lambda p: 3600.0))


@pytest.fixture
def replay_app(tmp_path):
    path = write_fixed_recording(str(tmp_path / "fixed.kvmtop"))
    app = KvmtopApp(replay=path)
    app.replay.path = "fixed.kvmtop"  # the title must not show the temporary directory
    return app


async def at(pilot, fraction: float = 1.0) -> None:
    """The replay paused at a fixed place: what it shows no longer depends on the clock."""
    replay = pilot.app.replay
    replay.toggle_pause()
    replay.seek_to(fraction)
    assert await asyncio.to_thread(replay.wait_settled, 20)
    draw = getattr(pilot.app.screen, "refresh_view", None)
    if draw is not None:  # drawn now, not at the next timer tick (late on a loaded machine)
        draw()
    await pilot.pause(0.6)


async def at_end(pilot) -> None:
    await at(pilot, 1.0)


@SIZES
def test_process_list(snap_compare, size):
    assert snap_compare(KvmtopApp(process_lister=fixed_processes), terminal_size=size,
                        run_before=lambda pilot: pilot.pause(0.5))  # fmt: skip


def test_process_list_filtered(snap_compare):
    async def filter_web(pilot) -> None:
        await pilot.pause(0.5)
        await pilot.press("slash", *"web")
        await pilot.pause(0.3)

    app = KvmtopApp(process_lister=fixed_processes)
    assert snap_compare(app, terminal_size=(80, 24), run_before=filter_web)


@SIZES
def test_attached_view(snap_compare, replay_app, size):
    assert snap_compare(replay_app, terminal_size=size, run_before=at_end)


@SIZES
def test_vcpu_drill_down(snap_compare, replay_app, size):
    async def open_vcpu_1(pilot) -> None:
        await at_end(pilot)
        await pilot.press("down", "enter")
        await pilot.pause(0.6)

    assert snap_compare(replay_app, terminal_size=size, run_before=open_vcpu_1)


def test_attached_view_paused_mid_replay(snap_compare, replay_app):
    async def at_middle(pilot) -> None:
        await at(pilot, 0.5)

    assert snap_compare(replay_app, terminal_size=SIZE, run_before=at_middle)


@SIZES
def test_help(snap_compare, replay_app, size):
    async def open_help(pilot) -> None:
        await at_end(pilot)
        await pilot.press("question_mark")
        await pilot.pause(0.3)

    assert snap_compare(replay_app, terminal_size=size, run_before=open_help)


def test_a_terminal_too_small_says_so(snap_compare, replay_app):
    assert snap_compare(replay_app, terminal_size=(60, 15), run_before=at_end)


@SIZES
def test_watch_view(snap_compare, monkeypatch, size):
    """`w` on the first VM listed, watched by a fixed watcher (4 vCPUs, one second sampled)."""
    from guests.fixed_watch import FixedWatcher

    from kvmtop.sources.watch_feed import WatchFeed

    monkeypatch.setattr(WatchFeed, "watched_s", property(lambda feed: 63.0))

    async def watch_first(pilot) -> None:
        await pilot.pause(0.5)
        await pilot.press("w")
        await pilot.pause(1.0)

    app = KvmtopApp(process_lister=fixed_processes, watcher=FixedWatcher)
    assert snap_compare(app, terminal_size=size, run_before=watch_first)
