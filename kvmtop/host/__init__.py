"""This machine as kvmtop finds it, without tracing: what /proc and psutil say of a process, the
KVM processes and their order in the list, a running VMM's vCPU ``kvm_run`` mappings, and
starting a command stopped (posix_spawn and the standalone launcher). Never ptraces: the tracer
seizes what these return. Imports :mod:`kvmtop.decoder`, :mod:`kvmtop.model`, :mod:`kvmtop.abi`
and :mod:`kvmtop.errors`; never :mod:`kvmtop.trace` or anything above it.
"""
