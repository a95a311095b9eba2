"""The TUI's screens: the process list, the attached view, a vCPU's drill-down and the help.

A screen lays out widgets and feeds them snapshots a few times a second; it asks the app for
anything that changes the session (attach, detach, the demo) with a message, and never traces,
computes statistics or calls psutil itself. :mod:`kvmtop.screens.ordered_keys` hands the
keys to them one at a time, in order.
"""
