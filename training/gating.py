"""Gates in any traced network, their cost, and the cut: the one place that knows what a mask means.

`GatedNetwork` wraps a copy of the user's network, traced once (`training.graph`), with a channel `Gate`
per prunable group and a block `Gate` per residual branch inserted into the traced graph: a gate point's
output is multiplied by its groups' gate values (ones for channels that cannot go), a branch output by its
block gate. The user's modules keep their paths and state-dict keys. All gates start open (score
`init_score` > 0, hard value 1), so before the first step the gated network computes exactly what the
network computed.

The cost is the kept MACs of every conv and linear as a function of gate values (`kept_macs`): widths are
sums of gate values, a closed block switches its layers off, so hard gates give the exact kept cost and
the straight-through estimator its gradient. `cut` turns a mask into the physically smaller network.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import fx, nn

from .cuts import CUTS
from .gates import Gate
from .graph import Layer, Layout, NetworkGraph
from .mask import GateDecision, Mask, MaskProblem, choose_mask

Number = torch.Tensor | float


def gate_channels(x: torch.Tensor, *parts: torch.Tensor | int) -> torch.Tensor:
    """x times per-channel values: gate value tensors and, for channels no gate covers, their count."""
    if len(parts) == 1 and isinstance(parts[0], torch.Tensor):
        values = parts[0]
    else:
        values = torch.cat([p if isinstance(p, torch.Tensor) else x.new_ones(p) for p in parts])
    return x * values.view(1, -1, *([1] * (x.dim() - 2)))


torch.fx.wrap("gate_channels")


def _key(name: str) -> str:
    return name.replace(".", "__")


def kept_macs(graph: NetworkGraph, widths: Mapping[str, Number], blocks_open: Mapping[str, Number]) -> Number:
    """MACs of conv and linear layers given kept widths of prunable groups (absent: full width) and block
    values (absent: open). Tensors in, tensor out (differentiable); numbers in, number out."""
    total: Number = 0.0

    def width(layout: Layout) -> Number:
        return sum((widths.get(graph.group_of_space[s.space], s.width) for s in layout), 0.0)

    for layer in graph.layers.values():
        if layer.kind == "norm":
            continue
        term = layer.unit_macs * width(layer.in_layout)
        if layer.kind != "depthwise":
            term = term * width(layer.out_layout)
        for block in layer.blocks:
            term = term * blocks_open.get(block, 1.0)
        total = total + term
    return total


def mask_macs(graph: NetworkGraph, mask: Mask) -> float:
    widths = {name: float(len(kept)) for name, kept in mask.kept_channels.items()}
    return float(kept_macs(graph, widths, {block: 0.0 for block in mask.closed_blocks}))


def full_mask(graph: NetworkGraph) -> Mask:
    return Mask({name: list(range(group.width)) for name, group in graph.prunable().items()}, [])


class GatedNetwork(nn.Module):
    """A user's network with polarized gates; see the module docstring."""

    def __init__(self, graph: NetworkGraph, init_score: float = 2.0):
        super().__init__()
        self.graph = graph
        network = fx.GraphModule(graph.module, copy.deepcopy(graph.module.graph), class_name="GatedNetwork")
        self.channel_gates = nn.ModuleDict({_key(name): Gate(group.width, init_score)
                                            for name, group in graph.prunable().items()})
        self.block_gates = nn.ModuleDict({_key(name): Gate(1, init_score) for name in graph.blocks})
        network.add_submodule("channel_gates", self.channel_gates)
        network.add_submodule("block_gates", self.block_gates)
        self._insert_gates(network)
        self.network = network

    def _insert_gates(self, network: fx.GraphModule) -> None:
        nodes = {node.name: node for node in network.graph.nodes}
        prunable = self.graph.prunable()
        for node_name, layout in self.graph.gate_points.items():
            node = cursor = nodes[node_name]
            parts: list[fx.Node | int] = []
            for segment in layout:
                group = self.graph.group_of_space[segment.space]
                if group not in prunable:
                    parts.append(segment.width)
                    continue
                with network.graph.inserting_after(cursor):
                    cursor = network.graph.call_module(f"channel_gates.{_key(group)}")
                parts.append(cursor)
            with network.graph.inserting_after(cursor):
                gated = network.graph.call_function(gate_channels, (node, *parts))
            node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
        for name, block in self.graph.blocks.items():
            node = nodes[block.branch_output]
            # the branch output may already carry its channel gate: gate what the add reads
            add = nodes[block.add_node]
            operand = next(a for a in add.all_input_nodes if a is node or (a.op == "call_function"
                                                                         and a.target is gate_channels
                                                                         and a.args[0] is node))
            with network.graph.inserting_before(add):
                value = network.graph.call_module(f"block_gates.{_key(name)}")
                gated = network.graph.call_function(torch.mul, (operand, value))
            add.replace_input_with(operand, gated)
        network.graph.lint()
        network.recompile()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    # -- gate values ------------------------------------------------------------------------------
    def channel_gate(self, group: str) -> Gate:
        return self.channel_gates[_key(group)]

    def block_gate(self, block: str) -> Gate:
        return self.block_gates[_key(block)]

    def kept_ratio(self) -> torch.Tensor:
        """Kept MACs / dense MACs from the gate values of the last forward pass (carries STE gradients)."""
        widths = {name: self.channel_gate(name).last_values.sum() for name in self.graph.prunable()}
        blocks = {name: self.block_gate(name).last_values.sum() for name in self.graph.blocks}
        return kept_macs(self.graph, widths, blocks) / self.dense_macs

    @property
    def dense_macs(self) -> float:
        return float(kept_macs(self.graph, {}, {}))

    def gate_probs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(channel gate probabilities per group, block gate probabilities) of the last forward pass."""
        return ([self.channel_gate(n).last_probs for n in self.graph.prunable()],
                [self.block_gate(n).last_probs for n in self.graph.blocks])

    # -- the mask ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decisions(self) -> tuple[dict[str, GateDecision], dict[str, tuple[bool, float]]]:
        """Open = score > 0, confidence = sigmoid(score), per channel group and per block."""
        channels = {name: GateDecision((self.channel_gate(name).score > 0).cpu(),
                                       torch.sigmoid(self.channel_gate(name).score).cpu())
                    for name in self.graph.prunable()}
        blocks = {name: (bool(self.block_gate(name).score[0] > 0), float(torch.sigmoid(self.block_gate(name).score[0])))
                  for name in self.graph.blocks}
        return channels, blocks

    def mask_problem(self) -> MaskProblem:
        block_groups = {name: self.graph.groups_inside(name) for name in self.graph.blocks}
        return MaskProblem({n: g.width for n, g in self.graph.prunable().items()}, block_groups,
                           lambda mask: mask_macs(self.graph, mask))

    def mask(self, round_to: int = 1, target_ratio: float | None = None, tolerance: float = 0.02) -> Mask:
        """The static sub-network the gates chose: widths rounded to `round_to`, moved into the target band
        when `target_ratio` is given."""
        channels, blocks = self.decisions()
        return choose_mask(self.mask_problem(), channels, blocks, round_to, target_ratio, tolerance)

    @torch.no_grad()
    def freeze(self, mask: Mask) -> None:
        """Fix every gate to `mask` (hard 0/1); the network then computes what `cut(mask)` computes."""
        check_mask(self.graph, mask)
        gone = {g for b in mask.closed_blocks for g in self.graph.groups_inside(b)}
        for name, group in self.graph.prunable().items():
            values = torch.zeros(group.width)
            if name not in gone:
                values[mask.kept_channels[name]] = 1.0
            self.channel_gate(name).freeze(values)
        for name in self.graph.blocks:
            self.block_gate(name).freeze(torch.tensor([0.0 if name in mask.closed_blocks else 1.0]))

    def plain(self) -> fx.GraphModule:
        """The network without gates (a copy): the traced user network holding the trained weights."""
        return copy.deepcopy(self.graph.module)


def check_mask(graph: NetworkGraph, mask: Mask, source: str = "mask") -> None:
    """Every group the mask names exists and keeps distinct in-range indices; every open group is named."""
    prunable = graph.prunable()
    unknown = sorted(set(mask.kept_channels) - set(prunable)) + sorted(set(mask.closed_blocks) - set(graph.blocks))
    if unknown:
        raise MaskError(f"{source}: names groups or blocks the network does not have: {unknown}")
    gone = {g for b in mask.closed_blocks for g in graph.groups_inside(b)}
    for name, group in prunable.items():
        kept = mask.kept_channels.get(name)
        if name in gone:
            continue
        if kept is None:
            raise MaskError(f"{source}: no kept channels for group {name}")
        if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= group.width:
            raise MaskError(f"{source}: group {name} keeps {len(kept)} channel indices that are not distinct, "
                            f"non-empty and within [0, {group.width})")


class MaskError(ValueError):
    """A mask that does not fit the network it is applied to."""


# -- the cut ----------------------------------------------------------------------------------------

def _kept_index(graph: NetworkGraph, layout: Layout, mask: Mask) -> torch.Tensor | None:
    """Channel indices kept along an axis laid out as `layout` (None: all of them)."""
    parts, offset, cut = [], 0, False
    for segment in layout:
        kept = mask.kept_channels.get(graph.group_of_space[segment.space])
        if kept is not None and len(kept) < segment.width:
            parts.append(torch.tensor(sorted(kept), dtype=torch.long) + offset)
            cut = True
        else:
            parts.append(torch.arange(segment.width) + offset)
        offset += segment.width
    return torch.cat(parts) if cut else None


def cut(graph: NetworkGraph, mask: Mask, network: fx.GraphModule | None = None) -> fx.GraphModule:
    """The physically smaller network: `network` (default: the traced plain network; not modified) with
    the mask's channels and blocks removed. A plain GraphModule: saves and reloads with `save_pruned`."""
    check_mask(graph, mask)
    pruned = copy.deepcopy(network if network is not None else graph.module)
    nodes = {node.name: node for node in pruned.graph.nodes}
    for name in mask.closed_blocks:
        block = graph.blocks[name]
        add = nodes[block.add_node]
        survivor = next(a for a in add.all_input_nodes if a.name != block.branch_output)
        add.replace_all_uses_with(survivor)
        pruned.graph.erase_node(add)
        for node_name in reversed(block.branch_nodes):
            pruned.graph.erase_node(nodes[node_name])
    live = {n.target for n in pruned.graph.nodes if n.op == "call_module"}
    for path, layer in graph.layers.items():
        if path not in live:
            continue
        keep_in, keep_out = _kept_index(graph, layer.in_layout, mask), _kept_index(graph, layer.out_layout, mask)
        if keep_in is None and keep_out is None:
            continue
        module = pruned.get_submodule(path)
        parent, _, leaf = path.rpartition(".")
        setattr(pruned.get_submodule(parent) if parent else pruned, leaf,
                _cut_layer(layer, module, keep_in, keep_out))
    pruned.delete_all_unused_submodules()
    pruned.graph.lint()
    pruned.recompile()
    return pruned


def _cut_layer(layer: Layer, module: nn.Module, keep_in: torch.Tensor | None,
               keep_out: torch.Tensor | None) -> nn.Module:
    cut_for = CUTS.get((type(module), layer.kind))
    if cut_for is None:
        raise MaskError(f"no cut for {type(module).__name__} ({layer.kind}) at {layer.path}")
    return cut_for(module, keep_in, keep_out)
