"""The Prometheus exporter: metric families from fixed samples (names, types, labels, histogram
buckets in seconds), the fleet's bookkeeping, and the real thing serving every VM on the host
over loopback, picking up VMs, dropping those that end, never leaving one traced."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Any

import pytest
from helpers import KVMTOP, kvm_fds_of, start_minivmm, wait_for_vcpus
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvmtop.abi.binary_stats import (
    CUMULATIVE,
    INSTANT,
    LINEAR_HIST,
    LOG_HIST,
    PEAK,
    StatDesc,
    StatsFile,
)
from kvmtop.abi.ptrace_abi import pidfd_getfd
from kvmtop.commands.exporter import RETRY_S, Fleet, FleetCollector, parse_listen
from kvmtop.counters.vm_stats import StatsSample
from kvmtop.errors import NoSuchProcess, PermissionDenied, UsageError
from kvmtop.formats.metric_families import VmReading, build_families, plan_metrics
from kvmtop.host.discovery import KvmProcess
from kvmtop.host.procfs import fd_table, tracer_pid
from kvmtop.minivmm.vmm import counted_command
from kvmtop.tracer_thread import Tracer


def desc(name: str, kind: int, unit: str = "", exponent: int = 0, size: int = 1,
         bucket_size: int = 0, base: int = 10) -> StatDesc:  # fmt: skip
    return StatDesc(name, kind, unit, base, exponent, size, 0, bucket_size)


VCPU_DESCS = (
    desc("exits", CUMULATIVE),
    desc("halt_wait_ns", CUMULATIVE, "seconds", -9),
    desc("halt_wait_hist", LOG_HIST, "seconds", -9, size=4),
    desc("blocking", INSTANT, "boolean"),
    desc("batch_hist", LINEAR_HIST, size=3, bucket_size=10),
)
VM_DESCS = (
    desc("remote_tlb_flush", CUMULATIVE),
    desc("pages_4k", INSTANT),
    desc("max_mmu_rmap_size", PEAK),
)


def vcpu_values(exits: int) -> dict[str, int | tuple[int, ...]]:
    return {"exits": exits, "halt_wait_ns": 1500, "halt_wait_hist": (0, 1, 0, 9),
            "blocking": 1, "batch_hist": (2, 0, 5)}  # fmt: skip


READINGS = [
    VmReading(10, "web", VCPU_DESCS, VM_DESCS,
              StatsSample(0, {"remote_tlb_flush": 4, "pages_4k": 256, "max_mmu_rmap_size": 3},
                          {0: vcpu_values(7)})),
    VmReading(20, "db", VCPU_DESCS, VM_DESCS,
              StatsSample(0, {"remote_tlb_flush": 0, "pages_4k": 1, "max_mmu_rmap_size": 0},
                          {0: vcpu_values(100), 1: vcpu_values(200)})),
]  # fmt: skip


def exposed(families: list[Any]) -> dict[str, Any]:
    """What a scraper gets: the families through prometheus_client's text format and parser."""

    class Fixed:
        def collect(self) -> list[Any]:
            return families

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def values_of(family: Any, sample_name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if s.name == sample_name}  # fmt: skip


def test_every_stat_becomes_a_family_named_in_base_units_with_its_kind():
    got = {f.name: f.type for f in build_families(READINGS)}
    assert got == {
        "kvm_vcpu_exits": "counter",
        "kvm_vcpu_halt_wait_seconds": "histogram",  # halt_wait_ns is its _sum, not a family
        "kvm_vcpu_blocking": "gauge",
        "kvm_vcpu_batch": "histogram",
        "kvm_vm_remote_tlb_flush": "counter",
        "kvm_vm_pages_4k": "gauge",
        "kvm_vm_max_mmu_rmap_size": "gauge",
    }


