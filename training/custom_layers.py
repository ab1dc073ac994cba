"""Layers of your own that the trace should cut: how their channels map, and how a cut shrinks them.

    import polarprune
    polarprune.register_layer(MyPointwise, maps="mixing", cut=cut_my_pointwise)

The trace keeps a registered module as one call (it does not look inside), reads it by its rule, and the
cut calls `cut(module, keep_in, keep_out)` with the kept channel indices (None: all kept) to get the
smaller module. Unregistered, a module of your own is traced through, op by op, and any op the trace does
not know pins the channels it touches, with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .cuts import CUTS
from .errors import TrainingError

MAPS = {
    "mixing": "reads channels on axis 1 and writes channels of its own, every output from every input "
              "(a conv or linear); it costs unit_macs per (input, output) channel pair",
    "per_channel": "output channel c reads input channel c only (a norm or per-channel scale); free of MACs",
}
KIND = {"mixing": "custom", "per_channel": "norm"}  # the trace's Layer.kind for each

Cut = Callable[[nn.Module, "torch.Tensor | None", "torch.Tensor | None"], nn.Module]
UnitMacs = Callable[[nn.Module, tuple, tuple], int]


class LayerRuleError(TrainingError, ValueError):
    """A `register_layer` call the trace could not follow."""


@dataclass(frozen=True)
class LayerRule:
    maps: str
    cut: Cut
    unit_macs: UnitMacs | None = None  # (module, input shape, output shape) -> MACs per channel pair

    def unit(self, module: nn.Module, in_shape: tuple, out_shape: tuple) -> int:
        """MACs per (input, output) channel pair of one example; default: one per output position."""
        if self.unit_macs is not None:
            return int(self.unit_macs(module, in_shape, out_shape))
        return math.prod(out_shape[2:])


LAYER_RULES: dict[type, LayerRule] = {}


def register_layer(module_type: type, *, maps: str, cut: Cut, unit_macs: UnitMacs | None = None) -> None:
    """Teach the trace `module_type` (exact type; subclasses register on their own).

    maps: "mixing" (a conv or linear of your own) or "per_channel" (a norm or scale of your own).
    cut: (module, keep_in, keep_out) -> the module with only those channels; keep_* are LongTensors of
         channel indices, or None where that side keeps every channel (per_channel: keep_in is keep_out).
    unit_macs: mixing only: (module, input shape, output shape) -> MACs of one example per (input, output)
         channel pair, e.g. k*k*H*W for a k x k conv; default: one per output position (a 1x1 conv).
    A training run that goes on with the cut network after the freeze (the CLI's default) hands export the
    dense-shaped network with the cut weights put back in place: that reads a mixing layer's parameters as
    a conv's, (out, in, ...) and (out,). The latency cost cannot time a registered layer (use cost: flops)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise LayerRuleError(f"register_layer: {module_type!r} is not an nn.Module class")
    if maps not in MAPS:
        raise LayerRuleError(f"register_layer({module_type.__name__}): maps={maps!r}; choose "
                             + "; ".join(f"{name!r}: {what}" for name, what in MAPS.items()))
    if not callable(cut):
        raise LayerRuleError(f"register_layer({module_type.__name__}): cut must be callable "
                             "(module, keep_in, keep_out) -> module")
    if unit_macs is not None and maps != "mixing":
        raise LayerRuleError(f"register_layer({module_type.__name__}): unit_macs is for maps='mixing' only")
    LAYER_RULES[module_type] = LayerRule(maps, cut, unit_macs)
    CUTS[(module_type, KIND[maps])] = cut


def unregister_layer(module_type: type) -> None:
    """Forget `module_type`'s rule (the trace goes back to tracing through it)."""
    rule = LAYER_RULES.pop(module_type, None)
    if rule is not None:
        CUTS.pop((module_type, KIND[rule.maps]), None)


def rule_for(module: nn.Module) -> LayerRule | None:
    return LAYER_RULES.get(type(module))
