"""Synthetic dense/pruned network pairs: pruning shapes at a MAC target, and their ONNX files.

Pruned specs come from the same `training.arch` specs the pipeline uses, so only the shape of the cut
differs between variants, and the ONNX files come from the export stage's exporter. Weights are random:
latency does not depend on their values.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from export.onnx_export import export_onnx
from training.arch import Spec, make_spec
from training.flops import gated_macs, layer_costs
from training.models import GateOptions, build_model

# Keep shares of successive blocks around the target: uneven, as an importance criterion leaves them,
# and at 16/32/64 channels they land on counts that are not multiples of 8.
UNEVEN_SHARE_OFFSETS = (0.19, -0.19, 0.06, -0.06)
TOLERANCE = 0.03


def dense_spec(model: str, input_shape: tuple[int, int, int], num_classes: int = 10) -> Spec:
    channels, height, width = input_shape
    return make_spec(model, channels, num_classes, (height, width))


class MacCounter:
    """MACs of any cut of one dense resnet spec, from its cost table (no forward pass per spec)."""

    def __init__(self, dense: Spec):
        self.costs = layer_costs(build_model(dense, GateOptions()))

    def __call__(self, spec: Spec) -> float:
        widths = {b["name"]: float(b["mid"]) for b in spec["blocks"]}
        open_blocks = {b["name"]: float(not b["closed"]) for b in spec["blocks"]}
        return float(gated_macs(self.costs, widths, open_blocks))


def close_blocks(spec: Spec, target: float) -> Spec:
    """Whole residual blocks removed, taken in turn from the end of each stage (blocks that change the
    shape stay), stopping at the count whose MACs come nearest the target."""
    stages: dict[str, list[dict]] = {}
    for block in spec["blocks"]:
        if block["shortcut"] == "identity":
            stages.setdefault(block["name"].split(".")[0], []).append(block)
    by_stage = [list(reversed(blocks)) for blocks in stages.values()]
    order = [stage[i]["name"] for i in range(max(map(len, by_stage))) for stage in by_stage if i < len(stage)]
    macs = MacCounter(spec)
    dense_macs, best = macs(spec), (1.0, spec)
    pruned = copy.deepcopy(spec)
    for name in order:
        block = next(b for b in pruned["blocks"] if b["name"] == name)
        block["closed"], block["mid"] = True, 0
        ratio = macs(pruned) / dense_macs
        if abs(ratio - target) < abs(best[0] - target):
            best = (ratio, copy.deepcopy(pruned))
    return best[1]


def with_inner_widths(spec: Spec, widths: dict[str, int]) -> Spec:
    pruned = copy.deepcopy(spec)
    for block in pruned["blocks"]:
        block["mid"] = widths.get(block["name"], block["mid"])
    return pruned


def halve_inner_widths(spec: Spec) -> Spec:
    return with_inner_widths(spec, {b["name"]: max(1, b["mid"] // 2) for b in spec["blocks"]})


def uneven_inner_widths(spec: Spec, target: float, step: int = 1) -> Spec:
    """Inner widths at uneven keep shares around the target, rounded to multiples of `step` (at least one
    step), then moved one step at a time until the MACs sit within TOLERANCE of the target: the block
    keeping the largest share shrinks first, the one keeping the smallest share grows first. Blocks stay
    open, so a target below what one step per block costs is not reached."""
    full = {b["name"]: b["mid"] for b in spec["blocks"]}

    def round_to_step(count: float, width: int) -> int:
        return min(width, max(step, step * math.floor(count / step + 0.5)))

    widths = {name: round_to_step(width * (target + UNEVEN_SHARE_OFFSETS[i % len(UNEVEN_SHARE_OFFSETS)]), width)
              for i, (name, width) in enumerate(full.items())}
    macs = MacCounter(spec)
    dense_macs = macs(spec)

    def ratio() -> float:
        return macs(with_inner_widths(spec, widths)) / dense_macs

    while ratio() > target + TOLERANCE:
        shrinkable = [n for n in widths if widths[n] - step >= step]
        if not shrinkable:
            break
        name = max(shrinkable, key=lambda n: widths[n] / full[n])
        widths[name] -= step
    while ratio() < target - TOLERANCE:
        growable = [n for n in widths if widths[n] + step <= full[n]]
        if not growable:
            break
        name = min(growable, key=lambda n: widths[n] / full[n])
        widths[name] += step
        if ratio() > target + TOLERANCE:
            widths[name] -= step
            break
    return with_inner_widths(spec, widths)


def write_onnx(spec: Spec, path: str | Path, seed: int = 0) -> Path:
    """ONNX of the spec's network (random weights, eval mode) by the export stage's own exporter, so the
    graphs timed here are the kind the pipeline serves: input `input` NCHW with a dynamic batch, output
    `logits`, cleaned and checked."""
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    export_onnx(model, path, (spec["in_channels"], *spec["input_size"]))
    return Path(path)