def test_counters_and_gauges_carry_pid_vm_and_vcpu_labels():
    fams = exposed(build_families(READINGS))
    exits = values_of(fams["kvm_vcpu_exits"], "kvm_vcpu_exits_total")
    assert exits == {
        (("pid", "10"), ("vcpu", "0"), ("vm", "web")): 7,
        (("pid", "20"), ("vcpu", "0"), ("vm", "db")): 100,
        (("pid", "20"), ("vcpu", "1"), ("vm", "db")): 200,
    }
    pages = values_of(fams["kvm_vm_pages_4k"], "kvm_vm_pages_4k")
    assert pages == {(("pid", "10"), ("vm", "web")): 256, (("pid", "20"), ("vm", "db")): 1}
    assert (
        values_of(fams["kvm_vm_remote_tlb_flush"], "kvm_vm_remote_tlb_flush_total")[
            (("pid", "10"), ("vm", "web"))
        ]
        == 4
    )


def test_a_log2_histogram_is_cumulative_in_seconds_with_the_matching_counter_as_sum():
    fam = exposed(build_families(READINGS))["kvm_vcpu_halt_wait_seconds"]
    one = (("pid", "10"), ("vcpu", "0"), ("vm", "web"))
    buckets = {
        dict(labels)["le"]: v
        for labels, v in values_of(fam, "kvm_vcpu_halt_wait_seconds_bucket").items()
        if tuple(kv for kv in labels if kv[0] != "le") == one
    }
    # KVM's log2 buckets hold whole ns: 0 | 1 | 2..3 | 4 and above; counts 0, 1, 0, 9
    assert buckets == {"0.0": 0, "1e-09": 1, "3e-09": 1, "+Inf": 10}
    assert values_of(fam, "kvm_vcpu_halt_wait_seconds_count")[one] == 10
    assert values_of(fam, "kvm_vcpu_halt_wait_seconds_sum")[one] == pytest.approx(1.5e-6)


def test_a_linear_histogram_without_a_matching_counter_has_buckets_but_no_sum():
    fam = exposed(build_families(READINGS))["kvm_vcpu_batch"]
    buckets = {dict(labels)["le"]: v for labels, v in
               values_of(fam, "kvm_vcpu_batch_bucket").items() if ("pid", "10") in labels}  # fmt: skip
    assert buckets == {"9.0": 2, "19.0": 2, "+Inf": 7}  # +Inf is the count
    # prometheus_client writes _count only beside a _sum, which the buckets cannot give
    assert not values_of(fam, "kvm_vcpu_batch_sum") and not values_of(fam, "kvm_vcpu_batch_count")


@pytest.mark.parametrize(
    ("stat", "family", "kind", "raw", "value"),
    [
        (desc("halt_poll_fail_ns", CUMULATIVE, "seconds", -9), "kvm_vcpu_halt_poll_fail_seconds",
         "counter", 2_500_000_000, 2.5),
        (desc("steal_us", CUMULATIVE, "seconds", -6), "kvm_vcpu_steal_seconds", "counter", 1500,
         0.0015),
        (desc("shadow_pages", INSTANT, "bytes", 12, base=2), "kvm_vcpu_shadow_pages_bytes",
         "gauge", 3, 3 * 4096),
        (desc("tsc_offset", INSTANT, "cycles"), "kvm_vcpu_tsc_offset_cycles", "gauge", 9, 9),
        (desc("guest_mode", INSTANT, "boolean"), "kvm_vcpu_guest_mode", "gauge", 1, 1),
    ],
)  # fmt: skip
def test_units_become_base_units_in_name_and_value(stat, family, kind, raw, value):
    [plan] = plan_metrics("vcpu", (stat,))
    assert (plan.family, plan.kind) == (family, kind)
    reading = VmReading(1, "v", (stat,), (), StatsSample(0, {}, {0: {stat.name: raw}}))
    [fam] = build_families([reading])
    assert fam.samples[0].value == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)),
     ("localhost:80", ("localhost", 80)), (":9464", ("0.0.0.0", 9464))],
)  # fmt: skip
def test_listen_addresses_are_host_and_port_and_no_host_is_every_interface(text, address):
    assert parse_listen(text) == address


