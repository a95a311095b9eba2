"""Numbers as people read them, for tables and panes alike."""

from __future__ import annotations


def human(n: float) -> str:
    """1234 -> 1.2k: keeps columns narrow."""
    if n < 1000:
        return f"{n:.0f}"
    for unit, size in (("k", 1e3), ("M", 1e6), ("G", 1e9)):
        if n < size * 1000:
            return f"{n / size:.1f}{unit}"
    return f"{n / 1e12:.1f}T"


def duration(ns: int, sep: str = "") -> str:
    """Nanoseconds in a unit that keeps it short: 870ns, 42.1µs, 3.0ms, 12.5s."""
    if ns < 1000:
        return f"{ns}{sep}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f}{sep}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f}{sep}ms"
    return f"{ns / 1e9:.1f}{sep}s"


def duration_span(low_ns: float, high_ns: float, sep: str = "") -> str:
    """A range of times: 97.5µs–161.2µs."""
    return f"{duration(round(low_ns), sep)}–{duration(round(high_ns), sep)}"


def size(n: int) -> str:
    """Bytes: 512 MiB, 1.5 GiB."""
    for unit, step in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def elapsed(seconds: float) -> str:
    """3725 -> 1:02:05."""
    s = int(seconds)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def command_text(argv: list[str] | tuple[str, ...], width: int) -> str:
    """``argv`` as one line of at most about ``width`` characters, cut between arguments, never
    inside one, and saying how many are left out: "qemu-system-x86_64 -enable-kvm … (+9 more)".
    The first argument is always whole."""
    if not argv:
        return ""
    shown = [argv[0]]
    for i, arg in enumerate(argv[1:], 1):
        rest = len(argv) - i - 1
        tail = f" … (+{rest} more)" if rest else ""
        if len(" ".join([*shown, arg])) + len(tail) > width:
            break
        shown.append(arg)
    left = len(argv) - len(shown)
    return " ".join(shown) + (f" … (+{left} more)" if left else "")


def ended_text(status: int) -> str:
    """How a process ended, from its shell-style status (128 + the signal that killed it, as
    kvmtop and shells report it): "exited with status 3", "was killed by SIGKILL (status 137)"."""
    import signal

    if 128 < status < 128 + signal.NSIG:
        try:
            return f"was killed by {signal.Signals(status - 128).name} (status {status})"
        except ValueError:  # a real-time signal: no name
            return f"was killed by signal {status - 128} (status {status})"
    return f"exited with status {status}"
