"""The training stage's error base: `python -m training` catches `TrainingError` and nothing narrower.

Its subclasses live beside the code that raises them (ConfigError, SpecError, DataError, CheckpointError,
RunError, DistributedError) and keep their older bases (ValueError, RuntimeError) for callers that
catch those.
"""
from common.cli import PolarpruneError


class TrainingError(PolarpruneError):
    """Bad training input (config, data, checkpoint, run folder, launch); exit code 2."""
