"""Remake the SVG screenshots in docs/ from the built-in demo guest (needs /dev/kvm).

python docs/make_screenshots.py
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

from kvmtop.app import KvmtopApp
from kvmtop.minivmm import demo_command

DOCS = os.path.dirname(os.path.abspath(__file__))
SIZE = (150, 44)


async def shoot_replay(recording: str) -> None:
    app = KvmtopApp(replay=recording)
    async with app.run_test(size=SIZE) as pilot:
        app.replay_source.path = "demo.kvmtop"
        app.replay_source.seek_to(1.0)
        app.replay_source.paused = True
        await pilot.pause(0.8)
        app.save_screenshot("screen-attached.svg", DOCS)
        await pilot.press("enter")
        await pilot.pause(0.8)
        app.save_screenshot("screen-vcpu.svg", DOCS)
        await pilot.press("escape", "question_mark")
        await pilot.pause(0.5)
        app.save_screenshot("screen-help.svg", DOCS)


async def shoot_process_list() -> None:
    app = KvmtopApp()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(3.0)  # one psutil pass for CPU%
        app.save_screenshot("screen-processes.svg", DOCS)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recording = os.path.join(tmp, "demo.kvmtop")
        subprocess.run(
            [sys.executable, "-m", "kvmtop", "record", "-o", recording, "--",
             *demo_command(duration=40), ],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        asyncio.run(shoot_replay(recording))
    demo = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    try:
        time.sleep(1)
        asyncio.run(shoot_process_list())
    finally:
        demo.kill()
        demo.wait()


if __name__ == "__main__":
    main()
