"""The command line's verbs that are more than a few lines: ``kvmtop stats`` (KVM's counters),
``kvmtop watch`` (sampled shares) and ``kvmtop exporter`` (Prometheus). Each is a thin loop over
the packages below; only :mod:`kvmtop.cli` imports them.
"""
