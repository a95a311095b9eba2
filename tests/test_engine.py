"""The engine interface (kvmtop/trace/engine.py): the C engine and its Python reference give the
same named types, without a tracee."""

from __future__ import annotations

import os

import pytest

from kvmtop import native
from kvmtop.trace.engine import MODE_NOTIFY, Notified, PageOwner, Taken, ThreadState
from kvmtop.trace.native_engine import make_engine, native_engine_type
from kvmtop.trace.py_engine import PyEngine


def engines() -> list[object]:
    found: list[object] = [PyEngine(0, False, 0, 0)]
    module = native.built("_hotloop")
    if module is not None:
        found.append(native_engine_type(module)(0, False, 0, 0, 16))
    return found


@pytest.mark.parametrize("engine", engines(), ids=lambda e: type(e).__name__)
def test_each_engine_answers_with_the_interface_s_named_types(engine):
    assert engine.thread(4242) is None and engine.page(4242, 3) is None
    engine.add_process(4242, MODE_NOTIFY)
    assert engine.add_thread(4243, 4242)
    state = engine.thread(4243)
    assert isinstance(state, ThreadState) and state.pid == 4242 and state.runner is False
    engine.add_page(4242, 3, 7, 4243, None, 0)
    assert engine.page(4242, 3) == PageOwner(7, 4243) and isinstance(
        engine.page(4242, 3), PageOwner
    )
    taken = engine.take()
    assert isinstance(taken, Taken) and taken.records == b"" and taken.exits == 0


@pytest.mark.parametrize("engine", engines(), ids=lambda e: type(e).__name__)
def test_notify_run_says_why_it_returned(engine):
    listener_r, listener_w = os.pipe()
    wake_r, wake_w = os.pipe()
    try:
        os.write(wake_w, b"x")
        got = engine.notify_run(listener_r, wake_r, 1 << 20)
        assert isinstance(got, Notified) and got == Notified("wake")
    finally:
        for fd in (listener_r, listener_w, wake_r, wake_w):
            os.close(fd)


def test_make_engine_gives_the_c_engine_when_built():
    engine = make_engine(0, False, 0, 0)
    assert engine.native == (native.load("_hotloop") is not None)
