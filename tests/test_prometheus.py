"""A real Prometheus (Debian's `prometheus`) scraping `kvmtop exporter` every second: the series
of a guest whose exits are known arrive with their labels and the right rate, every query of the
Grafana dashboard evaluates and returns data for that guest, and docs/kvmtop-rules.yml passes
`promtool check rules` and its unit tests (`promtool test rules`).

The guest is the C VMM of benchmarks/guests/timed_vmm.c: one vCPU looping on `out 0x80`, each
exit handled by spinning HANDLER_US from KVM_RUN's return, and it times every KVM_RUN itself.
So no stretch of its run can make exits faster than one per HANDLER_US, and its own clock says
how much longer than EXITS x HANDLER_US the whole run took: that excess, put all into the window
Prometheus's rate covers, is the slowest that window can be. Those two facts, the scrape's own
duration (the exporter reads KVM's counters after the time Prometheus stamps the sample with)
and KVM's exits that are not the guest's (counted by KVM as such) make the rate's bounds; none
is tuned on a run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import KVMTOP, wait_for_vcpus

ROOT = os.path.join(os.path.dirname(__file__), "..")
DASHBOARD = os.path.join(ROOT, "docs", "grafana-kvmtop.json")
RULES = os.path.join(ROOT, "docs", "kvmtop-rules.yml")
RULES_TEST = os.path.join(ROOT, "docs", "kvmtop-rules.test.yml")
NAME = f"kvmtop-prom-{os.getpid()}"  # the guest's -name: the exporter reads it alone (--vm)
EXITS = 3_000
HANDLER_US = 5_000.0  # 200 exits/s at most, for 15 s
WINDOW_S = 6  # the rate's window
HOST = "127"  # the host label docs/prometheus.yml's relabelling gives a target on 127.0.0.1

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="needs Debian's prometheus (apt-get install prometheus; .ci/run installs it)",
)
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="needs promtool (apt-get install prometheus; .ci/run installs it)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(target: str) -> dict[str, Any]:
    """docs/prometheus.yml's job, on one loopback target every second (JSON is YAML)."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "kvmtop",
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [{"targets": [target]}],
            "relabel_configs": [{"source_labels": ["__address__"], "regex": "([^:.]+).*",
                                 "target_label": "host"}],
        }],
    }  # fmt: skip


def test_the_test_scrape_config_relabels_as_the_documented_one():
    with open(os.path.join(ROOT, "docs", "prometheus.yml")) as f:
        documented = f.read()
    assert 'regex: "([^:.]+).*"' in documented and "target_label: host" in documented


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: object) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        data = self.api("query", query=promql, time=at)
        assert data["resultType"] == "vector", (promql, data)
        return list(data["result"])

    def samples(self, promql_range: str, at: float) -> list[tuple[float, float]]:
        """The raw samples of the one series a range selector picks, as (time, value)."""
        data = self.api("query", query=promql_range, time=at)
        [series] = data["result"]
        return [(float(t), float(v)) for t, v in series["values"]]


