"""Draw a window of a `kvmtop export --perfetto` trace as an SVG: the tracks and slices
ui.perfetto.dev shows, one row per vCPU, guest runs and VMM handling periods.

    python docs/make_trace_picture.py TRACE.json OUT.svg [--from-ms 100] [--width-us 300]

Without arguments it remakes docs/trace-demo.svg: the demo guest recorded for 3 s with
`kvmtop record --no-seccomp`, exported, and its busiest 300 µs drawn.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import subprocess
import sys
import tempfile

DOCS = os.path.dirname(os.path.abspath(__file__))
COLOURS = {"guest": "#4e79a7", "vmm": "#f28e2b", "guest+vmm": "#b07aa1"}
ROW, LABEL_W, PAD = 34, 70, 6


def draw(trace: dict[str, object], from_us: float, width_us: float, px: int = 1100) -> str:
    events = trace["traceEvents"]
    assert isinstance(events, list)
    names = {e["tid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    tids = sorted(names)
    scale = px / width_us
    height = PAD * 2 + ROW * len(tids) + 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_W + px + PAD}" '
           f'height="{height}" font-family="monospace" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']  # fmt: skip
    for row, tid in enumerate(tids):
        y = PAD + row * ROW
        out.append(f'<text x="4" y="{y + ROW / 2 + 4}">{html.escape(names[tid])}</text>')
        for e in events:
            if e.get("ph") != "X" or e["tid"] != tid:
                continue
            start, end = e["ts"] - from_us, e["ts"] + e["dur"] - from_us
            if end < 0 or start > width_us:
                continue
            x0, x1 = LABEL_W + max(0.0, start) * scale, LABEL_W + min(width_us, end) * scale
            colour = COLOURS.get(e.get("cat", ""), "#999")
            out.append(f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(0.5, x1 - x0):.1f}" '
                       f'height="{ROW - 8}" fill="{colour}" stroke="white" stroke-width="0.5">'
                       f'<title>{html.escape(e["name"])} {e["dur"]:.1f} µs</title></rect>')  # fmt: skip
            label = e["name"]
            if x1 - x0 > 7 * len(label):
                out.append(f'<text x="{x0 + 3:.1f}" y="{y + ROW / 2 + 4}" fill="white">'
                           f"{html.escape(label)}</text>")  # fmt: skip
    y = PAD + ROW * len(tids) + 14
    for tick in range(0, 11):
        x = LABEL_W + tick * px / 10
        out.append(f'<text x="{x:.0f}" y="{y}" text-anchor="middle" fill="#555">'
                   f"{from_us / 1000 + tick * width_us / 10000:.3f} ms</text>")  # fmt: skip
    out.append("</svg>")
    return "\n".join(out)


def busiest_start(trace: dict[str, object], width_us: float) -> float:
    """Where a window of ``width_us`` holds the most slices."""
    events = trace["traceEvents"]
    assert isinstance(events, list)
    starts = sorted(e["ts"] for e in events if e.get("ph") == "X")
    best, best_at, j = 0, 0.0, 0
    for i, t in enumerate(starts):
        while starts[j] < t - width_us:
            j += 1
        if i - j > best:
            best, best_at = i - j, t - width_us
    return max(0.0, best_at)


def demo_trace(tmp: str) -> str:
    recording, trace = os.path.join(tmp, "demo.kvmtop"), os.path.join(tmp, "demo.json")
    kvmtop = [sys.executable, "-m", "kvmtop"]
    subprocess.run([*kvmtop, "record", "--no-seccomp", "-o", recording, "--", sys.executable,
                    "-m", "kvmtop.minivmm", "demo", "--duration", "3"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*kvmtop, "export", recording, "--perfetto", trace], check=True)
    return trace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace", nargs="?")
    parser.add_argument("out", nargs="?", default=os.path.join(DOCS, "trace-demo.svg"))
    parser.add_argument("--from-ms", type=float, help="default: the busiest window")
    parser.add_argument("--width-us", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with open(args.trace or demo_trace(tmp)) as f:
            trace = json.load(f)
    with open(args.out, "w") as f:
        start = args.from_ms * 1000 if args.from_ms is not None else None
        f.write(draw(trace, start or busiest_start(trace, args.width_us), args.width_us))


if __name__ == "__main__":
    main()
