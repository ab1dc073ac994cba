"""How far one network's logits may differ between two runtimes: the one table the output checks use.

A bound is relative to the logit scale, max(1, max |reference logit|): float32 keeps about 7 digits, so
logits in the hundreds differ by more than small ones from summation order alone.
  cpu/fp32  onnxruntime's CPU kernels, the served python backend: summation order only.
  gpu/fp32  cuDNN and TensorRT may run FP32 convolutions in TF32 (10-bit mantissa) and pick other
            algorithms than the CPU: about 1e-3 per layer, more over a deep network.
  gpu/fp16  FP16 activations (TensorRT FP16 engines, onnxruntime's TensorRT accelerator at FP16).
Checks state which row they used; none loosens a bound on its own.
"""
from __future__ import annotations

TOLERANCE = {("cpu", "fp32"): 1e-4, ("gpu", "fp32"): 1e-2, ("gpu", "fp16"): 5e-2}


def tolerance(device: str, precision: str) -> float:
    try:
        return TOLERANCE[(device, precision)]
    except KeyError:
        raise ValueError(f"no output tolerance for {device}/{precision}; known: "
                         f"{', '.join('/'.join(key) for key in TOLERANCE)}") from None


def allowed_difference(bound: float, reference_scale: float) -> float:
    """`bound` as an absolute limit for logits up to 1 in magnitude, relative beyond."""
    return bound * max(1.0, reference_scale)
