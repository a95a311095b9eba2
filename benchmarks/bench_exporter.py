"""What a Prometheus scrape of `kvmtop exporter` costs, with VMs of several vCPUs on the host.

    python benchmarks/bench_exporter.py [--vms 4] [--vcpus 4] [--scrapes 200]

Starts VMs (the built-in demo guest, making a steady mix of exits), the exporter in its own
process, waits until it reads them all, then times back-to-back scrapes over loopback and
reports the exporter's CPU time per scrape and its RSS. A scrape only preads the held stats fds.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from helpers import wait_for_vcpus  # noqa: E402

from kvmtop.minivmm.vmm import demo_command  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    vms = [subprocess.Popen(demo_command(vcpus=args.vcpus), stdout=subprocess.DEVNULL)
           for _ in range(args.vms)]  # fmt: skip
    exporter = None
    try:
        for vm in vms:
            wait_for_vcpus(vm.pid, args.vcpus)
        exporter = subprocess.Popen([sys.executable, "-m", "kvmtop", "exporter", "--listen",
                                     "127.0.0.1:0", "--rescan", "1"],
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert exporter.stderr is not None
        line = exporter.stderr.readline()
        url = re.search(r"http://\S+/metrics", line)
        assert url, line
        pids = {str(vm.pid) for vm in vms}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = urllib.request.urlopen(url.group(0)).read().decode()
            seen = set(re.findall(r'kvm_vm_up\{pid="(\d+)"[^}]*\} 1', body))
            if pids <= seen:
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the exporter did not pick up every VM within 60 s")
        proc = psutil.Process(exporter.pid)
        cpu0 = proc.cpu_times()
        times = []
        for _ in range(args.scrapes):
            t0 = time.monotonic()
            body = urllib.request.urlopen(url.group(0)).read().decode()
            times.append(time.monotonic() - t0)
        cpu1 = proc.cpu_times()
        cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / args.scrapes
        series = sum(1 for ln in body.splitlines() if ln and not ln.startswith("#"))
        print(f"{args.vms} VMs x {args.vcpus} vCPUs, {args.scrapes} scrapes over loopback\n")
        print("| scrape | value |\n|---|---:|")
        print(f"| latency, median | {statistics.median(times) * 1000:.1f} ms |")
        print(f"| latency, p99 | {sorted(times)[int(0.99 * len(times)) - 1] * 1000:.1f} ms |")
        print(f"| exporter CPU per scrape | {cpu * 1000:.1f} ms |")
        print(f"| size | {len(body) / 1024:.0f} KiB, {series:,} series |")
        print(f"| exporter RSS | {proc.memory_info().rss / 2**20:.1f} MiB |")
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait()
        for vm in vms:
            vm.kill()
            vm.wait()


if __name__ == "__main__":
    main()
