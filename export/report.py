"""export_report.json: what the export stage produced and how the dense and pruned networks compare.

Serving reads `model_names`, `flops_ratio`, `dataset`, `input_shape` and `num_classes` from it.
"""
from __future__ import annotations

from pathlib import Path

from polarprune.training.flops import count_macs, count_params
from polarprune.training.mask import Mask

from polarprune.training.graph import NetworkGraph
from .onnx_export import OPSET

DENSE_SOURCE = {
    "trained": "the trained network itself (an ungated method: nothing was pruned)",
    "dense_run": "the dense reference run (--dense-run): same data, model and budget, trained without gates",
    "gates_removed": (
        "the dense architecture (the traced network) holding the trained weights with every gate "
        "removed: channels and blocks the gates had closed are back, so its accuracy means nothing; it is "
        "the latency and FLOPs baseline"),
}


def network_summary(model, onnx_path: Path, onnx_macs: int, input_shape: tuple[int, ...]) -> dict:
    return {"flops": count_macs(model, input_shape), "onnx_macs": onnx_macs, "params": count_params(model),
            "onnx_file": onnx_path.name, "onnx_bytes": onnx_path.stat().st_size}


def kept_channels_table(graph: NetworkGraph, mask: Mask) -> dict[str, dict]:
    """Per prunable channel group: dense width and kept channels (0 for a group of a removed block)."""
    return {name: {"width": group.width, "kept": len(mask.kept_channels.get(name, []))}
            for name, group in graph.prunable().items()}


def build_report(*, run_name: str, dataset: str, model: str, method: str, dense_source: str, dense: dict, pruned: dict,
                 graph: NetworkGraph, mask: Mask, mask_document: dict, input_shape: tuple[int, ...],
                 num_classes: int, max_abs_diff_surgery: float, max_abs_diff_onnx: dict[str, float],
                 max_abs_logit: dict[str, float], test_samples: dict, engine: dict, triton: dict,
                 ort_optimized: dict | None) -> dict:
    return {
        "run": run_name,
        "dataset": dataset,
        "model": model,
        "method": method,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "model_names": triton["model_names"],
        "dense_source": DENSE_SOURCE[dense_source],
        "dense": dense,
        "pruned": pruned,
        "flops_ratio": pruned["flops"] / dense["flops"],
        "params_ratio": pruned["params"] / dense["params"],
        "mask_flops": {k: mask_document[k] for k in ("dense_flops", "pruned_flops", "flops_ratio")},
        "kept_channels": kept_channels_table(graph, mask),
        "removed_blocks": list(mask.closed_blocks),
        "max_abs_diff_surgery": max_abs_diff_surgery,
        "max_abs_diff_onnx": max_abs_diff_onnx,
        "max_abs_logit": max_abs_logit,  # ONNX diffs are held to 1e-4 x max(1, this): float32 has ~7 digits
        "onnx_opset": OPSET,
        "ort_optimized": ort_optimized,
        "test_samples": test_samples,
        "engine": engine,
        "triton": triton,
    }
