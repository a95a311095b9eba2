"""The sampler: one thread that reads every watched vCPU's ``struct kvm_run`` at a steady,
jittered rate and counts what it sees (:mod:`kvmtop.sampling.shares` says what the counts mean).

:func:`make_sampler` gives the C sampler (``kvmtop.native._sampler``: its own thread, no GIL, a few
loads per vCPU a look) when it was built, else :class:`PySampler`, its reference in Python, with
the same interface: ``add(buffer[, stats_fd, blocking_at, exits_at]) -> index`` before ``start()``,
``rip(index)`` (the guest's RIP at that vCPU's exits too, once kvmtop has set its
``kvm_valid_regs``), ``take()``, ``stop()``. It only reads kvmtop's own read-only mappings, and where kvmtop holds the
vCPU's stats fd, its ``blocking`` counter when a look sees a reason (a stale one stays while the
vCPU waits inside ``KVM_RUN``), and its ``exits`` counter when the reason is one after which a
VMM does not run the vCPU again (:data:`HELD_REASONS`; KVM may write one and run the guest on):
such a look waits for the vCPU's next, and is stale if the guest ran meanwhile. No syscall
touches the VMM. ``take()`` also gives the sampling thread's CPU time, in all and per vCPU by the
reason its look saw: a look on the vCPU thread's CPU stretches the state it saw by that long,
unseen (``sampler.c`` says more; :mod:`kvmtop.sampling.shares` bounds by it).
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from typing import Any

from kvmtop import native
from kvmtop.abi.arch.x86_64 import SYNC_REGS, SYNC_REGS_SIZE, SYNC_RIP, guest_rip
from kvmtop.abi.kvm import RUN_EXIT_REASON, RUN_UNION
from kvmtop.sampling.shares import KEY_OTHER, KEY_TORN, MMIO_WRITE, STRETCH_REASONS
from kvmtop.xlat_exit import ExitReason

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
MAX_RATE_HZ = 100_000
SLOTS = 256  # (reason, key) counters per vCPU between two takes, as the C sampler keeps

# per vCPU, with guest RIPs asked: (looks, unstable, ((reason, rip, linear, cpl, n), ...), live)
CodeTaken = tuple[int, int, list[tuple[int, int, int, int, int]], bool]
# (ns, looks, per vCPU (samples, in_run, keys, stale, code, ((reason, cpu_ns), ...)), cpu_ns)
VcpuTaken = tuple[
    int, int, list[tuple[int, int, int]], int, CodeTaken | None, list[tuple[int, int]]
]
Taken = tuple[int, int, list[VcpuTaken], int]
RIP_OFF, RIP_WAIT, RIP_LIVE = 0, 1, 2  # as sampler.c: not asked, waiting for a run, counted
HELD_REASONS = (ExitReason.INTERNAL_ERROR, ExitReason.FAIL_ENTRY)  # looks settled at the next


class PySampler:
    """The sampler in Python: slower (the GIL), the reference."""

    def __init__(self, rate_hz: float, seed: int, held: tuple[int, ...] = ()) -> None:
        if not 0 < rate_hz <= MAX_RATE_HZ:
            raise ValueError(f"the rate must be above 0 and at most {MAX_RATE_HZ} Hz")
        self._interval_s = 1.0 / rate_hz
        self._held_reasons = frozenset(held)
        self._random = random.Random(seed)
        self._views: list[memoryview] = []
        # (stats fd or -1, offset of `blocking`, of `exits` or -1)
        self._stats: list[tuple[int, int, int]] = []
        self._held: list[tuple[int, int] | None] = []  # (reason, `exits`) of a look held
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = time.monotonic_ns()
        self._looks = 0
        self._counts: list[list[Any]] = []
        self._rip: list[int] = []
        self._code: list[list[Any]] = []  # [looks, unstable, {(reason, rip, linear, cpl): n}]
        self._first: list[tuple[int, bytes] | None] = []  # RIP_WAIT: the page's exit at rip()
        # the reason each vCPU's last look counted as the VMM's (0: none)
        self._seen: list[int] = []
        self._stretch: list[dict[int, int]] = []  # the thread's CPU ns after looks by reason
        self._cpu_ns = 0  # the thread's CPU ns since the last take

    def add(self, buffer: Any, stats_fd: int = -1, blocking_at: int = 0, exits_at: int = -1) -> int:
        if self._thread is not None:
            raise RuntimeError("add before start")
        self._views.append(memoryview(buffer))
        self._stats.append((stats_fd, blocking_at, exits_at))
        self._held.append(None)
        self._counts.append([0, 0, {}, 0])
        self._rip.append(RIP_OFF)
        self._code.append([0, 0, {}])
        self._first.append(None)
        self._seen.append(0)
        self._stretch.append({})
        return len(self._views) - 1

    def rip(self, index: int) -> None:
        with self._lock:
            if self._rip[index] == RIP_OFF:
                self._rip[index] = RIP_WAIT
                self._first[index] = _exit_of(self._views[index])

    def start(self) -> None:
        if self._thread is None:
            self._since = time.monotonic_ns()
            self._thread = threading.Thread(target=self._loop, name="kvmtop-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        for view in self._views:
            view.release()
        self._views.clear()

    def _loop(self) -> None:
        next_s = time.monotonic()
        cycle_at = None  # the thread's CPU clock at the last wake
        while not self._stopping.is_set():
            # 0.5..1.5 intervals: a mean of one, and no lock-step with the guest's timers
            next_s = max(
                time.monotonic(), next_s + self._interval_s * (0.5 + self._random.random())
            )
            delay = next_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with self._lock:
                cpu_at = time.thread_time_ns()
                if cycle_at is not None:  # the last cycle: its look, its sleep, this wake
                    self._cpu_ns += cpu_at - cycle_at
                    for seen, stretch in zip(self._seen, self._stretch, strict=True):
                        if seen:
                            seen = min(seen, STRETCH_REASONS - 1)  # as sampler.c
                            stretch[seen] = stretch.get(seen, 0) + cpu_at - cycle_at
                cycle_at = cpu_at
                for i, (view, stats, counts) in enumerate(
                    zip(self._views, self._stats, self._counts, strict=True)
                ):
                    self._look(i, view, stats, counts)
                self._looks += 1

    def _settle_held(self, i: int, stats: tuple[int, int, int], counts: list[Any]) -> None:
        """The look held at a reason after which a VMM does not run the vCPU again: in KVM_RUN
        (stale) if the guest ran since (its ``exits`` counter moved), else the VMM's."""
        held = self._held[i]
        assert held is not None
        self._held[i] = None
        reason, exits = held
        counts[0] += 1
        live = self._rip[i] == RIP_LIVE
        if _stat(stats[0], stats[2]) not in (None, exits):
            counts[1] += 1
            counts[3] += 1
            self._code[i][0] += live
        else:
            _count(counts[2], (reason, 0), (reason, KEY_OTHER))
            self._code[i][1] += live  # its RIP was not read

    def _look(
        self, i: int, run: memoryview, stats: tuple[int, int, int], counts: list[Any]
    ) -> None:
        if self._held[i] is not None:
            self._settle_held(i, stats, counts)
        self._seen[i] = 0
        reason = U32.unpack_from(run, RUN_EXIT_REASON)[0]
        fd, at, exits_at = stats
        if reason in self._held_reasons and fd >= 0 and exits_at >= 0:
            exits = _stat(fd, exits_at)
            if exits is not None:
                self._held[i] = (reason, exits)  # counted at the next look
                self._seen[i] = reason
                return
        counts[0] += 1
        if reason == 0 or fd >= 0 and any(os.pread(fd, 8, at)):  # (blocked: a stale reason)
            counts[1] += 1
            counts[3] += reason != 0
            if self._rip[i] == RIP_WAIT:  # entered KVM_RUN since: s.regs is synced
                self._rip[i] = RIP_LIVE
            self._code[i][0] += self._rip[i] == RIP_LIVE
            return
        if self._rip[i] == RIP_WAIT:  # a KVM_RUN since rip(): a new exit, or new registers
            if _exit_of(run) != self._first[i]:
                self._rip[i] = RIP_LIVE
        key = 0
        if reason == ExitReason.IO:
            key = U32.unpack_from(run, RUN_UNION)[0] >> 16 | (run[RUN_UNION] != 0) << 16
        elif reason == ExitReason.MMIO:
            key = U64.unpack_from(run, RUN_UNION)[0] | (MMIO_WRITE if run[RUN_UNION + 20] else 0)
        synced = guest_rip(run) if self._rip[i] == RIP_LIVE else None
        again = U32.unpack_from(run, RUN_EXIT_REASON)[0]
        if again != reason:
            key = KEY_TORN  # the VMM ran the vCPU again
        _count(counts[2], (reason, key), (reason, KEY_OTHER))
        self._seen[i] = reason
        if self._rip[i] != RIP_LIVE:
            return
        code = self._code[i]
        if (
            synced is not None
            and again == reason
            and U64.unpack_from(run, SYNC_RIP)[0] == synced[0]
        ):
            code[0] += 1
            _count(code[2], (reason, *synced), (reason, KEY_OTHER, KEY_OTHER, -1))
        else:
            code[1] += 1  # the two reads differ (or the field was cleared): not kept

    def take(self) -> Taken:
        with self._lock:
            now = time.monotonic_ns()
            out = (now - self._since, self._looks,
                   [(s, r, [(k[0], k[1], n) for k, n in keys.items()], stale,
                     None if state == RIP_OFF else
                     (code[0], code[1], [(*k, n) for k, n in code[2].items()], state == RIP_LIVE),
                     sorted(stretch.items()))
                    for (s, r, keys, stale), state, code, stretch in
                    zip(self._counts, self._rip, self._code, self._stretch, strict=True)],
                   self._cpu_ns)  # fmt: skip
            self._since, self._looks, self._cpu_ns = now, 0, 0
            self._counts = [[0, 0, {}, 0] for _ in self._counts]
            self._code = [[0, 0, {}] for _ in self._code]
            self._stretch = [{} for _ in self._stretch]
        return out


