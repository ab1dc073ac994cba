"""Benchmarks: dense vs pruned inference speed, pruning shapes, and the training cost of the gates.

The scripts run as `python bench/<script>.py`; they share the timing helpers in `bench.timing`.
"""
