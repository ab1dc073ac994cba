"""Export stage: cut the trained gated network down for real, emit ONNX (and TensorRT engines on GPU
machines) and write the Triton model repository. Entry point: `python -m export --run runs/<name>`.
"""


class ExportError(Exception):
    """An export input or result that is wrong; the message names the file or layer and the problem."""


def allowed_difference(tolerance: float, reference_scale: float) -> float:
    """`tolerance` as an absolute bound on outputs up to 1 in magnitude, relative beyond: float32 keeps
    about 7 significant digits, so logits in the hundreds differ by 1e-4 from summation order alone."""
    return tolerance * max(1.0, reference_scale)
