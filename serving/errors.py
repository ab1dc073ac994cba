"""The serving stage's errors: `python -m serving` catches `ServingStageError` and nothing narrower.

The client's (InputSpecError, ServingError) and the run artifacts' (RunArtifactsMissing,
RunArtifactsError) live beside the code that raises them; the server's are here.
"""
from polarprune.common.cli import EXIT_BAD_INPUT, EXIT_FAILED, PolarpruneError


class ServingStageError(PolarpruneError):
    """Base of the serving stage's errors; a probe or server that failed exits with 1."""

    exit_code = EXIT_FAILED


class ServerError(ServingStageError, RuntimeError):
    """The server could not be found, started, reached or made ready."""


class ServerInputError(ServerError):
    """What the server was asked to serve is wrong before it starts: a missing model folder, a config
    Triton cannot parse, a port already taken, a malformed URL."""

    exit_code = EXIT_BAD_INPUT


class TritonNotFound(ServerError):
    """The pytriton wheel (and so the tritonserver binary) is not installed."""


class PortRace(ServerError):
    """An auto-picked port was taken by someone else between picking and binding it."""
