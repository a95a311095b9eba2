"""The values that flow between kvmtop's threads and files: vCPU keys, exit events, the packed
records exits travel in, the coalesced MMIO entries, and the messages the tracer sends (batches,
attach, detach, failures). Frozen values and pure packing: no I/O, no threads of their own.
Imports :mod:`kvmtop.abi` and :mod:`kvmtop.xlat_exit` only.
"""
