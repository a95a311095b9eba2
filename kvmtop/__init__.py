"""kvmtop: top for KVM exits."""

__version__ = "0.1.0"
