"""Multiply-accumulate (MAC) counting: measured on a physical network, and differentiable on a gated one.

"FLOPs" in this project means conv + linear MACs (the convention of the pruning literature: ResNet-20
at 32x32x3 is 40.55M). BN, ReLU, pooling and adds are left out.

Every conv/linear cost is unit_macs * in_width * out_width (unit_macs = k*k*H_out*W_out / groups). In a
gated network the widths are sums of gate values and a residual block's gate switches its convs off, so
the same formula gives the exact kept cost for hard gates and a gradient through the STE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import Spec


@dataclass(frozen=True)
class LayerCost:
    """One conv or linear: its cost per (input channel, output channel) pair and where its widths come from.
    in_gate/out_gate name the prunable unit whose channel gate sets that width (None: fixed);
    block names the residual block whose gate switches the layer off (None: always on)."""
    module: str
    unit_macs: int
    in_width: int
    out_width: int
    in_gate: str | None
    out_gate: str | None
    block: str | None

    @property
    def macs(self) -> int:
        return self.unit_macs * self.in_width * self.out_width


def measure_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, int, int]]:
    """Module path -> (unit_macs, in_width, out_width) for each Conv2d/Linear, from one dummy forward."""
    found: dict[str, tuple[int, int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def conv_hook(mod, _inp, out, name=name):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                found[name] = (k * out.shape[2] * out.shape[3] // mod.groups, mod.in_channels, mod.out_channels)
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear) and name.split(".")[-1] != "head":  # gate heads are not the network
            def linear_hook(mod, _inp, _out, name=name):
                found[name] = (1, mod.in_features, mod.out_features)
            hooks.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    weight = next(model.parameters())  # the dummy input lives where the weights do (CUDA, meta) and in their dtype
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=weight.device, dtype=weight.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return found


def input_shape(spec: Spec) -> tuple[int, int, int]:
    return (spec["in_channels"], *spec["input_size"])


def count_macs(model: nn.Module) -> int:
    """MACs of one image through a physical (dense or pruned) SpecNet, counted from real tensor shapes."""
    return sum(unit * cin * cout for unit, cin, cout in measure_layers(model, input_shape(model.spec)).values())


def count_params(model: nn.Module) -> int:
    """Parameters of the deployable network (gate parameters excluded: export removes them)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".gate." not in f".{name}"
               and ".block_gate." not in f".{name}")


def layer_costs(model: nn.Module) -> list[LayerCost]:
    """The cost table of a gated SpecNet: which gate sets each layer's widths, which block switches it off."""
    spec = model.spec
    measured = measure_layers(model, input_shape(spec))
    refs: dict[str, tuple[str | None, str | None, str | None]] = {}
    if spec["family"] == "resnet":
        refs["stem.conv"] = (None, None, None)
        for block in spec["blocks"]:
            name = block["name"]
            refs[f"{name}.conv1"] = (None, name, name)
            refs[f"{name}.conv2"] = (name, None, name)
            refs[f"{name}.shortcut.conv"] = (None, None, None)
        refs["fc"] = (None, None, None)
    else:
        previous = None
        for layer in spec["layers"]:
            refs[f"{layer['name']}.conv"] = (previous, layer["name"], None)
            previous = layer["name"]
        refs["fc"] = (previous, None, None)
    costs = []
    for module, (unit, cin, cout) in measured.items():
        if module not in refs:
            raise KeyError(f"no cost reference for layer {module}")
        in_gate, out_gate, block = refs[module]
        costs.append(LayerCost(module, unit, cin, cout, in_gate, out_gate, block))
    return costs


def gated_macs(costs: list[LayerCost], channel_widths: dict[str, torch.Tensor | float],
               block_open: dict[str, torch.Tensor | float]) -> torch.Tensor | float:
    """Kept MACs given per-unit kept widths (sums of gate values) and block gate values.
    Works on tensors (differentiable) and on plain numbers alike."""
    total = 0.0
    for cost in costs:
        cin = channel_widths[cost.in_gate] if cost.in_gate else cost.in_width
        cout = channel_widths[cost.out_gate] if cost.out_gate else cost.out_width
        term = cost.unit_macs * cin * cout
        if cost.block is not None:
            term = term * block_open[cost.block]
        total = total + term
    return total
