"""What kvmtop writes and reads as files and text: the recording, the report (table, JSON, CSV),
two recordings compared, exits as JSON Lines and CSV, the Perfetto trace and the Prometheus
metric families. Pure where it can be: snapshots and batches in, text out. Imports
:mod:`kvmtop.aggregate`, :mod:`kvmtop.sampling`, :mod:`kvmtop.counters` and what lies below;
never a view.
"""
