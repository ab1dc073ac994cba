"""The training stage's error base: `python -m training` catches `TrainingError` and nothing narrower.

Its subclasses live beside the code that raises them (SpecError, DataError, CheckpointError, RunError,
DistributedError); ConfigError lives here because the config and each method (its own settings) raise it.
They keep their older bases (ValueError, RuntimeError) for callers that catch those.
"""
from polarprune.common.cli import PolarpruneError


class TrainingError(PolarpruneError):
    """Bad training input (config, data, checkpoint, run folder, launch); exit code 2."""


class ConfigError(TrainingError, ValueError):
    """A configuration key that is unknown, of the wrong type, or out of range. `key` names it (None when
    the problem is the file itself), so `load_config` can say where the value came from."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
