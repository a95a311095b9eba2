"""The bounded aggregate of exits every view reads: counts, rates, latency histograms, top IO
ports and MMIO addresses and recent exits with fixed memory, their frozen snapshots, and the
one-pass summary of a batch it merges (in C when built). No ptrace and no process of the host:
it runs on a recording alone. Imports :mod:`kvmtop.decoder`, :mod:`kvmtop.model`,
:mod:`kvmtop.native`, :mod:`kvmtop.abi` and :mod:`kvmtop.units`; never :mod:`kvmtop.trace` or
:mod:`kvmtop.host`.
"""
