"""The binary interfaces kvmtop reads and writes, each fact declared once: KVM's (ioctl numbers,
``struct kvm_run``'s offsets, the coalesced MMIO ring, the binary stats format), ptrace's and
seccomp's, the architecture behind one small interface (``arch/``), the MMIO address names, and
kvmtop's own packed record layout, which the C modules get as a header written from these
declarations at build time (:mod:`kvmtop.abi.c_header`). Modules here import the standard
library, python-ptrace and :mod:`kvmtop.xlat_exit` only: nothing of kvmtop above them.
"""
