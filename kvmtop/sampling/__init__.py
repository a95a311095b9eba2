"""``kvmtop watch``'s engine: where each vCPU's time goes, from samples of its ``kvm_run`` taken
without tracing. The sampler thread (in C when built) and its Python reference, the samples
turned into shares with bounds (pure), KVM's own part of each exit timed on a VM of kvmtop's,
and the watcher that maps a VMM's vCPUs and samples them. Imports :mod:`kvmtop.counters` and
what lies below it.
"""
