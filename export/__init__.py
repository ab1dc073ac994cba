"""Export stage: cut the trained gated network down for real, emit ONNX (and TensorRT engines on GPU
machines) and write the Triton model repository. Library entry point: `export.api.run(ExportOptions(...))`;
command line: `python -m export --run runs/<name>`.
"""
from common.cli import PolarpruneError

# Max |difference| between two computations of the same logits that still counts as the same network
# (pruned vs gated in torch, onnxruntime vs torch), before scaling by `allowed_difference`.
TOLERANCE = 1e-4


class ExportError(PolarpruneError):
    """An export input or result that is wrong; the message names the file or layer and the problem.
    This class and its input subclasses exit with 2; those for failed checks set exit_code 1."""


def allowed_difference(tolerance: float, reference_scale: float) -> float:
    """`tolerance` as an absolute bound on outputs up to 1 in magnitude, relative beyond: float32 keeps
    about 7 significant digits, so logits in the hundreds differ by 1e-4 from summation order alone."""
    return tolerance * max(1.0, reference_scale)
