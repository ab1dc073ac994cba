"""MACs: the one formula (`layer_macs`) behind the trace's block costs, the gates' MACs cost
(`training.gating.kept_macs`, `training.flops.count_macs`) and through them the API, export's report and bench; and the counts of layers no
cut shrinks (`fixed_macs`), from the shapes the trace propagated. One example, batch axis excluded.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

MATMULS = {torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", torch.mm, "mm"}


def traced_shape(node) -> tuple[int, ...] | None:
    """A node's output shape as ShapeProp recorded it (None: not a single tensor)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def layer_macs(layer, in_width=None, out_width=None):
    """MACs of one example through a layer at these widths (default: its full widths); numbers or tensors.
    The one MAC formula: the trace's block costs, the gates' MACs cost (`training.gating.kept_macs`), and
    through them the API, export's report and bench. A conv or linear costs unit * in * out; a grouped or
    depthwise conv unit * width * channels per group; the attention products (q kᵀ and scores times v,
    `F.scaled_dot_product_attention`) unit * kept head channels; a layer no cut shrinks its fixed count."""
    if layer.kind == "fixed":
        return layer.unit_macs
    in_width = sum(s.width for s in layer.in_layout) if in_width is None else in_width
    if layer.kind == "attention":  # unit: tokens x tokens (x 2 for both products of one attention call)
        return layer.unit_macs * in_width
    out_width = sum(s.width for s in layer.out_layout) if out_width is None else out_width
    if layer.kind in ("depthwise", "grouped"):
        return layer.unit_macs * in_width * layer.group_width
    return layer.unit_macs * in_width * out_width


def fixed_macs(node: fx.Node, module: nn.Module | None = None) -> int | None:
    """MACs of one example through a layer no cut shrinks, from the traced shapes (None: not known)."""
    out = traced_shape(node)
    inputs = [traced_shape(a) for a in node.all_input_nodes]
    if isinstance(module, nn.MultiheadAttention) and len(inputs) >= 1 and None not in inputs:
        query, key, value = (inputs * 3)[:3] if len(inputs) < 3 else inputs[:3]
        axis = 1 if module.batch_first else 0  # the sequence axis
        length, source, dim = query[axis], key[axis], module.embed_dim
        return (length * dim * dim + source * (module.kdim + module.vdim) * dim  # q, k, v projections
                + 2 * length * source * dim + length * dim * dim)                # scores, weighted sum, out
    if out is None or not inputs or inputs[0] is None:
        return None
    per_example = math.prod(out[1:])
    target = module if module is not None else node.target
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return per_example * module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):  # transposed: every input element meets a kernel
        return math.prod(inputs[0][1:]) * module.out_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return per_example * module.in_features
    if isinstance(module, nn.Bilinear):
        return per_example * module.in1_features * module.in2_features
    if target in (F.conv1d, F.conv2d, F.conv3d):
        weight = inputs[1]
        return per_example * math.prod(weight[1:]) if weight else None
    if target is F.linear:
        return per_example * inputs[0][-1]
    if target is F.scaled_dot_product_attention:
        q, k, v = inputs[:3]
        return math.prod(q[1:-1]) * k[-2] * (q[-1] + v[-1])
    if target in (torch.addmm, torch.baddbmm):
        return per_example * inputs[1][-1] if len(inputs) > 1 and inputs[1] else None
    if target in MATMULS:
        return per_example * inputs[0][-1]
    return None
