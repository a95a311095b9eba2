"""``kvmtop exporter``: KVM's own counters of every VM on the host, as Prometheus metrics.

Owns the fleet: one :class:`~kvmtop.counters.vm_stats.VmStats` per VM, taken by a brief attach when the
VM is found, then read with one pread per fd. A scrape only preads the fds held (under the
fleet's lock): it never lists processes and never attaches. Finding VMs, taking their stats and
closing the fds of VMs that ended (at once: held fds keep a VM's kernel memory alive) happen in
one background thread, the only one that changes the fleet.

With ``--sampled``, each VM is also watched (:class:`~kvmtop.sampling.watcher.Watcher`, without counters
of its own: the fleet holds them): one sampler thread per VM looks at its vCPUs' ``kvm_run``,
and a scrape adds the looks since the last one to the VM's sampled totals. The VMM is never
stopped for that.

The metric families themselves are built in :mod:`kvmtop.formats.metric_families`.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kvmtop.counters.taking import take_stats
from kvmtop.counters.vm_stats import StatsCancelled, VmStats
from kvmtop.errors import KvmtopError, NoSuchProcess, UsageError
from kvmtop.formats.metric_families import VM_LABELS, SampledTotals, VmReading, build_families
from kvmtop.host.discovery import KvmProcess, list_kvm_processes
from kvmtop.sources.watch_feed import SnapshotSource


def open_sampler(pid: int, rate_hz: float, held: VmStats | None = None) -> SnapshotSource:
    """A watch of the VM's vCPUs alone: the fleet holds its counters already (``held``, which
    the looks read to tell a vCPU blocked in KVM_RUN from one whose VMM handles an exit)."""
    from kvmtop.sampling.watcher import Watcher

    return Watcher(pid, rate_hz, counters=False, held=held)


RETRY_S = 300.0  # a VM whose stats could not be taken is tried again after this long


@dataclass(slots=True)
class WatchedVm:
    pid: int
    create_time: float
    name: str
    stats: VmStats
    next_retake: float = 0.0  # when a vCPU it does not hold may be taken again
    watcher: SnapshotSource | None = None  # with --sampled
    sampled: SampledTotals | None = None

    def close(self) -> None:
        if self.watcher is not None:  # first: its looks read the stats fds
            self.watcher.close()
        self.stats.close()


@dataclass(slots=True)
class FailedVm:
    pid: int
    create_time: float
    name: str
    next_try: float


@dataclass(slots=True)
class Fleet:
    """The VMs whose stats are held, and those that could not be taken. Only the watcher thread
    changes it; scrapes read it under ``lock``."""

    take: Callable[[int], VmStats] = take_stats
    discover: Callable[[], list[KvmProcess]] = list_kvm_processes
    log: Callable[[str], None] = lambda text: print(f"kvmtop: {text}", file=sys.stderr, flush=True)
    clock: Callable[[], float] = time.monotonic
    sampled_hz: float | None = None  # --sampled: looks a second at each vCPU's kvm_run
    sample: Callable[[int, float, VmStats], SnapshotSource] = open_sampler
    stopping: threading.Event = field(default_factory=threading.Event)  # no new take once set
    watched: dict[int, WatchedVm] = field(default_factory=dict)
    failed: dict[int, FailedVm] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def rescan(self) -> None:
        """Drop the VMs that ended, take the stats of new ones (outside the lock: a take
        attaches for a moment and must not hold up a scrape)."""
        self.drop_ended()
        found = {p.pid: p for p in self.discover()}
        with self.lock:
            for pid, vm in list(self.watched.items()):
                if pid not in found or found[pid].create_time != vm.create_time:
                    # (it may have exited since drop_ended looked)
                    self._close(pid, "ended" if vm.stats.vmm_alive() else "exited")
            for pid, bad in list(self.failed.items()):
                if pid not in found or found[pid].create_time != bad.create_time:
                    del self.failed[pid]
        now = self.clock()
        for proc in found.values():
            if self.stopping.is_set():
                return
            held = self.watched.get(proc.pid)
            if held is not None:
                if set(proc.vcpu_ids) - held.stats.vcpus.keys() and now >= held.next_retake:
                    self._take(proc, now)  # a vCPU created since: hotplug, or a VM being built
            elif proc.vcpus and (
                proc.pid not in self.failed or now >= self.failed[proc.pid].next_try
            ):
                self._take(proc, now)

    def _take(self, proc: KvmProcess, now: float) -> None:
        try:
            stats = self.take(proc.pid)
        except (NoSuchProcess, StatsCancelled):
            return  # ended meanwhile, or the exporter is stopping
        except (KvmtopError, OSError) as exc:
            self.log(f"pid {proc.pid} ({proc.name}): skipped, retried in {RETRY_S:.0f} s: {exc}")
            with self.lock:
                if proc.pid in self.watched:
                    self.watched[proc.pid].next_retake = now + RETRY_S
                else:
                    self.failed[proc.pid] = FailedVm(proc.pid, proc.create_time, proc.name,
                                                     now + RETRY_S)  # fmt: skip
            return
        vm = WatchedVm(proc.pid, proc.create_time, proc.name, stats)
        sampling = ""
        if self.sampled_hz is not None:
            try:
                vm.watcher = self.sample(proc.pid, self.sampled_hz, stats)
                vm.sampled = SampledTotals()
                sampling = f", sampling them {self.sampled_hz:g} times a second"
            except (KvmtopError, OSError) as exc:
                sampling = f"; not sampled: {exc}"
        with self.lock:
            old = self.watched.pop(proc.pid, None)
            self.failed.pop(proc.pid, None)
            self.watched[proc.pid] = vm
        if old is not None:
            old.close()
        self.log(f"pid {proc.pid} ({proc.name}): reading KVM's counters of "
                 f"{len(stats.vcpus)} vCPU(s){sampling}")  # fmt: skip

    def exit_fds(self) -> list[int]:
        """An fd per watched VMM that becomes readable when it exits."""
        with self.lock:
            return [fd for vm in self.watched.values() if (fd := vm.stats.exit_fd) is not None]

    def drop_ended(self) -> None:
        with self.lock:
            for pid in [pid for pid, vm in self.watched.items() if not vm.stats.vmm_alive()]:
                self._close(pid, "exited")

    def _close(self, pid: int, why: str) -> None:
        vm = self.watched.pop(pid)
        vm.close()
        self.log(f"pid {pid} ({vm.name}) {why}: its counters are closed")

    def readings(self) -> tuple[list[VmReading], list[FailedVm]]:
        """Every watched VM's counters now: one pread per fd, nothing else."""
        out = []
        with self.lock:
            for vm in self.watched.values():
                try:
                    sample = vm.stats.sample()
                    if vm.watcher is not None and vm.sampled is not None:
                        vm.sampled.add(vm.watcher.snapshot())
                except OSError:
                    continue  # dropped by the watcher shortly
                out.append(VmReading(vm.pid, vm.name, vm.stats.descs(),
                                     vm.stats.descs(vcpu=False), sample, vm.sampled))  # fmt: skip
            return out, list(self.failed.values())

    def close(self) -> None:
        with self.lock:
            for vm in self.watched.values():
                vm.close()
            self.watched.clear()
            self.failed.clear()


