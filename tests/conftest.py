"""Shared fixtures: skip reasons for tests that need KVM or QEMU, and processes that are always
cleaned up by the pid the test started. Shared helpers (the kvmtop command, guest starters,
recordings) are tests/helpers.py's."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

HAS_KVM = os.path.exists("/dev/kvm")
HAS_QEMU = shutil.which("qemu-system-x86_64") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if ("kvm" in item.keywords or "qemu" in item.keywords) and not HAS_KVM:
            item.add_marker(
                pytest.mark.skip(reason="needs /dev/kvm (real KVM guests); it is absent")
            )
        elif "qemu" in item.keywords and not HAS_QEMU:
            item.add_marker(pytest.mark.skip(reason="needs qemu-system-x86_64 on PATH"))


@pytest.fixture(autouse=True)
def alone_when_asked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[None]:  # fmt: skip
    """With several workers (pytest-xdist), a test marked ``alone`` runs with no other test
    beside it: it takes a lock the others share exclusively, behind a turnstile that stops new
    tests from starting while it waits. The locks live in the run's temporary directory, which
    the workers share."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent
    with (
        open(shared / "alone.turnstile", "a") as turnstile,
        open(shared / "alone.lock", "a") as lock,
    ):
        alone = request.node.get_closest_marker("alone") is not None
        fcntl.flock(turnstile, fcntl.LOCK_EX)  # an alone test keeps it while it waits and runs
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        yield
        # closing the files lets the locks go


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Append every process a test starts; each is killed (by its pid) at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(10)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


@pytest.fixture
def bios(tmp_path):
    """``bios(outs, mmio_writes, spin)``: the path of a QEMU BIOS image making those exits."""
    from guests.qemu_bios import build_bios

    def make(outs: int = 300, mmio_writes: int = 200, spin: int = 0) -> str:
        path = tmp_path / f"bios-{outs}-{mmio_writes}-{spin}.bin"
        path.write_bytes(build_bios(outs=outs, mmio_writes=mmio_writes, spin_iterations=spin))
        return str(path)

    return make


TIMED_VMM = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "guests", "timed_vmm.c")


@pytest.fixture(scope="session")
def timed_vmm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The path of the C VMM that times itself (benchmarks/guests/timed_vmm.c), built with cc."""
    if shutil.which("cc") is None:
        pytest.skip("needs cc to build the C VMM")
    binary = str(tmp_path_factory.mktemp("timed_vmm") / "timed_vmm")
    subprocess.run(["cc", "-O2", "-o", binary, TIMED_VMM], check=True)
    return binary


@pytest.fixture(autouse=True)
def ptrace_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests trace with ptrace unless they ask for an engine (the ``engine`` fixture): as root
    ``auto`` would take the tracepoint engine."""
    monkeypatch.setenv("KVMTOP_ENGINE", "ptrace")


@pytest.fixture(params=["native", "pure", "tracepoints", "tracepoints-perf"])
def any_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the C engine, on the pure-Python one (its reference), and on KVM's
    tracepoints (no ptrace), as this host delivers them (BPF as root) and as perf samples.
    The environment carries the choice to ``kvmtop`` subprocesses and to
    :func:`kvmtop.tracer_thread.open_tracer`."""
    if str(request.param).startswith("tracepoints"):
        from kvmtop.trace.tp_engine import DELIVERY_ENV, unavailable_reason

        why = unavailable_reason()
        if why:
            pytest.skip(f"the tracepoint engine cannot run here: {why}")
        monkeypatch.setenv("KVMTOP_ENGINE", "tracepoints")
        if request.param == "tracepoints-perf":
            monkeypatch.setenv(DELIVERY_ENV, "perf")
        return "tracepoints"
    return _ptrace_engine(str(request.param), monkeypatch)


@pytest.fixture
def tracepoints(monkeypatch: pytest.MonkeyPatch) -> str:
    """The tracepoint engine for this test (and its ``kvmtop`` subprocesses)."""
    from kvmtop.trace.tp_engine import unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(f"the tracepoint engine cannot run here: {why}")
    monkeypatch.setenv("KVMTOP_ENGINE", "tracepoints")
    return "tracepoints"


@pytest.fixture(scope="session")
def timed_vmm_static(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C VMM that times itself, statically linked (no libc of the host's to lean on)."""
    if shutil.which("cc") is None:
        pytest.skip("needs cc to build the C VMM")
    binary = str(tmp_path_factory.mktemp("timed_vmm_static") / "timed_vmm")
    built = subprocess.run(["cc", "-O2", "-static", "-o", binary, TIMED_VMM], capture_output=True)
    if built.returncode != 0:
        pytest.skip(f"cc cannot link statically here: {built.stderr.decode()[-200:]}")
    return binary


@pytest.fixture(params=["native", "pure"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the C engine and on the pure-Python one (its reference). The environment
    carries the choice to ``kvmtop`` subprocesses too."""
    return _ptrace_engine(str(request.param), monkeypatch)


def _ptrace_engine(which: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import importlib.util

    if which == "pure":
        monkeypatch.setenv("KVMTOP_PURE", "1")
    else:
        monkeypatch.delenv("KVMTOP_PURE", raising=False)
        if importlib.util.find_spec("kvmtop.native._hotloop") is None:
            pytest.skip(
                "kvmtop.native._hotloop is not built (no C compiler or Python headers at install)"
            )
    return which


@pytest.fixture(params=["native", "pure"])
def pure_sampler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The C sampler, and the pure-Python one (its reference)."""
    if request.param == "pure":
        monkeypatch.setenv("KVMTOP_PURE", "1")
    else:
        import importlib.util

        if importlib.util.find_spec("kvmtop.native._sampler") is None:
            pytest.skip(
                "kvmtop.native._sampler is not built (no C compiler or Python headers at install)"
            )
    return str(request.param)