@pytest.mark.parametrize("text", ["9464", "127.0.0.1", "127.0.0.1:http", ":", "h:70000"])
def test_a_malformed_listen_address_is_a_usage_error(text):
    with pytest.raises(UsageError, match="HOST:PORT"):
        parse_listen(text)


# --- the fleet's bookkeeping, with stand-ins for the VMs ----------------------------------------


class FakeStats:
    def __init__(self, pid: int, vcpus: int = 1) -> None:
        self.pid = pid
        self.vcpus = dict.fromkeys(range(vcpus), None)
        self.alive = True
        self.closed = False
        self.exit_fd: int | None = None

    def vmm_alive(self) -> bool:
        return self.alive

    def close(self) -> None:
        self.closed = True

    def descs(self, vcpu: bool = True) -> tuple[StatDesc, ...]:
        return VCPU_DESCS if vcpu else VM_DESCS

    def sample(self) -> StatsSample:
        return StatsSample(0, READINGS[0].sample.vm, dict.fromkeys(self.vcpus, vcpu_values(1)))


def kvm_proc(pid: int, vcpus: int = 1, create_time: float = 1.0) -> KvmProcess:
    return KvmProcess(pid, "root", f"vm{pid}", ("qemu",), vcpus, tuple(range(vcpus)), 0.0, 0,
                      create_time, 0)  # fmt: skip


class Host:
    """A changing list of VMs; take() fails for the pids in ``refuse``."""

    def __init__(self) -> None:
        self.procs: list[KvmProcess] = []
        self.refuse: set[int] = set()
        self.taken: list[int] = []
        self.made: dict[int, FakeStats] = {}
        self.now = 0.0
        self.lines: list[str] = []

    def take(self, pid: int) -> Any:
        self.taken.append(pid)
        if pid in self.refuse:
            raise PermissionDenied(f"pid {pid} is traced by another process (TracerPid 9)")
        if pid not in {p.pid for p in self.procs}:
            raise NoSuchProcess(f"no such process: {pid}")
        self.made[pid] = FakeStats(pid, next(p.vcpus for p in self.procs if p.pid == pid))
        return self.made[pid]

    def fleet(self) -> Fleet:
        return Fleet(take=self.take, discover=lambda: list(self.procs), log=self.lines.append,
                     clock=lambda: self.now)  # fmt: skip


def test_the_fleet_takes_new_vms_once_and_closes_those_that_end():
    host = Host()
    fleet = host.fleet()
    host.procs = [kvm_proc(1), kvm_proc(2, vcpus=2)]
    fleet.rescan()
    fleet.rescan()
    assert host.taken == [1, 2]  # once each: later scans only look
    host.made[1].alive = False  # its VMM exited: closed before discovery even notices
    fleet.drop_ended()
    assert host.made[1].closed and set(fleet.watched) == {2}
    host.procs = [kvm_proc(2, vcpus=2, create_time=5.0)]  # pid 2 reused by a new VM
    fleet.rescan()
    assert host.made[2].closed is False and host.taken == [1, 2, 2]
    fleet.close()
    assert host.made[2].closed and not fleet.watched


def test_a_vm_without_vcpus_yet_waits_and_a_new_vcpu_is_taken_again():
    host = Host()
    fleet = host.fleet()
    host.procs = [kvm_proc(1, vcpus=0)]
    fleet.rescan()
    assert host.taken == []  # a VM being built: its vCPUs are not there yet
    host.procs = [kvm_proc(1, vcpus=1)]
    fleet.rescan()
    first = host.made[1]
    host.procs = [kvm_proc(1, vcpus=2)]  # hotplug
    fleet.rescan()
    assert first.closed and len(fleet.watched[1].stats.vcpus) == 2


