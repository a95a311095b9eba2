"""The optional native parts of kvmtop, built with the system C compiler by ``pip install .``.

Each is optional: without a compiler or the Python headers the build goes on without it, and
kvmtop says so in one line and runs its pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("kvmtop.native._hotloop", ["kvmtop/native/hotloop.c"], optional=True),
        Extension("kvmtop.native._summary", ["kvmtop/native/summary.c"], optional=True),
        Extension(
            "kvmtop.native._sampler",
            ["kvmtop/native/sampler.c", "kvmtop/native/entry_cost.c"],
            depends=["kvmtop/native/entry_cost.h"],
            optional=True,
        ),
    ]
)
