"""Remake the SVG screenshots in docs/ (needs /dev/kvm and qemu-system-x86_64).

    python docs/make_screenshots.py

The attached view, the drill-down and the help come from a recording of the built-in demo guest,
replayed and paused at its end; the process list and the kernel view show the demo and a real
QEMU, live; the watch view samples the demo guest, live, untraced.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from guests.qemu_bios import BIOS_SIZE, qemu_command  # noqa: E402

from kvmtop.app import KvmtopApp  # noqa: E402
from kvmtop.host.discovery import list_kvm_processes  # noqa: E402
from kvmtop.minivmm.vmm import demo_command  # noqa: E402

DOCS = os.path.dirname(os.path.abspath(__file__))
SIZE = (160, 45)


async def shoot_replay(recording: str) -> None:
    app = KvmtopApp(replay=recording)
    async with app.run_test(size=SIZE) as pilot:
        assert app.replay is not None
        app.replay.path = "demo.kvmtop"  # not the temporary directory
        app.replay.toggle_pause()
        app.replay.seek_to(1.0)
        await asyncio.to_thread(app.replay.wait_settled, 60)
        await pilot.pause(0.8)
        app.save_screenshot("screen-attached.svg", DOCS)
        await pilot.press("enter")
        await pilot.pause(0.8)
        app.save_screenshot("screen-vcpu.svg", DOCS)
        await pilot.press("escape", "question_mark")
        await pilot.pause(0.5)
        app.save_screenshot("screen-help.svg", DOCS)


async def shoot_process_list(pids: set[int]) -> None:
    """Only the guests started here are listed (and `k` takes the counters of the first): other
    VMs on the machine are neither shown nor touched."""
    app = KvmtopApp(process_lister=lambda: [p for p in list_kvm_processes() if p.pid in pids])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(4.5)  # two psutil passes: CPU% is measured between them
        await pilot.press("k")  # the selected VM's own counters, without tracing it
        await pilot.pause(3.5)
        app.save_screenshot("screen-kernel.svg", DOCS)
        await pilot.press("escape")
        await pilot.pause(2.5)  # its KVM exits/s shows in the list
        app.save_screenshot("screen-processes.svg", DOCS)


async def shoot_watch(pid: int) -> None:
    """`w` on the demo guest: 20 s of its timeline, never traced."""
    app = KvmtopApp(process_lister=lambda: [p for p in list_kvm_processes() if p.pid == pid])
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(2.5)
        await pilot.press("w")
        await pilot.pause(20)
        app.save_screenshot("screen-watch.svg", DOCS)


async def shoot_guest_code(recording: str, symbols: str) -> None:
    """The attached view of a recording made with --rip, its guest code named (README)."""
    from kvmtop.formats.guest_symbols import load_guest_symbols

    app = KvmtopApp(replay=recording, guest_symbols=load_guest_symbols(symbols))
    async with app.run_test(size=(100, 40)) as pilot:
        assert app.replay is not None
        app.replay.path = "demo-rip.kvmtop"
        app.replay.toggle_pause()
        app.replay.seek_to(1.0)
        await asyncio.to_thread(app.replay.wait_settled, 60)
        await pilot.pause(0.8)
        app.save_screenshot("screen-guest-code.svg", DOCS)


def demo_system_map(path: str) -> None:
    """A System.map of the demo guest's code: each vCPU's labels at its code segment."""
    from kvmtop.minivmm.guestcode import demo_code
    from kvmtop.minivmm.vmm import CODE_SEGMENT

    with open(path, "w") as f:
        for vcpu in (0, 1):
            base = CODE_SEGMENT * (vcpu + 1) * 16
            labels = demo_code(vcpu).labels
            for name, at in sorted(labels.items(), key=lambda kv: kv[1]):
                if "." not in name:  # not a repeat's own
                    f.write(f"{base + at:016x} t demo_{name}\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recording = os.path.join(tmp, "demo.kvmtop")
        subprocess.run(
            [sys.executable, "-m", "kvmtop", "record", "--no-seccomp", "-o", recording, "--",
             *demo_command(duration=40)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        asyncio.run(shoot_replay(recording))
        with_rip = os.path.join(tmp, "demo-rip.kvmtop")
        subprocess.run(
            [sys.executable, "-m", "kvmtop", "record", "--rip", "--no-seccomp", "-o", with_rip,
             "--", *demo_command(duration=15)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        symbols = os.path.join(tmp, "demo.map")
        demo_system_map(symbols)
        asyncio.run(shoot_guest_code(with_rip, symbols))
        bios = os.path.join(tmp, "idle.bin")
        with open(bios, "wb") as f:
            f.write(b"\xf4" * BIOS_SIZE)  # hlt from the reset vector on: an idle guest
        guests = [
            subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL),
            subprocess.Popen(
                qemu_command(bios, "-smp", "2", "-name", "guest=web-1"), stderr=subprocess.DEVNULL
            ),
        ]
        try:
            time.sleep(1)
            asyncio.run(shoot_process_list({guest.pid for guest in guests}))
            asyncio.run(shoot_watch(guests[0].pid))
        finally:
            for guest in guests:
                guest.kill()
                guest.wait()


if __name__ == "__main__":
    main()
