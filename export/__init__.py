"""Export stage: cut the trained gated network down for real, emit ONNX (and TensorRT engines on GPU
machines) and write the Triton model repository. Library entry point: `export.api.run(ExportOptions(...))`;
command line: `python -m export --run runs/<name>`.
"""
from polarprune.common.cli import PolarpruneError
from polarprune.common.tolerance import allowed_difference, tolerance  # noqa: F401 (the stages share one definition)

# Pruned vs gated network in torch, and onnxruntime CPU vs torch: the cpu/fp32 row of the one table.
TOLERANCE = tolerance("cpu", "fp32")


class ExportError(PolarpruneError):
    """An export input or result that is wrong; the message names the file or layer and the problem.
    This class and its input subclasses exit with 2; those for failed checks set exit_code 1."""
