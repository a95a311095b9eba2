"""Does the TUI slow tracing down, and do keys still answer at the highest exit rate?

    python benchmarks/bench_tui.py [--exits 20000] [--engine ptrace|tracepoints]

A QEMU guest makes N port-IO exits as fast as it can, untraced, traced (a) by the TUI, running
headless with Textual's test driver (it still composes every frame), and (b) by `kvmtop record
--no-seccomp` (the same 2-stop launch as the TUI's; with the tracepoint engine, `kvmtop record`).
While the TUI traces, keys are pressed and the time until the screen reacts is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from guests.qemu_bios import qemu_command, write_bios  # noqa: E402

from kvmtop.app import AttachedScreen, KvmtopApp  # noqa: E402
from kvmtop.sources.session import SessionState  # noqa: E402
from kvmtop.widgets.vcpu_table import VcpuTable  # noqa: E402


async def tui_rate(argv: list[str]) -> float:
    """Seconds until the guest has ended, traced by the TUI (nothing else running)."""
    app = KvmtopApp(argv=argv)
    async with app.run_test(size=(140, 42)) as pilot:
        started = time.monotonic()
        while app.session is None or app.session.state is not SessionState.ENDED:
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        await pilot.press("q")
    return elapsed


async def tui_run(argv: list[str]) -> tuple[float, list[float], list[float], int]:
    """Trace with the TUI; meanwhile measure the event loop's lag and how long a key's action
    (here `p`, freeze) takes to run: keys are handled on that loop."""
    app = KvmtopApp(argv=argv)
    lags: list[float] = []
    actions: list[float] = []
    async with app.run_test(size=(140, 42)) as pilot:
        started = time.monotonic()
        while app.session is None or app.session.state is not SessionState.ENDED:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t0 - 0.01)
            if isinstance(app.screen, AttachedScreen) and len(lags) % 50 == 0:
                screen, t0 = app.screen, time.monotonic()
                before = screen.frozen
                app.call_later(screen.action_freeze)  # what the `p` binding runs
                while screen.frozen == before:
                    await asyncio.sleep(0.001)
                actions.append(time.monotonic() - t0)
        elapsed = time.monotonic() - started
        total = app.session.stats.total
        if app.screen.frozen:
            app.screen.action_freeze()
        await pilot.pause(0.5)
        assert app.screen.query_one(VcpuTable).rows, "the vCPU table was never filled"
        await pilot.press("q")
    return elapsed, lags, actions, total


def record_run(argv: list[str], out: str) -> float:
    started = time.monotonic()
    # --no-seccomp: the same 2-stop launch as the TUI's (which leaves the command detachable)
    subprocess.run([sys.executable, "-m", "kvmtop", "record", "--no-seccomp", "-o", out, "--", *argv],
                   capture_output=True, check=False)  # fmt: skip
    return time.monotonic() - started


def untraced_run(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, capture_output=True, check=False)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engine", choices=("ptrace", "tracepoints"), default="ptrace")
    args = parser.parse_args()
    os.environ["KVMTOP_ENGINE"] = args.engine
    with tempfile.TemporaryDirectory() as tmp:
        bios = write_bios(os.path.join(tmp, "busy.bin"), outs=args.exits)
        argv = qemu_command(bios)
        _, lags, actions, total = asyncio.run(tui_run(argv))
        tui_s = statistics.median(asyncio.run(tui_rate(argv)) for _ in range(args.repeat))
        rec_s = statistics.median(
            record_run(argv, os.path.join(tmp, "r.kvmtop")) for _ in range(args.repeat)
        )
        plain_s = statistics.median(untraced_run(argv) for _ in range(args.repeat))
    n = args.exits
    print(f"QEMU guest, {n} `out 0x80` exits, median of {args.repeat} (QEMU start-up included), "
          f"engine {args.engine}\n")  # fmt: skip
    print("| traced by | seconds | exits/s | vs untraced |")
    print("|---|---:|---:|---:|")
    print(f"| untraced | {plain_s:.2f} | {n / plain_s:,.0f} | 1.00x |")
    print(f"| TUI (attached view, 4 Hz refresh) | {tui_s:.2f} | {n / tui_s:,.0f} | "
          f"{plain_s / tui_s:.2f}x |")  # fmt: skip
    print(f"| `kvmtop record --no-seccomp` | {rec_s:.2f} | {n / rec_s:,.0f} | "
          f"{plain_s / rec_s:.2f}x |")  # fmt: skip
    p99 = sorted(lags)[int(len(lags) * 0.99)]
    print(
        f"\nThe TUI counted {total} exits. While it traced at full rate: event-loop lag median "
        f"{statistics.median(lags) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {max(lags) * 1e3:.1f} ms; "
        f"a key's action ran within median {statistics.median(actions) * 1e3:.1f} ms, "
        f"max {max(actions) * 1e3:.1f} ms ({len(actions)} keys)"
    )


if __name__ == "__main__":
    main()
