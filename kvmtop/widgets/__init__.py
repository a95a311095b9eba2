"""Widgets: each renders a snapshot of the aggregate and computes nothing of its own."""