def _exit_of(run: memoryview) -> tuple[int, bytes]:
    """The exit a page shows: its reason and the registers synced into it."""
    return U32.unpack_from(run, RUN_EXIT_REASON)[0], bytes(
        run[SYNC_REGS : SYNC_REGS + SYNC_REGS_SIZE]
    )


def _count(table: dict[Any, int], key: Any, other: Any) -> None:
    """One more of ``key`` in a table of at most SLOTS keys (beyond: ``other``)."""
    if key not in table and len(table) >= SLOTS:
        key = other
    table[key] = table.get(key, 0) + 1


def make_sampler(rate_hz: float, seed: int | None = None) -> Any:
    """The C sampler when it was built (and KVMTOP_PURE is not set), else :class:`PySampler`."""
    seed = random.getrandbits(63) if seed is None else seed
    module = native.load("_sampler")
    if module is not None:
        return module.Sampler(float(rate_hz), seed, HELD_REASONS)
    return PySampler(rate_hz, seed, HELD_REASONS)


def _stat(fd: int, at: int) -> int | None:
    """A vCPU's counter at ``at`` in its stats fd (None: unreadable)."""
    try:
        data = os.pread(fd, 8, at)
    except OSError:
        return None
    return U64.unpack(data)[0] if len(data) == 8 else None
