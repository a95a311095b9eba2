"""What every tracer shares with the threads that command it: a queue of (command, argument,
Future) taken by the tracer's own thread, which must be woken to see it (each tracer wakes its
thread its own way), and the end of that thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from kvmtop.errors import KvmtopError


class Commanded:
    """A tracer's commands (``_send``) and its thread's end (``stop``, ``alive``). Subclasses
    set ``_thread`` and ``_commands`` and say how their thread is woken (``_wake``)."""

    _thread: threading.Thread
    _commands: queue.SimpleQueue[tuple[str, Any, Future[Any]]]

    def stop(self, timeout: float = 2.0) -> None:
        """Detach if attached, then end the thread (bounded by ``timeout``)."""
        if self._thread.is_alive():
            self._send("quit", None)
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _send(self, command: str, arg: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if not self._thread.is_alive():
            future.set_exception(KvmtopError("the tracer is not running"))
            return future
        self._commands.put((command, arg, future))
        self._wake()
        return future

    def _wake(self) -> None:
        raise NotImplementedError

    def _pending_commands(self) -> Iterator[tuple[str, Any, Future[Any]]]:
        """The commands sent so far, each once (the tracer's thread only)."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return
