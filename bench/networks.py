"""Synthetic dense/pruned network pairs: pruning shapes at a MAC target, and their ONNX files.

A shape is a mask over the traced groups and blocks of a built-in network (`training.graph`), cut by the
same surgery the pipeline uses, so only the shape of the cut differs between variants, and the ONNX files
come from the export stage's exporter. Weights are random:
latency does not depend on their values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from polarprune.export.onnx_export import export_onnx
from polarprune.training.arch import Spec, make_spec
from polarprune.training.gating import cut, full_mask, mask_macs
from polarprune.training.graph import NetworkGraph, trace_network
from polarprune.training.mask import Mask
from polarprune.training.models import build_model

# Keep shares of successive blocks around the target: uneven, as an importance criterion leaves them,
# and at 16/32/64 channels they land on counts that are not multiples of 8.
UNEVEN_SHARE_OFFSETS = (0.19, -0.19, 0.06, -0.06)
TOLERANCE = 0.03


@dataclass
class DenseNetwork:
    """A built-in network with random weights, its spec and its trace."""
    spec: Spec
    graph: NetworkGraph

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.input_shape

    def macs(self, mask: Mask) -> float:
        return mask_macs(self.graph, mask)

    def inner_group(self, block: str) -> str:
        """The channel group inside a residual block's branch (a basic block has one)."""
        (group,) = self.graph.groups_inside(block)
        return group

    def inner_widths(self, mask: Mask) -> list[int]:
        """Kept inner width per residual block in forward order (0: closed)."""
        return [len(mask.kept_channels.get(self.inner_group(b["name"]), [])) for b in self.spec["blocks"]]


def dense_network(model: str, input_shape: tuple[int, int, int], num_classes: int = 10,
                  seed: int = 0) -> DenseNetwork:
    channels, height, width = input_shape
    spec = make_spec(model, channels, num_classes, (height, width))
    torch.manual_seed(seed)
    network = build_model(spec).eval()
    return DenseNetwork(spec, trace_network(network, torch.zeros(2, *input_shape)))


def close_blocks(dense: DenseNetwork, target: float) -> Mask:
    """Whole residual blocks removed, taken in turn from the end of each stage (blocks that change the
    shape stay), stopping at the count whose MACs come nearest the target."""
    stages: dict[str, list[str]] = {}
    for block in dense.spec["blocks"]:
        if block["shortcut"] == "identity":
            stages.setdefault(block["name"].split(".")[0], []).append(block["name"])
    by_stage = [list(reversed(blocks)) for blocks in stages.values()]
    order = [stage[i] for i in range(max(map(len, by_stage))) for stage in by_stage if i < len(stage)]
    full = full_mask(dense.graph)
    dense_macs, best = dense.macs(full), (1.0, full)
    closed: list[str] = []
    for name in order:
        closed.append(name)
        gone = {g for b in closed for g in dense.graph.groups_inside(b)}
        mask = Mask({g: k for g, k in full.kept_channels.items() if g not in gone}, sorted(closed))
        ratio = dense.macs(mask) / dense_macs
        if abs(ratio - target) < abs(best[0] - target):
            best = (ratio, mask)
    return best[1]


def with_inner_widths(dense: DenseNetwork, widths: dict[str, int]) -> Mask:
    """Every block open; block name -> kept inner width (its first channels; the rest keep all)."""
    kept = full_mask(dense.graph).kept_channels
    for block, width in widths.items():
        kept[dense.inner_group(block)] = list(range(width))
    return Mask(kept, [])


def halve_inner_widths(dense: DenseNetwork) -> Mask:
    return with_inner_widths(dense, {b["name"]: max(1, b["mid"] // 2) for b in dense.spec["blocks"]})


def uneven_inner_widths(dense: DenseNetwork, target: float, step: int = 1) -> Mask:
    """Inner widths at uneven keep shares around the target, rounded to multiples of `step` (at least one
    step), then moved one step at a time until the MACs sit within TOLERANCE of the target: the block
    keeping the largest share shrinks first, the one keeping the smallest share grows first. Blocks stay
    open, so a target below what one step per block costs is not reached."""
    full = {b["name"]: b["mid"] for b in dense.spec["blocks"]}

    def round_to_step(count: float, width: int) -> int:
        return min(width, max(step, step * math.floor(count / step + 0.5)))

    widths = {name: round_to_step(width * (target + UNEVEN_SHARE_OFFSETS[i % len(UNEVEN_SHARE_OFFSETS)]), width)
              for i, (name, width) in enumerate(full.items())}
    dense_macs = dense.macs(full_mask(dense.graph))

    def ratio() -> float:
        return dense.macs(with_inner_widths(dense, widths)) / dense_macs

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
    return with_inner_widths(dense, widths)


def write_onnx(dense: DenseNetwork, mask: Mask, path: str | Path) -> Path:
    """ONNX of the dense network cut to `mask` (random weights, eval mode) by the export stage's own
    exporter, so the graphs timed here are the kind the pipeline serves: input `input` NCHW with a dynamic
    batch, output `logits`, cleaned and checked."""
    model = cut(dense.graph, mask, dense.graph.module).eval()
    export_onnx(model, path, dense.input_shape)
    return Path(path)
