"""The optional native parts of kvmtop, built with the system C compiler by ``pip install .``.

Each is optional: without a compiler or the Python headers the build goes on without it, and
kvmtop says so in one line and runs its pure-Python path. They include ``kvmtop_abi.h``, which
the build writes from the Python declarations of the ABI (kvmtop/abi/c_header.py): the C side
declares no exit number, kvm_run offset or record field of its own.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithAbiHeader(build_ext):
    """build_ext, with kvmtop_abi.h written first into the build's temporary folder."""

    def run(self) -> None:
        sys.path.insert(0, HERE)  # the declarations import only the standard library
        try:
            from kvmtop.abi import c_header
        finally:
            sys.path.remove(HERE)
        if not os.path.abspath(c_header.__file__).startswith(HERE + os.sep):
            raise RuntimeError(f"kvmtop.abi.c_header came from {c_header.__file__}, not {HERE}")
        include = os.path.join(self.build_temp, "kvmtop_abi")
        os.makedirs(include, exist_ok=True)
        path = os.path.join(include, "kvmtop_abi.h")
        text = c_header.render()
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        for extension in self.extensions:
            extension.include_dirs.append(include)
            extension.depends.append(path)
        super().run()


setup(
    cmdclass={"build_ext": BuildWithAbiHeader},
    ext_modules=[
        Extension(
            "kvmtop.native._hotloop",
            ["kvmtop/native/hotloop.c"],
            depends=["kvmtop/native/guest_rip.h"],
            optional=True,
        ),
        Extension("kvmtop.native._summary", ["kvmtop/native/summary.c"], optional=True),
        Extension(
            "kvmtop.native._sampler",
            ["kvmtop/native/sampler.c", "kvmtop/native/entry_cost.c"],
            depends=["kvmtop/native/entry_cost.h", "kvmtop/native/guest_rip.h"],
            optional=True,
        ),
        Extension("kvmtop.native._tracepoints", ["kvmtop/native/tracepoints.c"], optional=True),
    ],
)
