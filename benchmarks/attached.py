"""What the benchmarks that check kvmtop against the C VMM (benchmarks/guests/timed_vmm.c)
share: building it, and tracing a VMM attached for some seconds to read the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from conftest import TIMED_VMM  # noqa: E402
from helpers import held_timed_vmm, let_go, own_clock, wait_for_vcpus  # noqa: E402,F401 (for the benchmarks too)


def build_timed_vmm(directory: str) -> str:
    binary = os.path.join(directory, "timed_vmm")
    subprocess.run(["cc", "-O2", "-o", binary, TIMED_VMM], check=True)
    return binary


def attached_report(argv: list[str], seconds: float, directory: str) -> dict:
    """Start ``argv`` (a VMM), trace it attached with ptrace (two stops per exit: what NET
    takes out; as root the default engine would be the tracepoints) for ``seconds``, kill it:
    the report's JSON."""
    vmm = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_for_vcpus(vmm.pid)
        out = os.path.join(directory, "attached.kvmtop")
        subprocess.run([sys.executable, "-m", "kvmtop", "record", "--engine", "ptrace", "-o", out,
                        "-p", str(vmm.pid), "--duration", str(seconds)],
                       check=True, capture_output=True)  # fmt: skip
    finally:
        vmm.kill()
        vmm.wait()
    report = subprocess.run([sys.executable, "-m", "kvmtop", "report", out, "--json"],
                            check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(report.stdout)


def mean(latency: dict[str, int]) -> float:
    """A latency's mean (ns): exact, where its percentiles are a log2 bucket's interpolation."""
    return latency["total_ns"] / latency["count"]