def test_a_vm_whose_stats_cannot_be_taken_is_logged_once_counted_and_retried_later():
    host = Host()
    fleet = host.fleet()
    host.procs = [kvm_proc(1), kvm_proc(2)]
    host.refuse = {2}
    fleet.rescan()
    host.now = RETRY_S - 1
    fleet.rescan()
    assert host.taken == [1, 2] and len(host.lines) == 2  # a pick-up line and one failure line
    assert "pid 2 (vm2): skipped" in host.lines[1] and "traced by another process" in host.lines[1]
    fams = {f.name: f for f in FleetCollector(fleet).collect()}
    assert {s.labels["state"]: s.value for s in fams["kvmtop_exporter_vms"].samples} == {
        "ok": 1, "failed": 1}  # fmt: skip
    assert {s.labels["pid"]: s.value for s in fams["kvm_vm_up"].samples} == {"1": 1, "2": 0}
    host.now = RETRY_S
    host.refuse = set()
    fleet.rescan()
    assert host.taken == [1, 2, 2] and set(fleet.watched) == {1, 2} and not fleet.failed


# --- the real exporter ---------------------------------------------------------------------------


OWN_VMS = f"kvmtop-test-{os.getpid()}"  # the name of the VMs these tests start (minivmm --name)


def start_exporter(processes: list[Any], *chosen: str) -> tuple[subprocess.Popen[str], str]:
    """`kvmtop exporter` on a free loopback port, reading only the VMs ``chosen`` (``-p PID``,
    ``--vm NAME``; default: those named OWN_VMS), never another user's: (process, its URL)."""
    chosen = chosen or ("--vm", OWN_VMS)
    exporter = subprocess.Popen([*KVMTOP, "exporter", "--listen", "127.0.0.1:0", "--rescan", "0.5",
                                 *chosen], stderr=subprocess.PIPE, text=True)  # fmt: skip
    processes.append(exporter)
    assert exporter.stderr is not None
    line = exporter.stderr.readline()
    assert "listening on http://127.0.0.1:" in line, line
    return exporter, line.split("listening on ", 1)[1].strip()


def scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def vcpus_by_pid(families: dict[str, Any]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    exits = families.get("kvm_vcpu_exits")  # absent while no VM is read
    for s in exits.samples if exits is not None else ():
        out.setdefault(int(s.labels["pid"]), set()).add(s.labels["vcpu"])
    return out


def exits_of(families: dict[str, Any], pid: int) -> float:
    return sum(s.value for s in families["kvm_vcpu_exits"].samples
               if s.labels["pid"] == str(pid) and s.name == "kvm_vcpu_exits_total")  # fmt: skip


def scrape_until(url: str, check: Any, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        families = scrape(url)
        if check(families):
            return families
        assert time.monotonic() < deadline, f"not within {timeout} s: {vcpus_by_pid(families)}"
        time.sleep(0.2)


def held_stats(pid: int) -> dict[str, str]:
    """{the stats file's id ("kvm-<VMM pid>/vcpu-<n>"): its fd link} of every KVM stats fd
    process ``pid`` holds, each read through a copy of the fd."""
    held = {}
    pidfd = os.pidfd_open(pid)
    try:
        for fd, link in fd_table(pid).items():
            if "-stats" in link:
                copy = StatsFile(pidfd_getfd(pidfd, fd))
                held[copy.ident] = link
                copy.close()
    finally:
        os.close(pidfd)
    return held


def stats_of(vmm_pid: int, vcpus: int) -> dict[str, str]:
    return {f"kvm-{vmm_pid}": "anon_inode:kvm-vm-stats",
            **{f"kvm-{vmm_pid}/vcpu-{i}": f"anon_inode:kvm-vcpu-stats:{i}" for i in range(vcpus)}}  # fmt: skip


@pytest.mark.kvm
def test_the_exporter_follows_the_fleet_and_leaves_every_vm_untraced_and_exact(tmp_path, processes):
    outs = {"a": 3_000, "b": 4_000, "c": 5_000}
    spins = {"a": 8_000_000, "b": 16_000_000, "c": 12_000_000}
    vcpus = {"a": 1, "b": 2, "c": 1}
    status = {"a": 3, "b": 0, "c": 0}

    def start(key: str) -> subprocess.Popen[bytes]:
        vmm = subprocess.Popen(counted_command(vcpus=vcpus[key], outs=outs[key], mmio_writes=0,
                                               spin=spins[key], exit_status=status[key],
                                               report_json=str(tmp_path / f"{key}.json"),
                                               name=OWN_VMS))  # fmt: skip
        processes.append(vmm)
        wait_for_vcpus(vmm.pid, vcpus[key])
        return vmm

    vmms = {"a": start("a"), "b": start("b")}
    pids = {key: vmm.pid for key, vmm in vmms.items()}
    exporter, url = start_exporter(processes)
    fams = scrape_until(url, lambda f: {pids["a"], pids["b"]} <= vcpus_by_pid(f).keys())
    assert all(vmm.poll() is None for vmm in vmms.values()), "a guest ended early: raise spins"
    got = vcpus_by_pid(fams)
    assert got[pids["a"]] == {"0"} and got[pids["b"]] == {"0", "1"}
    assert all(tracer_pid(pid) == 0 for pid in pids.values())  # detached after the pick-up
    up = {s.labels["pid"]: (s.labels["vm"], s.value) for s in fams["kvm_vm_up"].samples}
    assert up[str(pids["a"])] == (OWN_VMS, 1) == up[str(pids["b"])]
    time.sleep(0.5)
    later = scrape(url)
    for pid in pids.values():
        assert exits_of(later, pid) > exits_of(fams, pid) > 0

    vmms["c"] = start("c")  # after the exporter: picked up by a rescan
    pids["c"] = vmms["c"].pid
    scrape_until(url, lambda f: pids["c"] in vcpus_by_pid(f), timeout=10)
    assert tracer_pid(pids["c"]) == 0
    held = held_stats(exporter.pid)  # also those of any other VM on this host
    for key, pid in pids.items():
        assert stats_of(pid, vcpus[key]).items() <= held.items(), key

    assert vmms["a"].wait(120) == status["a"]
    assert vmms["b"].poll() is None and vmms["c"].poll() is None, "raise the spins of b and c"
    scrape_until(url, lambda f: pids["a"] not in vcpus_by_pid(f), timeout=5)
    held = held_stats(exporter.pid)
    assert not [ident for ident in held if ident.startswith(f"kvm-{pids['a']}")]
    assert stats_of(pids["b"], 2).items() <= held.items()

    for key in ("b", "c"):
        assert vmms[key].wait(120) == status[key]
    scrape_until(url, lambda f: not {pids["b"], pids["c"]} & vcpus_by_pid(f).keys(), timeout=5)
    held = held_stats(exporter.pid)
    assert not [i for i in held if i.split("/")[0] in {f"kvm-{pid}" for pid in pids.values()}]
    for key in vmms:
        report = json.loads((tmp_path / f"{key}.json").read_text())
        assert report["exits"] == {"KVM_EXIT_IO": vcpus[key] * (outs[key] + 1)}, key
        assert report["signals"] == {}

    exporter.send_signal(signal.SIGTERM)
    assert exporter.wait(10) == 0
    assert exporter.stderr is not None
    log = exporter.stderr.read()
    assert "Traceback" not in log
    for pid in pids.values():
        assert f"pid {pid} ({OWN_VMS}): reading KVM's counters" in log
        assert f"pid {pid} ({OWN_VMS}) exited: its counters are closed" in log


@pytest.mark.kvm
def test_a_vm_traced_by_another_tracer_is_skipped_with_one_line_and_counted_failed(
    tmp_path, processes
):
    own = tmp_path / "own.json"
    vmm = subprocess.Popen(counted_command(outs=1_000, mmio_writes=0, spin=12_000_000,
                                           report_json=str(own)))  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid)
    other = Tracer()  # as gdb or strace would be
    other.start()
    try:
        other.attach(vmm.pid).result(10)
        exporter, url = start_exporter(processes, "-p", str(vmm.pid))
        fams = scrape_until(url, lambda f: any(s.labels["pid"] == str(vmm.pid)
                                               for s in f["kvm_vm_up"].samples))  # fmt: skip
        time.sleep(1.5)  # three more rescans: no retry before RETRY_S
        assert vmm.poll() is None, "the guest ended early: raise its spin"
        fams = scrape(url)
    finally:
        other.stop()
    up = {s.labels["pid"]: s.value for s in fams["kvm_vm_up"].samples}
    assert up[str(vmm.pid)] == 0 and vmm.pid not in vcpus_by_pid(fams)
    vms = {s.labels["state"]: s.value for s in fams["kvmtop_exporter_vms"].samples}
    assert vms["failed"] >= 1
    exporter.send_signal(signal.SIGTERM)
    assert exporter.wait(10) == 0
    assert exporter.stderr is not None
    lines = [line for line in exporter.stderr.read().splitlines() if f"pid {vmm.pid} " in line]
    assert len(lines) == 1 and "skipped" in lines[0] and "traced by another process" in lines[0]
    assert vmm.wait(120) == 0
    assert json.loads(own.read_text())["exits"] == {"KVM_EXIT_IO": 1_001}


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "192.0.2.1:9464", "busy"])  # fmt: skip
def test_a_bad_listen_address_is_one_line_and_a_non_zero_status(listen, busy_port):
    if listen == "busy":
        listen = f"127.0.0.1:{busy_port}"
    result = subprocess.run([*KVMTOP, "exporter", "--listen", listen], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kvmtop: "), result.stderr
    assert listen.split(":")[0] in result.stderr or "HOST:PORT" in result.stderr


def test_ctrl_c_closes_the_exporter_with_status_0(processes):
    exporter, url = start_exporter(processes)
    assert "kvmtop_exporter_vms" in scrape(url)
    exporter.send_signal(signal.SIGINT)
    assert exporter.wait(10) == 0
    assert exporter.stderr is not None and "Traceback" not in exporter.stderr.read()


@pytest.mark.kvm
def test_the_exporter_reads_only_the_vms_it_is_given(processes):
    """-p and --vm choose the VMs; any other VM on the host (another user's, another test's) is
    never attached to, not even for the moment of taking its counters."""
    mine = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=1000, name=OWN_VMS)
    other = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=1000)
    exporter, url = start_exporter(processes)
    fams = scrape_until(url, lambda f: mine.pid in vcpus_by_pid(f))
    time.sleep(1.0)  # two more rescans
    fams = scrape(url)
    assert set(vcpus_by_pid(fams)) == {mine.pid}
    exporter.send_signal(signal.SIGTERM)
    assert exporter.wait(10) == 0
    assert exporter.stderr is not None
    log = exporter.stderr.read()
    assert f"pid {mine.pid} " in log and f"pid {other.pid} " not in log


