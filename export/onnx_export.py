"""ONNX: export a network, clean and check the graph, validate it with onnxruntime, count its MACs.

Export goes through the project's one exporter (`training.onnx_graph`: torch's torch.export-based one,
opset 18, input `input`, output `logits`, batch axis dynamic, cleaned by onnx-graphsurgeon), and
`onnx.checker` (with strict shape inference) must accept it. onnxruntime is compared with torch on real
images. MACs are counted from the ONNX graph alone (shape inference over Conv and Gemm/MatMul), so the
file that gets served can be checked against mask.json's pruned_flops.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from polarprune.common.atomicio import atomic_path
from polarprune.common.cli import EXIT_FAILED
from polarprune.training.onnx_graph import INPUT_NAME, OPSET, OUTPUT_NAME, ExporterError, network_graph  # noqa: F401

from . import TOLERANCE, ExportError, allowed_difference

ORT_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class OnnxExportError(ExportError):
    """An ONNX file that fails to export, check, run, or match torch or mask.json."""

    exit_code = EXIT_FAILED


def check_onnx(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise OnnxExportError(f"{what}: onnx.checker rejects the graph: {str(error).splitlines()[0]}") from None
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise OnnxExportError(f"{what}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got {names}")


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...],
                opset: int = OPSET) -> onnx.ModelProto:
    """Export, clean, check and atomically write `path`; returns the written graph."""
    try:
        cleaned = network_graph(model, input_shape, opset=opset)
    except ExporterError as error:
        raise OnnxExportError(str(error)) from None
    check_onnx(cleaned, str(path))
    with atomic_path(path) as tmp:
        onnx.save(cleaned, str(tmp))
    return cleaned


def run_onnxruntime(path: str | Path, images: np.ndarray, batch: int = 256) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def validate_with_onnxruntime(path: str | Path, model: nn.Module, images: torch.Tensor,
                              tolerance: float = TOLERANCE) -> tuple[float, float]:
    """(max |onnxruntime - torch|, max |logit|) over `images`; OnnxExportError beyond `tolerance`
    (scaled by the largest logit when that exceeds 1, see `allowed_difference`)."""
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(images[i:i + 256]) for i in range(0, len(images), 256)]).numpy()
    try:
        got = run_onnxruntime(path, images.numpy())
    except Exception as error:  # onnxruntime raises its own exception types
        raise OnnxExportError(f"{Path(path).name}: onnxruntime cannot run it: {str(error).splitlines()[0]}") from None
    diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    if diff > allowed_difference(tolerance, scale):
        raise OnnxExportError(f"{Path(path).name}: onnxruntime logits differ from torch by {diff:.3g} "
                              f"(tolerance {tolerance:g}, logits up to {scale:.3g})")
    return diff, scale


def save_ort_optimized(onnx_path: str | Path, out_path: str | Path, level: str = "extended") -> None:
    """onnxruntime's optimised graph for this CPU, written beside the plain ONNX. "all" adds layout
    transforms tied to the CPU it was made on; "extended" stays portable."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ORT_LEVELS[level]
    with atomic_path(out_path) as tmp:
        options.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _shapes(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def count_onnx_macs(model: onnx.ModelProto | str | Path) -> int:
    """MACs of one image, from the graph: every Conv/Gemm/MatMul output element costs its reduction length
    (Conv: in_channels/groups * kernel area; Gemm/MatMul: the inner dimension). Batch axis excluded."""
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    graph = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True).graph  # reshapes to x.shape
    shapes = _shapes(graph)
    total = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, first, second = (shapes.get(name) for name in (node.output[0], node.input[0], node.input[1]))
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            raise OnnxExportError(f"Gemm {node.name}: a transposed first input is not counted")
        if node.op_type == "Conv":
            reduction = second[1:] if second else None  # weight (out, in/groups, kh, kw)
        else:
            reduction = [first[-1]] if first else None
        per_image = out[1:] if out else None
        if not reduction or not per_image or None in reduction or None in per_image:
            raise OnnxExportError(f"{node.op_type} {node.name}: shapes unknown after shape inference")
        total += math.prod(per_image) * math.prod(reduction)
    return total
