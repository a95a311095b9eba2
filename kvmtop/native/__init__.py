"""The optional C modules, executors of the hot paths, and which of them were built: their
sources (``hotloop.c``, the tracer's engine; ``summary.c``, a batch's one-pass summary;
``sampler.c`` and ``entry_cost.c``, the watch's sampler) live here and are built by
``pip install .`` as ``kvmtop.native._hotloop``, ``_summary`` and ``_sampler``. Each has a
pure-Python twin where its role lives (:mod:`kvmtop.trace.py_engine`,
:mod:`kvmtop.aggregate.batch_summary`, :mod:`kvmtop.sampling.sampler`); they include the header
written from :mod:`kvmtop.abi`. Imports nothing of kvmtop.

``KVMTOP_PURE=1`` in the environment makes kvmtop run its pure-Python paths, as it does when a
module could not be built; the tests run the engine both ways. Nothing here calls into a module.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_ENV = "KVMTOP_PURE"


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def built(name: str) -> ModuleType | None:
    """``kvmtop.native.<name>`` if it was built, else None (pure Python asked for or not)."""
    try:
        return importlib.import_module(f"kvmtop.native.{name}")
    except ImportError:
        return None


def load(name: str) -> ModuleType | None:
    """``kvmtop.native.<name>`` if it was built and pure Python was not asked for, else None."""
    return None if pure_requested() else built(name)


def missing_notice() -> str | None:
    """One line for the user when a native module is missing (None: all present or not asked)."""
    if pure_requested():
        return None
    absent = [name for name in ("_hotloop", "_summary", "_sampler") if load(name) is None]
    if not absent:
        return None
    return (
        f"kvmtop: native module(s) {', '.join(absent)} not built (a C compiler and the Python "
        "headers are needed at install): tracing in pure Python, several times slower"
    )