def start_prometheus(processes: list[subprocess.Popen[bytes]], tmp: str, target: str) -> Prometheus:
    """Prometheus on a free loopback port scraping ``target``, its TSDB in ``tmp``, ready."""
    config = os.path.join(tmp, "prometheus.yml")
    with open(config, "w") as f:
        json.dump(scrape_config(target), f)
    for _attempt in range(3):  # a port taken between free_port() and the bind: another one
        port = free_port()
        log = open(os.path.join(tmp, f"prometheus-{port}.log"), "wb")
        prom = subprocess.Popen(["prometheus", f"--config.file={config}",
                                 f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        processes.append(prom)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while prom.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return Prometheus(url)
            except OSError:
                time.sleep(0.2)
        prom.kill()
        prom.wait(10)
    with open(log.name, errors="replace") as f:
        raise AssertionError("prometheus did not start:\n" + f.read()[-2000:])


@dataclass(frozen=True)
class ScrapedGuest:
    prom: Prometheus
    pid: int
    own: dict[str, Any]  # the guest's own JSON line: its exits and clock
    at: float  # a time (Unix s) whose rate window lies inside the guest's run
    scrape_s: float  # the longest scrape in that window


@pytest.fixture(scope="module")
def scraped_guest(
    tmp_path_factory: pytest.TempPathFactory, timed_vmm: str
) -> Iterator[ScrapedGuest]:
    """The guest, `kvmtop exporter --vm NAME --sampled` and Prometheus, every process killed by
    its pid at the end; the guest has run to its end."""
    if shutil.which("prometheus") is None:
        pytest.skip("needs Debian's prometheus (apt-get install prometheus; .ci/run installs it)")
    if not os.path.exists("/dev/kvm"):
        pytest.skip("needs /dev/kvm (real KVM guests); it is absent")
    tmp = str(tmp_path_factory.mktemp("prometheus"))
    started: list[subprocess.Popen[Any]] = []
    try:
        guest = subprocess.Popen([timed_vmm, str(EXITS), str(HANDLER_US), "io", "0", "--name",
                                  NAME], stdout=subprocess.PIPE, text=True)  # fmt: skip
        started.append(guest)
        wait_for_vcpus(guest.pid)
        exporter = subprocess.Popen([*KVMTOP, "exporter", "--listen", "127.0.0.1:0", "--rescan",
                                     "0.5", "--vm", NAME, "--sampled", "1000"],
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        started.append(exporter)
        assert exporter.stderr is not None
        line = exporter.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line
        target = line.split("http://", 1)[1].split("/", 1)[0]
        prom = start_prometheus(started, tmp, target)
        out, _ = guest.communicate(timeout=120)
        ended = time.time()  # the guest's last exit came before this
        assert guest.returncode == 0, out
        own = json.loads(out)
        series = f'kvm_vcpu_exits_total{{vm="{NAME}"}}'
        seen = prom.samples(f"{series}[5m]", ended)
        at = ended - 1.5  # the rate's window ends before the guest's last exit...
        assert seen[0][0] + 1.0 < at - WINDOW_S, (  # ...and begins after the exporter took it
            f"the guest's run was too short for a {WINDOW_S} s window: raise EXITS "
            f"(first sample {ended - seen[0][0]:.1f} s before its end)"
        )  # fmt: skip
        durations = prom.query(
            f'max_over_time(scrape_duration_seconds{{job="kvmtop"}}[{WINDOW_S}s])', at
        )
        yield ScrapedGuest(prom, guest.pid, own, at, float(durations[0]["value"][1]))
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def one_value(prom: Prometheus, promql: str, at: float) -> float:
    [result] = prom.query(promql, at)
    return float(result["value"][1])


@pytest.mark.kvm
@needs_prometheus
def test_the_guest_s_series_arrive_with_its_labels_and_the_fleet(scraped_guest):
    g = scraped_guest
    [exits] = g.prom.query(f'kvm_vcpu_exits_total{{vm="{NAME}"}}', g.at)
    assert exits["metric"] == {"__name__": "kvm_vcpu_exits_total", "pid": str(g.pid), "vm": NAME,
                               "vcpu": "0", "host": HOST, "job": "kvmtop",
                               "instance": exits["metric"]["instance"]}  # fmt: skip
    assert one_value(g.prom, f'kvm_vm_up{{vm="{NAME}"}}', g.at) == 1
    assert one_value(g.prom, f'kvm_vm_vcpus{{vm="{NAME}"}}', g.at) == 1
    assert one_value(g.prom, 'kvmtop_exporter_vms{state="ok"}', g.at) == 1  # only its own guest
    assert one_value(g.prom, 'up{job="kvmtop"}', g.at) == 1
    [io] = g.prom.query(f'kvm_vcpu_vmm_samples_total{{vm="{NAME}", reason="KVM_EXIT_IO"}}', g.at)
    assert io["metric"]["vcpu"] == "0" and float(io["value"][1]) > 0  # --sampled


@pytest.mark.kvm
@needs_prometheus
def test_the_exit_rate_prometheus_gives_is_the_guest_s_within_its_derived_bounds(scraped_guest):
    """rate() over WINDOW_S of 1 s scrapes, against the guest's own count and clock.

    The window's rate is the counter's change over the span of its first and last samples (it
    lies inside the run, so extrapolating to its edges keeps that slope). Over a span L the
    guest makes at most L/h + 1 exits (each takes at least h, the handler's spin) and at least
    (L - E)/h - 1, where E is all the time the whole run took beyond EXITS x h (its own clock):
    the slowest window holds all of it. The exporter reads the counters within the scrape that
    Prometheus stamps at its start, so L is off by up to the longest scrape d; KVM's own exits
    in the window (host interrupts, signals: counted by KVM as irq and signal exits) add to the
    counter without being the guest's."""
    g = scraped_guest
    sel = f'{{vm="{NAME}", vcpu="0"}}'
    rate = one_value(g.prom, f"rate(kvm_vcpu_exits_total{sel}[{WINDOW_S}s])", g.at)
    kvm_own = one_value(g.prom, f"rate(kvm_vcpu_irq_exits_total{sel}[{WINDOW_S}s]) + "
                        f"rate(kvm_vcpu_signal_exits_total{sel}[{WINDOW_S}s])", g.at)  # fmt: skip
    window = g.prom.samples(f"kvm_vcpu_exits_total{sel}[{WINDOW_S}s]", g.at)
    span = window[-1][0] - window[0][0]
    assert len(window) >= WINDOW_S - 2 and span >= WINDOW_S - 3, window  # a sample a second
    h = HANDLER_US / 1e6
    own = g.own
    assert own["exits"] == own["io"][0] == EXITS
    excess = (own["in_run_ns"] + own["out_ns"]) / 1e9 - (EXITS - 1) * h
    low_span, high_span = max(span - g.scrape_s, 0.1), span + g.scrape_s
    high = (high_span / h + 1) / low_span + kvm_own
    low = ((low_span - excess) / h - 1) / high_span
    mean = EXITS / ((own["in_run_ns"] + own["out_ns"]) / 1e9)
    print(f"rate {rate:.2f}/s in [{low:.2f}, {high:.2f}] (the run's mean {mean:.2f}/s; "
          f"excess {excess:.3f} s, longest scrape {g.scrape_s * 1e3:.1f} ms, KVM's own "
          f"{kvm_own:.2f}/s)")  # fmt: skip
    assert low <= rate <= high


DASHBOARD_VALUES = {"host": HOST, "vm": NAME}


def dashboard_queries() -> list[tuple[str, str]]:
    with open(DASHBOARD) as f:
        board = json.load(f)
    return [(f"{panel['title']} {target['refId']}", target["expr"])
            for panel in board["panels"] for target in panel.get("targets", [])]  # fmt: skip


def substituted(expr: str) -> str:
    """The dashboard's variables ($host, ${vm}) as this test's values: the guest's own."""
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: DASHBOARD_VALUES[m.group(1)], expr)
    assert "$" not in out, out
    return out


@pytest.mark.kvm
@needs_prometheus
@pytest.mark.parametrize(("panel", "expr"), dashboard_queries())
def test_every_dashboard_query_returns_data_for_the_guest(scraped_guest, panel, expr):
    results = scraped_guest.prom.query(substituted(expr), scraped_guest.at)
    assert results, f"{panel}: no data for {NAME}"
    for r in results:
        assert r["metric"].get("vm", NAME) == NAME, r  # only its own guest


@pytest.mark.kvm
@needs_prometheus
def test_the_dashboard_variables_list_the_guest(scraped_guest):
    """Grafana's label_values(kvm_vm_up, host) and label_values(kvm_vm_up{host=~...}, vm)."""
    g = scraped_guest
    start, end = g.at - 5, g.at
    hosts = g.prom.api("label/host/values", **{"match[]": "kvm_vm_up", "start": start, "end": end})
    assert HOST in hosts
    vms = g.prom.api("label/vm/values", **{"match[]": f'kvm_vm_up{{host=~"{HOST}"}}',
                                             "start": start, "end": end})  # fmt: skip
    assert NAME in vms


# --- the rules ------------------------------------------------------------------------------------


@needs_promtool
def test_the_rules_file_is_valid():
    result = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_the_documented_scrape_config_is_valid_and_loads_the_rules():
    config = os.path.join(ROOT, "docs", "prometheus.yml")
    result = subprocess.run(["promtool", "check", "config", config], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kvmtop-rules.yml" in result.stdout and "1 rule files found" in result.stdout


@needs_promtool
def test_each_alert_fires_and_stays_quiet_as_its_unit_tests_say():
    result = subprocess.run(["promtool", "test", "rules", RULES_TEST], capture_output=True,
                            text=True, timeout=60, cwd=os.path.dirname(RULES_TEST))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def alerts_of(text: str) -> dict[str, str]:
    """{alert name: its text up to the next rule} of a rules file."""
    parts = re.split(r"^\s*- (?:alert|record): ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0].strip(): p for p in parts if "expr:" in p and "annotations:" in p}


def test_every_alert_is_unit_tested_and_says_which_kvmtop_command_to_run():
    with open(RULES) as f:
        alerts = alerts_of(f.read())
    with open(RULES_TEST) as f:
        tests = f.read()
    assert {"KvmExitStorm", "KvmVcpuMostlyInVmm", "KvmtopExporterCannotReadVm"} <= alerts.keys()
    for name, text in alerts.items():
        description = text.split("description:", 1)[1]
        assert re.search(r"`kvmtop (record|watch|stats|list|diff) ", description), name
        fired = re.findall(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests)
        quiet = re.findall(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests)
        assert fired and quiet, f"{name}: a test where it fires and one where it does not"
