"""Resizing a plain (ungated) SpecNet during training, and putting the result back into the dense shape.

`shrink` keeps chosen channels of prunable units and returns `build_model(smaller spec)` holding the cut
weights. `embed` is its inverse for deployment: the dense-shaped gated network, gates frozen to the kept
channels and removed channels zeroed, which is exactly what export expects of a finished gated run.

Which layers follow a unit comes from `training.flops.layer_costs`: a conv/linear whose out_gate is the
unit loses output channels, and so does the batch norm after it; one whose in_gate is the unit loses
input channels. How one layer is cut is `training.cuts`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .arch import Spec, prunable_layers, prune_spec
from .cuts import cut_batchnorm, cut_conv_in, cut_conv_out, cut_linear_in
from .flops import layer_costs
from .models import GateOptions, SpecNet, build_model

# module path -> (unit setting its output channels, unit setting its input channels); None: fixed
ChannelAxes = dict[str, tuple[str | None, str | None]]


def norm_after(conv_path: str) -> str:
    """The batch norm that normalises a conv's output: `models.conv_bn` pairs conv/bn, conv1/bn1, conv2/bn2."""
    parent, _, leaf = conv_path.rpartition(".")
    name = leaf.replace("conv", "bn", 1)
    return f"{parent}.{name}" if parent else name


def channel_axes(model: SpecNet) -> ChannelAxes:
    """Every conv, linear and batch norm whose width follows a prunable unit, with the unit per axis."""
    axes: ChannelAxes = {}
    for cost in layer_costs(model):
        if cost.out_gate is None and cost.in_gate is None:
            continue
        axes[cost.module] = (cost.out_gate, cost.in_gate)
        if cost.out_gate is not None and isinstance(model.get_submodule(cost.module), nn.Conv2d):
            norm = norm_after(cost.module)
            if not isinstance(model.get_submodule(norm), nn.BatchNorm2d):
                raise TypeError(f"{norm} is not the batch norm after {cost.module}")
            axes[norm] = (cost.out_gate, None)
    return axes


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def shrink(model: SpecNet, kept: dict[str, list[int]]) -> SpecNet:
    """`model` cut down to `kept` channels (indices into its current widths) of the named units; units
    not named keep every channel. Ungated networks only; `model` itself is left as it was."""
    if model.gated:
        raise ValueError("shrink works on plain networks; a gated network is cut by export")
    widths = prunable_layers(model.spec)
    index = {unit: torch.tensor(sorted(channels), dtype=torch.long) for unit, channels in kept.items()
             if len(channels) < widths[unit]}
    cut = copy.deepcopy(model)
    for path, (out_unit, in_unit) in channel_axes(model).items():
        module = cut.get_submodule(path)
        if out_unit in index:
            module = cut_batchnorm(module, index[out_unit]) if isinstance(module, nn.BatchNorm2d) \
                else cut_conv_out(module, index[out_unit])
        if in_unit in index:
            module = cut_linear_in(module, index[in_unit]) if isinstance(module, nn.Linear) \
                else cut_conv_in(module, index[in_unit])
        _replace(cut, path, module)
    all_kept = {unit: kept.get(unit, list(range(width))) for unit, width in widths.items()}
    smaller = build_model(prune_spec(model.spec, all_kept, []))
    smaller.load_state_dict(cut.state_dict(), strict=True)
    return smaller.to(next(model.parameters()).device).train(model.training)


@torch.no_grad()
def embed(small: SpecNet, dense_spec: Spec, kept: dict[str, list[int]], gates: GateOptions) -> SpecNet:
    """The dense-shaped gated network equal to `small`: its weights at the `kept` channel positions
    (indices into the dense widths), every other channel zeroed (batch-norm scale and shift included, so
    the gates-removed network computes the same function), channel gates frozen to `kept`."""
    dense = build_model(dense_spec, gates)
    axes = channel_axes(small)
    index = {unit: torch.tensor(sorted(channels), dtype=torch.long) for unit, channels in kept.items()}
    targets = dense.state_dict()
    for key, value in small.state_dict().items():
        module, _, leaf = key.rpartition(".")
        out_unit, in_unit = axes.get(module, (None, None))
        target = torch.ones_like(targets[key]) if leaf == "running_var" else torch.zeros_like(targets[key])
        if value.dim() == 0:
            target = value.clone()
        else:
            if in_unit is not None and value.dim() > 1:
                spread = torch.zeros(value.shape[0], *target.shape[1:], dtype=value.dtype)
                value = spread.index_copy_(1, index[in_unit], value.cpu())
            if out_unit is not None:
                target.index_copy_(0, index[out_unit], value.cpu())
            else:
                target.copy_(value)
        targets[key] = target
    dense.load_state_dict(targets, strict=True)
    for path, gate in dense.gates().items():
        if path.endswith(".block_gate"):  # shrink never closes a block
            gate.freeze(torch.ones(1))
            continue
        values = torch.zeros(gate.width)
        values[index[path.rpartition(".")[0]]] = 1.0
        gate.score.copy_((values * 2 - 1) * abs(gates.init_score))  # +-: the gate-score plot shows the mask
        gate.freeze(values)
    return dense.to(next(small.parameters()).device).train(small.training)
