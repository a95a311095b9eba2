"""What a view reads: a source answers a few questions (a snapshot of the aggregate, one
vCPU's snapshot, a status) whether it is a live tracing session, a recording played back or
the watch's feed of samples. Nothing here draws. :mod:`~kvmtop.sources.exit_source` (what
every source gives) imports only the aggregate and below, so widgets may read it without
reaching the tracer; the sources themselves import the tracer, the formats and below.
"""
