"""The built-in guest: a tiny but real KVM VMM in pure Python (``python -m kvmtop.minivmm``), the
guest the tests count and the demo shows, and the 16-bit guest code it runs (also the tests'
QEMU BIOS). Stands alone: imports only :mod:`kvmtop.abi`, :mod:`kvmtop.xlat_exit` and its own
modules.
"""
