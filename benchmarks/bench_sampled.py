"""What sampling costs kvmtop: the exporter's `--sampled` fleet and the TUI's watch view.

    python benchmarks/bench_sampled.py [--seconds 10]

Starts the built-in demo guest (2 vCPUs) and, in this process, watches only it: a fleet
sampling it at 100 Hz and then 1 kHz, scraped once a second (the metric families made and
formatted as a scrape does), then the watch view's feed at 1 kHz with a snapshot a second.
Reports this process's CPU (every thread: the sampler's, the scrapes') as a share of one CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from helpers import wait_for_vcpus  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from kvmtop.commands.exporter import Fleet, FleetCollector  # noqa: E402
from kvmtop.host.discovery import list_kvm_processes  # noqa: E402
from kvmtop.minivmm.vmm import demo_command  # noqa: E402
from kvmtop.sources.watch_feed import WatchFeed  # noqa: E402


def cpu_share(seconds: float, every_second: Callable[[], object] | None = None) -> float:
    """This process's CPU over ``seconds``, as a share of one CPU."""
    c0, t0 = time.process_time(), time.monotonic()
    for _ in range(int(seconds)):
        time.sleep(1.0)
        if every_second is not None:
            every_second()
    return (time.process_time() - c0) / (time.monotonic() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    guest = subprocess.Popen(demo_command(), stdout=subprocess.DEVNULL)
    try:
        wait_for_vcpus(guest.pid, 2)
        time.sleep(1.0)
        print("| what (demo guest, 2 vCPUs) | kvmtop's CPU |\n|---|---:|")
        for hz in (100.0, 1000.0):
            fleet = Fleet(discover=lambda: [p for p in list_kvm_processes() if p.pid == guest.pid],
                          log=lambda text: None, sampled_hz=hz)  # fmt: skip
            fleet.rescan()
            registry = CollectorRegistry()
            registry.register(FleetCollector(fleet))
            share = cpu_share(args.seconds, lambda r=registry: generate_latest(r))
            fleet.close()
            print(f"| exporter --sampled {hz:g}, a scrape a second | {100 * share:.2f}% |")
        feed = WatchFeed(guest.pid, 1000.0)
        time.sleep(1.5)  # the counters taken, the sampler started
        share = cpu_share(args.seconds)
        feed.close(2.0)
        print(f"| watch view, 1 kHz, a snapshot a second | {100 * share:.2f}% |")
    finally:
        guest.kill()
        guest.wait()


if __name__ == "__main__":
    main()