class FleetCollector(Collector):
    """The families of every watched VM, an up gauge per VM and the fleet's size."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        readings, failed = self.fleet.readings()
        yield from build_families(readings)
        up = GaugeMetricFamily("kvm_vm_up", "1: KVM's counters of the VM are read; 0: they "
                               "could not be taken (see the exporter's log)", labels=VM_LABELS)  # fmt: skip
        vcpus = GaugeMetricFamily("kvm_vm_vcpus", "vCPUs whose counters are read", labels=VM_LABELS)
        for r in readings:
            up.add_metric([str(r.pid), r.vm], 1)
            vcpus.add_metric([str(r.pid), r.vm], len(r.sample.vcpus))
        for bad in failed:
            up.add_metric([str(bad.pid), bad.name], 0)
        vms = GaugeMetricFamily("kvmtop_exporter_vms", "KVM processes by whether their "
                                "counters are read", labels=("state",))  # fmt: skip
        vms.add_metric(["ok"], len(readings))
        vms.add_metric(["failed"], len(failed))
        yield from (up, vcpus, vms)


# --- serving ------------------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6; ``:PORT``: every interface; port 0: any free
    one)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen takes HOST:PORT (e.g. 127.0.0.1:9464), not {text!r}")
    return host or "0.0.0.0", int(port)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck client does not hold up the exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass  # a line per scrape is noise


@dataclass(frozen=True, slots=True)
class VmChoice:
    """The VMs the exporter reads: those of ``pids`` and those named in ``names`` (QEMU's -name,
    as `kvmtop list` shows it); every VM on the host when both are empty."""

    pids: frozenset[int] = frozenset()
    names: frozenset[str] = frozenset()

    def __call__(self, proc: KvmProcess) -> bool:
        return not (self.pids or self.names) or proc.pid in self.pids or proc.name in self.names

    def discover(self) -> list[KvmProcess]:
        return [proc for proc in list_kvm_processes() if self(proc)]


def serve(
    host: str, port: int, sampled_hz: float | None = None, choice: VmChoice = VmChoice(),
    stopping: threading.Event | None = None,
) -> tuple[WSGIServer, Fleet]:  # fmt: skip
    """The HTTP server (not yet serving) over a new, empty fleet of the VMs ``choice`` takes.
    ``stopping`` set gives up a take under way (the exporter ends within a second)."""
    stopping = stopping or threading.Event()
    fleet = Fleet(take=partial(take_stats, cancel=stopping), discover=choice.discover,
                  sampled_hz=sampled_hz, stopping=stopping)  # fmt: skip
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet))
    ProcessCollector(registry=registry)  # the exporter's own CPU, memory and open fds
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        server_class = type("_Server", (_Server,), {"address_family": infos[0][0]})
        httpd: WSGIServer = make_server(host, port, make_wsgi_app(registry), server_class,
                                        _QuietHandler)  # fmt: skip
    except OSError as exc:
        raise KvmtopError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return httpd, fleet


def watch(fleet: Fleet, rescan_s: float, stop: threading.Event, wake_fd: int,
          failure: list[Exception]) -> None:  # fmt: skip
    """The watcher thread: rescan every ``rescan_s``, and close a VM's fds as soon as its VMM
    exits (its pidfd turns readable). What ends it unexpectedly goes to ``failure``."""
    next_scan = 0.0
    try:
        while not stop.is_set():
            if time.monotonic() >= next_scan:
                fleet.rescan()
                next_scan = time.monotonic() + rescan_s
            timeout = max(0.0, next_scan - time.monotonic())
            ready, _, _ = select.select([wake_fd, *fleet.exit_fds()], [], [], timeout)
            if ready and ready != [wake_fd]:
                fleet.drop_ended()
    except Exception as exc:  # reported by run_exporter as one line
        failure.append(exc)


def run_exporter(listen: str, rescan_s: float, stop: threading.Event,
                 sampled_hz: float | None = None, choice: VmChoice = VmChoice()) -> int:  # fmt: skip
    """Serve until ``stop`` is set; then close every fd and return 0."""
    host, port = parse_listen(listen)
    httpd, fleet = serve(host, port, sampled_hz, choice, stop)
    where = f"[{host}]:{httpd.server_port}" if ":" in host else f"{host}:{httpd.server_port}"
    print(f"kvmtop: exporter listening on http://{where}/metrics", file=sys.stderr, flush=True)
    wake_r, wake_w = os.pipe()
    failure: list[Exception] = []
    server = threading.Thread(target=httpd.serve_forever, name="kvmtop-http", daemon=True)
    watcher = threading.Thread(target=watch, args=(fleet, rescan_s, stop, wake_r, failure),
                               name="kvmtop-watcher", daemon=True)  # fmt: skip
    server.start()
    watcher.start()
    try:
        while not stop.wait(1.0):
            if failure:
                raise KvmtopError(f"the exporter stopped finding VMs: {failure[0]!r}")
    finally:
        stop.set()
        os.write(wake_w, b"x")
        httpd.shutdown()
        httpd.server_close()
        watcher.join(30)  # a take under way finishes (its attach is bounded) before the close
        fleet.close()
        os.close(wake_r)
        os.close(wake_w)
    return 0
