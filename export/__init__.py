"""Export stage: cut the trained gated network down for real, emit ONNX (and TensorRT engines on GPU
machines) and write the Triton model repository. Entry point: `python -m export --run runs/<name>`.
"""


class ExportError(Exception):
    """An export input or result that is wrong; the message names the file or layer and the problem."""

from common.tolerance import allowed_difference  # noqa: F401,E402  (the stages share one definition)
