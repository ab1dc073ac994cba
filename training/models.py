"""Networks built from an architecture spec (`training.arch`), with or without gates.

Module paths equal spec names ("layer2.0.conv1", "features.3.conv"), so a mask, a cost table and a
state dict all speak the same language. Gated networks carry a channel `Gate` at "<unit>.gate" and, for
residual blocks, a block `Gate` at "<block>.block_gate"; plain (dense or pruned) networks carry none.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Spec, validate_spec
from .gates import Gate, gate_multiplier, gated_relu


@dataclass(frozen=True)
class GateOptions:
    init_score: float = 2.0
    dynamic: bool = False


def conv_bn(in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(out_ch)


class GatedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose output a gate multiplies: forward(x, gate) == BatchNorm2d.forward(x) * gate.

    A static gate (values (C,) or (1,)) is folded into the affine parameters, bn with (weight * g,
    bias * g): the product costs C numbers instead of a pass over the activation, and its gradient comes
    from the weight and bias gradients the norm computes anyway. A dynamic gate (N, C) or (N, 1)
    multiplies the output. Running statistics are updated exactly as nn.BatchNorm2d updates them. The
    state dict is nn.BatchNorm2d's. Used for the residual branch's last norm, which export never cuts
    (export.surgery cuts by exact module type); export.graph reads the gate argument as a gate on the
    norm's output channels."""

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if not self.affine:
            raise ValueError("GatedBatchNorm2d folds the gate into the affine parameters: affine=True")

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:
            return super().forward(x)
        if gate.dim() > 1:
            return super().forward(x) * gate_multiplier(gate, x.dim())
        self._check_input_dim(x)
        # nn.BatchNorm2d.forward's bookkeeping, unchanged
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        buffers = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if buffers else None, self.running_var if buffers else None,
                            self.weight * gate, self.bias * gate, batch_stats, factor, self.eps)


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride and append zero channels. No weights."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))


class ConvShortcut(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv, self.bn = conv_bn(in_ch, out_ch, stride, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def make_shortcut(kind: str, in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if kind == "identity":
        return nn.Identity()
    return PadShortcut(in_ch, out_ch, stride) if kind == "pad" else ConvShortcut(in_ch, out_ch, stride)


class BasicBlock(nn.Module):
    """relu(shortcut(x) + block_gate * conv2(relu(conv1(x)) * channel_gate)). A closed block keeps only
    its shortcut; its output is relu(shortcut(x)), which for identity/pad shortcuts equals shortcut(x)
    because the block input is itself a ReLU output."""

    def __init__(self, block: dict, gates: GateOptions | None):
        super().__init__()
        self.closed = bool(block["closed"])
        self.shortcut = make_shortcut(block["shortcut"], block["in"], block["out"], block["stride"])
        self.shortcut_needs_relu = block["shortcut"] == "conv"
        if self.closed:
            return
        self.conv1, self.bn1 = conv_bn(block["in"], block["mid"], block["stride"])
        self.conv2, self.bn2 = conv_bn(block["mid"], block["out"])
        if gates is not None:
            dynamic_in = block["in"] if gates.dynamic else None
            # All inner channels closed is a legal state here: it equals closing the block.
            self.gate = Gate(block["mid"], gates.init_score, dynamic_in, min_open=0)
            self.block_gate = Gate(1, gates.init_score, dynamic_in, min_open=0)
            self.bn2 = GatedBatchNorm2d(block["out"])  # takes the block gate; same parameters and buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        if self.closed:
            return F.relu(identity) if self.shortcut_needs_relu else identity
        out = self.bn1(self.conv1(x))
        out = gated_relu(out, self.gate(x)) if hasattr(self, "gate") else F.relu(out)
        out = self.conv2(out)
        out = self.bn2(out, self.block_gate(x)) if hasattr(self, "block_gate") else self.bn2(out)
        return F.relu(identity + out)


class ConvLayer(nn.Module):
    """VGG unit: conv-bn-relu, optional channel gate, optional 2x2 max-pool (ceil mode keeps 28 px inputs
    alive through five pools)."""

    def __init__(self, layer: dict, gates: GateOptions | None):
        super().__init__()
        self.conv, self.bn = conv_bn(layer["in"], layer["out"])
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if layer["pool_after"] else nn.Identity()
        if gates is not None:
            # A plain layer with every channel closed would cut the network in two.
            self.gate = Gate(layer["out"], gates.init_score, layer["in"] if gates.dynamic else None, min_open=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out = gated_relu(out, self.gate(x)) if hasattr(self, "gate") else F.relu(out)
        return self.pool(out)


class Stem(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv, self.bn = conv_bn(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _register(root: nn.Module, dotted_name: str, module: nn.Module) -> None:
    """Place `module` at path `dotted_name` ("layer1.0") through nested ModuleDicts."""
    *parents, leaf = dotted_name.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.ModuleDict())
        node = getattr(node, part)
    node.add_module(leaf, module)


class SpecNet(nn.Module):
    """A network defined entirely by its spec. `spec` is kept on the module for export and saving."""

    def __init__(self, spec: Spec, gates: GateOptions | None = None):
        super().__init__()
        self.spec = validate_spec(spec)
        self.gated = gates is not None
        units: list[tuple[str, nn.Module]] = []
        if spec["family"] == "resnet":
            self.stem = Stem(spec["in_channels"], spec["stem"]["out"])
            for block in spec["blocks"]:
                units.append((block["name"], BasicBlock(block, gates)))
            width = spec["blocks"][-1]["out"] if spec["blocks"] else spec["stem"]["out"]
        else:
            self.stem = nn.Identity()
            for layer in spec["layers"]:
                units.append((layer["name"], ConvLayer(layer, gates)))
            width = spec["layers"][-1]["out"]
        for name, module in units:
            _register(self, name, module)
        self.unit_names = [name for name, _ in units]
        self._units = units  # plain list: forward order; the modules are registered above
        self.fc = nn.Linear(width, spec["num_classes"])
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _, unit in self._units:
            x = unit(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)

    def gates(self) -> dict[str, Gate]:
        """Path -> Gate, in forward order ("layer1.0.gate", "layer1.0.block_gate", ...)."""
        return {name: module for name, module in self.named_modules() if isinstance(module, Gate)}


def build_model(spec: Spec, gates: GateOptions | None = None) -> SpecNet:
    return SpecNet(spec, gates)
