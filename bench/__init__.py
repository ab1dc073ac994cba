"""Benchmarks: dense vs pruned inference speed, pruning shapes, and the training cost of the gates.

The scripts run as `python -m bench.<script>` from the repository root; they share the timing helpers
in `bench.timing`.
"""
from polarprune.common.cli import PolarpruneError


class BenchError(PolarpruneError):
    """A benchmark that cannot run as asked (missing run artifacts, an absent backend); exit code 2."""