@pytest.mark.kvm
def test_list_and_the_exporter_hold_beside_vms_stopped_or_traced_by_another_tracer(processes):
    """Other VMs on the host may be stopped (SIGSTOP) or traced (gdb, strace): `list` shows
    them with their state, the exporter reads the VM it can and says once of each other why
    not, and still ends at once."""
    mine = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=1000)
    stopped = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=1000)
    traced = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=1000)
    stopped.send_signal(signal.SIGSTOP)
    other = Tracer()  # as gdb or strace would be
    other.start()
    try:
        other.attach(traced.pid).result(10)
        listed = subprocess.run([*KVMTOP, "list", "--json"], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        procs = {p["pid"]: p for p in json.loads(listed.stdout)}
        assert procs[traced.pid]["tracer_pid"] != 0 and procs[mine.pid]["tracer_pid"] == 0
        assert {mine.pid, stopped.pid, traced.pid} <= procs.keys()
        pids = [arg for vmm in (mine, stopped, traced) for arg in ("-p", str(vmm.pid))]
        exporter, url = start_exporter(processes, *pids)
        fams = scrape_until(url, lambda f: len(f["kvm_vm_up"].samples) == 3)
        up = {int(s.labels["pid"]): s.value for s in fams["kvm_vm_up"].samples}
        assert up == {mine.pid: 1, stopped.pid: 0, traced.pid: 0}
        started = time.monotonic()
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(10) == 0 and time.monotonic() - started < 2.0
    finally:
        other.stop()
        stopped.send_signal(signal.SIGCONT)
    assert exporter.stderr is not None
    log = exporter.stderr.read().splitlines()
    for vmm, why in ((stopped, "is stopped"), (traced, "traced by another process")):
        (line,) = [x for x in log if f"pid {vmm.pid} " in x]
        assert "skipped" in line and why in line, line
    assert tracer_pid(mine.pid) == 0 and tracer_pid(stopped.pid) == 0


@pytest.mark.kvm
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_exporter_at_once_even_while_it_takes_a_vm_s_counters(
    processes, sig
):
    """A VM whose vCPU thread stays out of KVM_RUN (its VMM handles an exit for 8 s) holds up a
    take of its counters: the signal gives the take up (the VMM is let go, untraced) and the
    exporter ends at once, where it once waited for the take."""
    vmm = start_minivmm(processes, outs=10**9, mmio_writes=0, out_sleep_us=8e6, name=OWN_VMS)
    time.sleep(0.2)  # into the first 8 s handling
    exporter, _url = start_exporter(processes)
    deadline = time.monotonic() + 10
    while tracer_pid(vmm.pid) == 0:  # the first rescan's take, waiting for the next KVM_RUN
        assert time.monotonic() < deadline, "no take began"
        time.sleep(0.01)
    time.sleep(0.3)
    started = time.monotonic()
    exporter.send_signal(sig)
    assert exporter.wait(10) == 0
    assert time.monotonic() - started < 2.0  # where the take had 6 s left
    assert tracer_pid(vmm.pid) == 0 and vmm.poll() is None
    assert exporter.stderr is not None and "Traceback" not in exporter.stderr.read()


def test_exporter_help_names_its_options():
    result = subprocess.run([*KVMTOP, "exporter", "--help"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0 and "--listen" in result.stdout and "--rescan" in result.stdout
    assert "--sampled" in result.stdout


@pytest.mark.parametrize("rate", ["0", "-5", "1e6", "fast"])
def test_a_bad_sampled_rate_is_one_line_and_a_non_zero_status(rate):
    result = subprocess.run([*KVMTOP, "exporter", "--sampled", rate], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("kvmtop: "), result.stderr


# --- sampled: the VMM's time by exit reason -----------------------------------------------------


def test_sampled_seconds_add_each_snapshots_share_of_its_span_per_vcpu_and_reason():
    from guests.fixed_watch import LOOKS, fixed_snapshot

    from kvmtop.formats.metric_families import SampledTotals

    totals = SampledTotals()
    for _ in range(3):
        totals.add(fixed_snapshot())  # 3 snapshots of 1 s each
    base = READINGS[0]
    reading = VmReading(base.pid, base.vm, base.vcpu_descs, base.vm_descs, base.sample, totals)
    fams = exposed(build_families([reading]))
    looks = {(v, reason): 0 for v, (_n, _in, keys) in enumerate(LOOKS) for reason, _k, _c in keys}
    for v, (_n, _in, keys) in enumerate(LOOKS):
        for reason, _key, count in keys:
            looks[(v, reason)] += count
    names = {2: "KVM_EXIT_IO", 5: "KVM_EXIT_HLT", 6: "KVM_EXIT_MMIO"}
    label = lambda v, reason: (("pid", "10"), ("reason", names[reason]), ("vcpu", str(v)),  # noqa: E731
                               ("vm", "web"))  # fmt: skip
    seconds = values_of(fams["kvm_vcpu_vmm_seconds"], "kvm_vcpu_vmm_seconds_total")
    assert seconds == pytest.approx({label(v, r): 3 * n / 1000 for (v, r), n in looks.items()})
    hits = values_of(fams["kvm_vcpu_vmm_samples"], "kvm_vcpu_vmm_samples_total")
    assert hits == {label(v, r): 3 * n for (v, r), n in looks.items()}
    samples = values_of(fams["kvm_vcpu_samples"], "kvm_vcpu_samples_total")
    assert samples == {(("pid", "10"), ("vcpu", str(v)), ("vm", "web")): 3000.0 for v in range(4)}
    assert {f.type for name, f in fams.items() if "sample" in name or "vmm" in name} == {"counter"}


def test_without_sampling_no_sampled_family_is_exposed():
    assert not [
        name for name in exposed(build_families(READINGS)) if "sample" in name or "vmm" in name
    ]


def own_fleet(pid: int, sampled_hz: float | None) -> Fleet:
    """A fleet of one VM (the test's own guest, never another VM on this host)."""
    from kvmtop.host.discovery import list_kvm_processes

    return Fleet(discover=lambda: [p for p in list_kvm_processes() if p.pid == pid],
                 log=lambda text: None, sampled_hz=sampled_hz)  # fmt: skip


@pytest.mark.kvm
def test_a_sampled_fleet_exports_the_vmms_time_by_reason_of_a_real_guest_untraced(processes):
    """A guest whose VMM takes 30 µs per `out 0x80`: its VMM time, sampled at 1 kHz, is nearly
    all KVM_EXIT_IO on both vCPUs and grows scrape after scrape; the same fleet without
    --sampled exposes no such family; the VMM is never left traced and every fd is closed."""
    vmm = subprocess.Popen(counted_command(vcpus=2, outs=10**8, mmio_writes=0, out_sleep_us=30),
                           stdout=subprocess.DEVNULL)  # fmt: skip
    processes.append(vmm)
    wait_for_vcpus(vmm.pid, 2)
    fds_before = fd_table(vmm.pid)
    plain = own_fleet(vmm.pid, None)
    plain.rescan()
    try:
        fams = exposed(list(FleetCollector(plain).collect()))
        assert "kvm_vcpu_exits" in fams and "kvm_vcpu_vmm_seconds" not in fams
    finally:
        plain.close()
    fleet = own_fleet(vmm.pid, 1000.0)
    fleet.rescan()
    try:
        assert tracer_pid(vmm.pid) == 0
        seen = []
        for _ in range(2):
            time.sleep(1.0)
            fams = exposed(list(FleetCollector(fleet).collect()))
            seen.append((values_of(fams["kvm_vcpu_vmm_seconds"], "kvm_vcpu_vmm_seconds_total"),
                         values_of(fams["kvm_vcpu_samples"], "kvm_vcpu_samples_total")))  # fmt: skip
            assert tracer_pid(vmm.pid) == 0
        (seconds_1, looks_1), (seconds_2, looks_2) = seen
        for v in ("0", "1"):
            io = (("pid", str(vmm.pid)), ("reason", "KVM_EXIT_IO"), ("vcpu", v),
                  ("vm", "kvmtop-minivmm"))  # fmt: skip
            vcpu = (("pid", str(vmm.pid)), ("vcpu", v), ("vm", "kvmtop-minivmm"))
            assert 0.5 < seconds_1[io] < seconds_2[io] and looks_1[vcpu] < looks_2[vcpu]
            own = sum(value for labels, value in seconds_2.items() if ("vcpu", v) in labels)
            assert seconds_2[io] > 0.8 * own  # the VMM's time is the `out`s
    finally:
        fleet.close()
    assert vmm.poll() is None and tracer_pid(vmm.pid) == 0
    assert not kvm_fds_of(os.getpid())
    assert fd_table(vmm.pid) == fds_before
