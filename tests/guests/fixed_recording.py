"""A deterministic recording: 2 vCPUs, 30 s, a mix of reasons that changes every 10 s. The TUI's
snapshot and replay tests are fed from it, so what they show never varies."""

from __future__ import annotations

from kvmtop.formats.recording import RecordingMeta, RecordingWriter
from kvmtop.model.events import ExitEvent, VcpuSeen
from kvmtop.model.messages import Detached, ExitBatch

START = 1_000_000_000_000
S = 1_000_000_000


def events() -> list[ExitEvent]:
    out = []
    for second in range(30):
        for vcpu in (0, 1):
            phase = (second // 10 + vcpu) % 3
            n = (40, 25, 10)[phase] + second % 5
            for i in range(n):
                t = START + second * S + vcpu * 1000 + i * (S // n)
                guest = 20_000 + (i % 7) * 3_000
                if phase == 0:
                    e = ExitEvent(vcpu, 2, 0, t, t + guest, 0x3F8, 1 | 1 << 8, 1)
                elif phase == 1:
                    e = ExitEvent(vcpu, 6, 0, t, t + guest, 0xD0010 + 4 * (i % 2), 4, i % 2)
                elif i % 3:
                    e = ExitEvent(vcpu, 2, 0, t, t + guest, 0xCFC, 4 | 1 << 8, 0)
                else:
                    e = ExitEvent(vcpu, 5, 0, t, t + 5 * guest)
                out.append(e)
    out.append(ExitEvent(1, 10, 4, START + 29 * S + 5, START + 29 * S + 900))
    return sorted(out, key=lambda e: e.exit_ns)


def write_fixed_recording(path: str) -> str:
    meta = RecordingMeta(pid=4242, argv=("qemu-system-x86_64", "-name", "fixed"), launched=False,
                         start_ns=START, start_wall=1_760_000_000.0, with_data=False,
                         hostname="testhost", kernel="6.18")  # fmt: skip
    writer = RecordingWriter.create(path, meta, with_data=False)
    writer.write_batch(
        ExitBatch.of((), START, (VcpuSeen(0, 4243, START), VcpuSeen(1, 4244, START)))
    )
    evs = events()
    for i in range(0, len(evs), 500):
        writer.write_batch(ExitBatch.of(evs[i : i + 500], START, stops=2 * len(evs[i : i + 500])))
    writer.write_detached(Detached(4242, "detached", START + 30 * S))
    writer.close()
    return path
