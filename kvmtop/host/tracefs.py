"""KVM's tracepoints as this host offers them: where tracefs is, each event's id and fields
(its ``format`` file), and whether this process may open them through perf_event_open. Reads
only: kvmtop never writes tracefs (no ``enable`` file); its perf events die with its fds.
"""

from __future__ import annotations

import os

from kvmtop.decoder import TraceField, tracepoint_format

TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
CAP_SYS_ADMIN, CAP_PERFMON = 21, 38


def tracefs_root() -> str | None:
    """The mounted tracefs with KVM's events, or None."""
    for root in TRACEFS:
        if os.path.isdir(os.path.join(root, "events", "kvm")):
            return root
    return None


def event_format(root: str, event: str) -> tuple[int, dict[str, TraceField]] | None:
    """(id, fields) of ``event`` ("kvm/kvm_pio"), or None where this kernel has no such event."""
    try:
        with open(os.path.join(root, "events", event, "format")) as f:
            return tracepoint_format(f.read())
    except OSError:
        return None


def _capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def paranoid() -> int | None:
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def why_not() -> str:
    """Why this process cannot open KVM's tracepoints for every CPU ("": it can)."""
    caps = _capabilities()
    level = paranoid()
    allowed = caps & (1 << CAP_PERFMON | 1 << CAP_SYS_ADMIN) or (level is not None and level <= -1)
    if not allowed:
        return f"perf_event_paranoid {level} and no CAP_PERFMON"
    if not os.path.isdir("/sys/kernel/tracing") and not os.path.isdir("/sys/kernel/debug/tracing"):
        return "no tracefs on this host"
    if tracefs_root() is None:
        return ("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing) or has no "
                "KVM events (kvm module not loaded)")  # fmt: skip
    return ""
