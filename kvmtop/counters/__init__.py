"""KVM's own counters of a VM ("stats": KVM's binary stats fds): a VM's fds and their
samples, taking them by a brief attach of kvmtop's own tracer, the VMs the TUI holds, and the
counters as a table of text. Reads with one pread per fd, no ptrace once the fds are held. May
import :mod:`kvmtop.tracer_thread` and everything below it; the table (what widgets draw) never
reaches the tracer.
"""
