"""What a mask of a traced network keeps and what that costs: the widths it keeps, the layer sum every cost
is (MACs: `MacsCost`; measured latency: `training.latency.LatencyCost`), the units the gates decide in
(`group_units`), and the check that a mask fits the network. Gate values in place of a mask's widths give
the gates' differentiable cost (`training.gating.GatedNetwork`).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol

import torch

from .graph import Layer, Layout, NetworkGraph, layer_macs
from .mask import Mask, MaskProblem, check_fits, leading_mask, unit_sizes

Number = torch.Tensor | float


LayerCost = Callable[[Layer, Number, Number], Number]


def costed_layers(graph: NetworkGraph) -> dict[str, Layer]:
    """The layers a cost model prices: convs, depthwise convs and linears (norms fold into them)."""
    return {path: layer for path, layer in graph.layers.items() if layer.kind != "norm"}


def layer_sum(graph: NetworkGraph, widths: Mapping[str, Number], blocks_open: Mapping[str, Number],
              layer_cost: LayerCost) -> Number:
    """Sum over costed layers of `layer_cost(layer, in_width, out_width)`, each times the values of the
    blocks holding it, given kept widths of prunable groups (absent: full width) and block values (absent:
    open). Tensors in, tensor out (differentiable); numbers in, number out."""
    total: Number = 0.0

    def width(layout: Layout) -> Number:
        return sum((widths.get(graph.group_of_space[s.space], s.width) for s in layout), 0.0)

    for layer in costed_layers(graph).values():
        term = layer_cost(layer, width(layer.in_layout), width(layer.out_layout))
        for block in layer.blocks:
            term = term * blocks_open.get(block, 1.0)
        total = total + term
    return total


def kept_macs(graph: NetworkGraph, widths: Mapping[str, Number], blocks_open: Mapping[str, Number]) -> Number:
    """MACs of conv and linear layers (`layer_sum` of `layer_macs`)."""
    return layer_sum(graph, widths, blocks_open, layer_macs)


def mask_widths(mask: Mask) -> tuple[dict[str, float], dict[str, float]]:
    """A mask as `layer_sum` arguments: kept widths of its groups, its closed blocks at 0."""
    return {name: float(len(kept)) for name, kept in mask.kept_channels.items()}, \
        {block: 0.0 for block in mask.closed_blocks}


def mask_macs(graph: NetworkGraph, mask: Mask) -> float:
    return float(kept_macs(graph, *mask_widths(mask)))


class Cost(Protocol):
    """What the gates' cost model provides (`MacsCost`, `training.latency.LatencyCost`): `kept` of expected
    widths and block values (differentiable, like `kept_macs`), its dense value, and a name for metrics."""
    name: str
    dense: float

    def kept(self, widths: Mapping[str, Number], blocks_open: Mapping[str, Number]) -> Number: ...


class MacsCost:
    """Kept MACs of conv and linear layers: the `cost: flops` model."""
    name = "flops"

    def __init__(self, graph: NetworkGraph):
        self.graph = graph
        self.dense = float(kept_macs(graph, {}, {}))

    def kept(self, widths: Mapping[str, Number], blocks_open: Mapping[str, Number]) -> Number:
        return kept_macs(self.graph, widths, blocks_open)


def mask_cost(cost: Cost, mask: Mask) -> float:
    return float(cost.kept(*mask_widths(mask)))


def group_units(graph: NetworkGraph, round_to: int) -> dict[str, list[int]]:
    """Channels per unit of every prunable group (`training.mask.unit_sizes`): units of `round_to` channels,
    widened to whole, aligned conv groups where a grouped conv reads the group (`ChannelGroup.unit`)."""
    return {n: unit_sizes(g.width, math.lcm(round_to, g.unit)) for n, g in graph.prunable().items()}


def mask_problem(graph: NetworkGraph, cost: Cost | None = None, round_to: int = 1) -> MaskProblem:
    """What a mask of this network chooses among (groups in units, `group_units`), and its cost (default:
    MACs)."""
    cost = cost or MacsCost(graph)
    return MaskProblem(group_units(graph, round_to),
                       {name: graph.groups_inside(name) for name in graph.blocks},
                       lambda mask: mask_cost(cost, mask))


def group_widths(graph: NetworkGraph) -> dict[str, int]:
    """Channels of every prunable group."""
    return {name: group.width for name, group in graph.prunable().items()}


def full_mask(graph: NetworkGraph) -> Mask:
    return leading_mask(group_widths(graph))


def check_mask(graph: NetworkGraph, mask: Mask, source: str = "mask") -> None:
    """`training.mask.check_fits` against the traced network's groups and blocks."""
    check_fits(mask, group_widths(graph), {name: graph.groups_inside(name) for name in graph.blocks}, source)
