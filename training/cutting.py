"""The cut: a mask turned into the physically smaller network, layer by layer (`training.cuts`), closed
residual branches erased from the graph.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .cost import check_mask
from .cuts import CUTS
from .graph import Layer, Layout, NetworkGraph, rewrite_shapes
from .mask import Mask, MaskError


def kept_index(graph: NetworkGraph, layout: Layout, mask: Mask) -> torch.Tensor | None:
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


def cut(graph: NetworkGraph, mask: Mask, network: fx.GraphModule) -> fx.GraphModule:
    """The physically smaller network: `network` (plain, node for node `graph.module`, e.g.
    `GatedNetwork.plain()`; not modified) with the mask's channels and blocks removed."""
    check_mask(graph, mask)
    pruned = copy.deepcopy(network)
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
        keep_in, keep_out = kept_index(graph, layer.in_layout, mask), kept_index(graph, layer.out_layout, mask)
        if keep_in is None and keep_out is None:
            continue
        module = pruned.get_submodule(path)
        parent, _, leaf = path.rpartition(".")
        setattr(pruned.get_submodule(parent) if parent else pruned, leaf,
                _cut_layer(layer, module, keep_in, keep_out))
    rewrite_shapes(graph, mask.kept_channels, pruned)  # head counts of attention reshapes
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
