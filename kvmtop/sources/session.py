"""A tracing session: the tracer thread, the aggregate it feeds, and optionally a recording and
a stream of exits (``record --jsonl``).

A pump thread moves the tracer's batches into :class:`~kvmtop.aggregate.exits.ExitStats`, the recording
file and the stream, so the UI and ``kvmtop record`` only ever read ``session.stats``. Nothing here
calls ptrace: commands go to the tracer, which runs them in its own thread.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

from kvmtop.aggregate.exits import ExitStats
from kvmtop.errors import KvmtopError
from kvmtop.formats.recording import RecordingWriter, check_writable, meta_for
from kvmtop.model.messages import (
    Attached,
    Detached,
    ExitBatch,
    StatsFds,
    TracerEnded,
    TracerFailed,
    TracerMessage,
    TracerNote,
)
from kvmtop.tracer_thread import open_tracer
from kvmtop.units import ended_text


class SessionState(enum.Enum):
    IDLE = "idle"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    ENDED = "ended"
    FAILED = "failed"


class ExitSink(Protocol):
    """Where a session streams every exit, besides the aggregate and the recording."""

    def begin(self, attached: Attached) -> None: ...

    def write_batch(self, batch: ExitBatch) -> None:
        """Raise BrokenPipeError when the reader went away; the session then detaches."""


class TraceSession:
    """One tracer; one traced VMM at a time. All methods but :meth:`close` and the ``wait_*``
    helpers return at once: outcomes show in :attr:`state` and :meth:`take_notices`."""

    def __init__(
        self,
        record_path: str | None = None,
        with_data: bool = False,
        child_stdio: str | None = None,
        keep_old: bool = False,
        exit_sink: ExitSink | None = None,
        child_stdout_to_stderr: bool = False,
        child_stderr: str | None = None,
        engine: str = "",
        rip: bool = False,
    ) -> None:
        if record_path is not None:
            check_writable(record_path)
        self.record_path = record_path
        self.keep_old = keep_old
        self.with_data = with_data
        self.stats = ExitStats()
        self.state = SessionState.IDLE
        self.pid: int | None = None
        self.pids: tuple[int, ...] = ()  # every VMM attached to, or the command launched
        self.asked: tuple[int, ...] = ()  # the VMMs the last attach asked for (known at once)
        self.argv: tuple[str, ...] = ()
        self.launched = False
        self.every_vmm = False  # -a: every VMM on the host
        self.one_stop = False
        self.notify = False  # seccomp user notification: no ptrace stop per exit
        self.filter_note = ""
        self.attached_at_ns: int | None = None
        self.attached_wall: float | None = None
        self.ended_at_ns: int | None = None  # when the last tracing ended (detach, exit)
        self.exit_status: int | None = None
        self.child_exit_status: int | None = None  # a launched command that ended after detach
        self.ended = threading.Event()
        self.child_ended = threading.Event()
        self._notices: deque[tuple[str, str]] = deque(maxlen=50)
        self._writer: RecordingWriter | None = None
        self._sink = exit_sink
        self.sink_closed = False  # the stream's reader went away (``| head``): detached
        self.output_error: KvmtopError | None = None  # the recording or stream failed: detached
        self._pending: Future[Attached] | None = None
        self._attach_taken = threading.Event()  # the pump has taken the last attach's outcome
        self.rip = rip  # every exit's guest RIP (kvmtop.trace.sync_regs, or the kernel's)
        self._tracer, self.engine_note, self.engine_why = open_tracer(
            engine, with_data, child_stdio, child_stdout_to_stderr, child_stderr, rip
        )
        # said once where KVM's own exits cannot be seen one by one (no kvm_exit)
        self.hardware_note: str = getattr(self._tracer, "hardware_note", "")
        self._tracer.start()
        self._pump = threading.Thread(target=self._run_pump, name="kvmtop-pump", daemon=True)
        self._pump.start()

    # --- commands ------------------------------------------------------------------------------

    def attach(self, *pids: int) -> Future[Attached]:
        self.asked = pids
        return self._begin(lambda: self._tracer.attach(*pids))

    @property
    def target_pids(self) -> tuple[int, ...]:
        """The VMMs traced, or while an attach is under way the ones it asked for."""
        if self.state is SessionState.ATTACHING and not self._attach_taken.is_set():
            return self.asked  # (the pids of an earlier attach are no longer traced)
        return self.pids

    def launch(
        self, argv: list[str], one_stop: bool = False, notify: bool = True
    ) -> Future[Attached]:
        """``one_stop``: under kvmtop's seccomp filter; ``notify``: one that notifies a
        listener (no ptrace stop per exit) where the kernel can, else one stop per exit."""
        seccomp = ("notify" if notify else "trace") if one_stop else ""
        self.asked = ()  # its pid is known once it runs
        return self._begin(lambda: self._tracer.launch(argv, seccomp))

    def _begin(self, start: Callable[[], Future[Attached]]) -> Future[Attached]:
        """Attaching from now: the tracer may have attached (and the pump taken its Attached)
        before ``start`` returns."""
        self.state = SessionState.ATTACHING
        self.ended.clear()
        self._attach_taken.clear()
        self._pending = future = start()
        return future

    def stats_fds(self) -> Future[StatsFds]:
        """KVM's stats fds of the traced VM (see :meth:`Tracer.stats_fds`)."""
        return self._tracer.stats_fds()

    def want_rip(self) -> None:
        """Guest RIPs from now on (the recording, begun without, says so only in its records)."""
        self.rip = True
        self._tracer.want_rip()

    def detach(self) -> None:
        if self.state in (SessionState.ATTACHED, SessionState.ATTACHING):
            self._tracer.detach()

    @property
    def traced_s(self) -> float | None:
        """Attach to detach (or to now, while tracing), in seconds."""
        if self.attached_at_ns is None:
            return None
        end = self.ended_at_ns if self.ended_at_ns is not None else time.monotonic_ns()
        return (end - self.attached_at_ns) / 1e9

    def wait_attached(self, timeout: float = 10.0) -> Attached:
        """Block until the attach/launch begun last has succeeded; raise its KvmtopError."""
        if self._pending is None:
            raise KvmtopError("nothing to wait for: attach or launch first")
        try:
            attached = self._pending.result(timeout)
        except FutureTimeout:
            raise KvmtopError(f"attach did not finish within {timeout:.0f} s") from None
        self._attach_taken.wait(timeout)  # the pump may not have taken the Attached message yet
        return attached

    def take_notices(self) -> list[tuple[str, str]]:
        """(severity, message) pairs for the user since the last call."""
        out = []
        while self._notices:
            out.append(self._notices.popleft())
        return out

    def close(self, kill_launched: bool = False, timeout: float = 2.0) -> None:
        """Detach (the VMM runs on), stop the tracer, finish the recording. With
        ``kill_launched``, a command kvmtop started is killed instead (the demo guest)."""
        pid, launched = self.pid, self.launched
        self._tracer.stop(timeout)
        self.ended.wait(timeout if self.state is SessionState.ATTACHED else 0)
        self._pump.join(timeout)
        if kill_launched and launched and pid is not None and self.exit_status is None:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self._close_writer(None)

    # --- the pump ------------------------------------------------------------------------------

    def _run_pump(self) -> None:
        while True:
            try:
                message = self._tracer.out.get(timeout=0.25)
            except Exception:  # queue.Empty
                if not self._tracer.alive and self._tracer.out.empty():
                    self.ended.set()
                    return
                continue
            if isinstance(message, TracerEnded):  # nothing follows
                self.ended.set()
                return
            try:
                self._take(message)
            except KvmtopError as exc:  # the recording cannot be written: nothing to trace for
                self._notices.append(("error", str(exc)))
                self.output_error = self.output_error or exc
                self._close_writer(None)
                self.detach()

    def _take(self, message: TracerMessage) -> None:
        if isinstance(message, ExitBatch):
            self.stats.add_batch(message)
            if self._writer is not None:
                self._writer.write_batch(message)
            if self._sink is not None:
                self._stream(message)
        elif isinstance(message, Attached):
            try:
                self._on_attached(message)
            finally:
                self._attach_taken.set()
        elif isinstance(message, Detached):
            self._on_detached(message)
        elif isinstance(message, TracerNote):
            self._notices.append(("warning", message.message))
        elif isinstance(message, TracerFailed):
            self._notices.append(("error", message.message))
            if self.state is SessionState.ATTACHING:
                self.state = SessionState.FAILED
                self.ended.set()
                self._attach_taken.set()

    def _stream(self, batch: ExitBatch) -> None:
        assert self._sink is not None
        try:
            self._sink.write_batch(batch)
        except BrokenPipeError:
            self._sink = None
            self.sink_closed = True
            self.detach()
        except KvmtopError as exc:  # the stream cannot be written: nothing left to trace for
            self._sink = None
            self._notices.append(("error", str(exc)))
            self.output_error = self.output_error or exc
            self.detach()

    def _on_attached(self, attached: Attached) -> None:
        self.stats = ExitStats()
        self.pid, self.argv, self.launched = attached.pid, attached.argv, attached.launched
        self.pids = attached.pids or (attached.pid,)
        self.every_vmm = not attached.pids and not attached.launched  # -a: all of the host's
        self.one_stop = attached.one_stop
        self.notify = attached.notify
        self.filter_note = attached.filter_note
        self.engine_note = attached.engine_note or self.engine_note
        self.attached_at_ns = attached.t_ns
        self.attached_wall = time.time()
        self.ended_at_ns = None
        self.exit_status = None
        self.child_exit_status = None
        self.child_ended.clear()
        self.state = SessionState.ATTACHED  # first: a recording that fails then detaches
        if self.record_path is not None:
            meta = meta_for(attached, self.with_data, self.rip)
            self._writer = RecordingWriter.create(
                self.record_path, meta, self.with_data, keep_old=self.keep_old
            )
        if self._sink is not None:
            self._sink.begin(attached)
        if attached.engine_note:
            verb = "launched" if attached.launched else "attached to"
            what = "every VMM on the host" if self.every_vmm else f"pid {attached.pid}"
            text = f"{verb} {what}: {self.engine_note}"
            text += f" ({self.hardware_note})" if self.hardware_note else ""
        elif attached.launched:
            text = f"launched pid {attached.pid}"
        else:  # what attaching costs, and what a launch would
            text = (f"attached to pid {attached.pid}: 2 ptrace stops per KVM_RUN and per syscall "
                    "of a vCPU thread; started by `kvmtop record -- CMD` it would take none per "
                    "exit")  # fmt: skip
        if self.engine_why:
            text += f" ({self.engine_why})"
        self._notices.append(("information", text))

    def _on_detached(self, detached: Detached) -> None:
        if detached.pid != self.pid:
            return
        if self.state is not SessionState.ATTACHED:  # a launched command ending after detach
            self.child_exit_status = detached.exit_status
            self.child_ended.set()
            return
        self.exit_status = detached.exit_status
        self.ended_at_ns = detached.t_ns
        if detached.exit_status is not None:
            self.child_exit_status = detached.exit_status
            self.child_ended.set()
            text = f"pid {detached.pid} {ended_text(detached.exit_status)}"
        else:
            pids = ", ".join(str(pid) for pid in self.pids or (detached.pid,))
            text = (f"detached from pid {pids}; it runs on" if len(self.pids) <= 1
                    else f"detached from pids {pids}; they run on")  # fmt: skip
            if self.every_vmm:
                text = "detached from every VMM on the host; they run on"
        self._close_writer(detached)
        self.state = SessionState.ENDED
        self._notices.append(("information", text))
        self.ended.set()

    def _close_writer(self, detached: Detached | None) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            if detached is not None:
                writer.write_detached(detached)
            writer.close()
