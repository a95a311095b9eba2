"""The sampler: one thread that reads every watched vCPU's ``struct kvm_run`` at a steady,
jittered rate and counts what it sees (:mod:`kvmtop.sampling.shares` says what the counts mean).

:func:`make_sampler` gives the C sampler (``kvmtop.native._sampler``: its own thread, no GIL, a few
loads per vCPU a look) when it was built, else :class:`PySampler`, its reference in Python, with
the same interface: ``add(buffer[, stats_fd, blocking_at]) -> index`` before ``start()``,
``take()``, ``stop()``. It only reads kvmtop's own read-only mappings, and where kvmtop holds the
vCPU's stats fd, its ``blocking`` counter when a look sees a reason (a stale one stays while the
vCPU waits inside ``KVM_RUN``): no syscall touches the VMM.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from typing import Any

from kvmtop import native
from kvmtop.abi.kvm import RUN_EXIT_REASON, RUN_UNION
from kvmtop.sampling.shares import KEY_OTHER, KEY_TORN, MMIO_WRITE
from kvmtop.xlat_exit import ExitReason

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
MAX_RATE_HZ = 100_000
SLOTS = 256  # (reason, key) counters per vCPU between two takes, as the C sampler keeps

Taken = tuple[int, int, list[tuple[int, int, list[tuple[int, int, int]], int]]]


class PySampler:
    """The sampler in Python: slower (the GIL), the reference."""

    def __init__(self, rate_hz: float, seed: int) -> None:
        if not 0 < rate_hz <= MAX_RATE_HZ:
            raise ValueError(f"the rate must be above 0 and at most {MAX_RATE_HZ} Hz")
        self._interval_s = 1.0 / rate_hz
        self._random = random.Random(seed)
        self._views: list[memoryview] = []
        self._blocking: list[tuple[int, int]] = []  # (stats fd or -1, offset of `blocking`)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = time.monotonic_ns()
        self._looks = 0
        self._counts: list[list[Any]] = []

    def add(self, buffer: Any, stats_fd: int = -1, blocking_at: int = 0) -> int:
        if self._thread is not None:
            raise RuntimeError("add before start")
        self._views.append(memoryview(buffer))
        self._blocking.append((stats_fd, blocking_at))
        self._counts.append([0, 0, {}, 0])
        return len(self._views) - 1

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
        while not self._stopping.is_set():
            # 0.5..1.5 intervals: a mean of one, and no lock-step with the guest's timers
            next_s = max(
                time.monotonic(), next_s + self._interval_s * (0.5 + self._random.random())
            )
            delay = next_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            with self._lock:
                for view, blocking, counts in zip(self._views, self._blocking, self._counts,
                                                  strict=True):  # fmt: skip
                    self._look(view, blocking, counts)
                self._looks += 1

    @staticmethod
    def _look(run: memoryview, blocking: tuple[int, int], counts: list[Any]) -> None:
        reason = U32.unpack_from(run, RUN_EXIT_REASON)[0]
        counts[0] += 1
        if reason == 0:
            counts[1] += 1
            return
        fd, at = blocking
        if fd >= 0 and any(os.pread(fd, 8, at)):  # waiting inside KVM_RUN: a stale reason
            counts[1] += 1
            counts[3] += 1
            return
        key = 0
        if reason == ExitReason.IO:
            key = U32.unpack_from(run, RUN_UNION)[0] >> 16 | (run[RUN_UNION] != 0) << 16
        elif reason == ExitReason.MMIO:
            key = U64.unpack_from(run, RUN_UNION)[0] | (MMIO_WRITE if run[RUN_UNION + 20] else 0)
        if U32.unpack_from(run, RUN_EXIT_REASON)[0] != reason:
            key = KEY_TORN  # the VMM ran the vCPU again
        keys = counts[2]
        if (reason, key) not in keys and len(keys) >= SLOTS:
            key = KEY_OTHER
        keys[(reason, key)] = keys.get((reason, key), 0) + 1

    def take(self) -> Taken:
        with self._lock:
            now = time.monotonic_ns()
            out = (now - self._since, self._looks,
                   [(s, r, [(k[0], k[1], n) for k, n in keys.items()], stale)
                    for s, r, keys, stale in self._counts])  # fmt: skip
            self._since, self._looks = now, 0
            self._counts = [[0, 0, {}, 0] for _ in self._counts]
        return out


def make_sampler(rate_hz: float, seed: int | None = None) -> Any:
    """The C sampler when it was built (and KVMTOP_PURE is not set), else :class:`PySampler`."""
    seed = random.getrandbits(63) if seed is None else seed
    module = native.load("_sampler")
    if module is not None:
        return module.Sampler(float(rate_hz), seed)
    return PySampler(rate_hz, seed)
