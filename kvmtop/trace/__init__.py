"""The tracer's parts below :mod:`kvmtop.tracer_thread`, which alone decides: the engine interface
(:mod:`~kvmtop.trace.engine`) and its pure-Python engine, the processes a session follows and
how they are taken, one traced process and its vCPU pages, the register injection for KVM's
counters, the kicker, the wait for the next stop and the seccomp notification listener. Only
the tracer's thread (and the listener's) runs this code. Imports :mod:`kvmtop.host`,
:mod:`kvmtop.decoder`, :mod:`kvmtop.model`, :mod:`kvmtop.native` and :mod:`kvmtop.abi`; never the
aggregate, the formats or anything that draws.
"""
