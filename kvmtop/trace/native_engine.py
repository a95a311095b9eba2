"""The C engine (``kvmtop.native._hotloop``, kvmtop/native/hotloop.c) behind the engine
interface, and :func:`make_engine`, which picks it or its pure-Python reference.

The C engine hands back plain tuples; :class:`NativeEngine` names them at the boundary, in the
few methods that return one (a stop handed back, a notification, a take: never per exit, which
the C loops handle without returning). Every other method is the C one, unwrapped.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import cast

from kvmtop import native
from kvmtop.abi.arch import HOST
from kvmtop.trace.engine import Notified, PageOwner, PtraceEngine, Stop, Taken, ThreadState
from kvmtop.trace.py_engine import PyEngine


@cache
def native_engine_type(module: ModuleType) -> type:
    """A subclass of ``module.Engine`` that returns the interface's named types."""

    class NativeEngine(module.Engine):  # type: ignore[name-defined,misc]
        __slots__ = ()
        native = True

        def run(self, deadline_ns: int, max_bytes: int) -> Stop | None:
            got = super().run(deadline_ns, max_bytes)
            return None if got is None else Stop._make(got)

        def thread(self, tid: int) -> ThreadState | None:
            got = super().thread(tid)
            return None if got is None else ThreadState._make(got)

        def page(self, pid: int, fd: int) -> PageOwner | None:
            got = super().page(pid, fd)
            return None if got is None else PageOwner._make(got)

        def take(self) -> Taken:
            return Taken._make(super().take())

        def notify_run(self, listener: int, wake: int, max_bytes: int) -> Notified:
            return Notified(*super().notify_run(listener, wake, max_bytes))

    NativeEngine.__qualname__ = NativeEngine.__name__ = "NativeEngine"
    NativeEngine.__module__ = __name__
    return NativeEngine


def make_engine(base_ns: int, with_data: bool, poll_max_ns: int, wait_flags: int) -> PtraceEngine:
    """The C engine when it was built (and KVMTOP_PURE is not set), else :class:`PyEngine`."""
    module = native.load("_hotloop")
    if module is not None:
        engine = native_engine_type(module)(base_ns, with_data, poll_max_ns, wait_flags,
                                            HOST.SYS_IOCTL)  # fmt: skip
        return cast(PtraceEngine, engine)
    return PyEngine(base_ns, with_data, poll_max_ns, wait_flags)
