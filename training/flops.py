"""Multiply-accumulate (MAC) and parameter counts of a plain (dense or pruned) network.

"FLOPs" in this project means conv + linear + matrix-product MACs (the convention of the pruning
literature: ResNet-20 at 32x32x3 is 40.55M), every one of them, prunable or not (`training.graph.layer_macs`
is the formula). BN, ReLU, pooling and adds are left out. The count comes from the network's trace
(`training.graph`), the same one whose gated form the FLOPs target is measured on (`gating.kept_macs`).
"""
from __future__ import annotations

from torch import nn

from .gating import kept_macs
from .gates import Gate
from .graph import example_for, trace_network


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one image of `input_shape` (C, H, W) through `model`, from real tensor shapes."""
    graph = trace_network(model, example_for(model, input_shape))
    return int(round(kept_macs(graph, {}, {})))


def count_params(model: nn.Module) -> int:
    """Parameters of the deployable network (gate parameters excluded: export removes them)."""
    gate_params = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in gate_params)
