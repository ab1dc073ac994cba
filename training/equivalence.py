"""The one check that a cut network computes what the gated network computes, used by the Python API's
`prune` and by export's surgery: max |logit difference| within the cpu/fp32 row of `common.tolerance`, and
on failure the first layer (in forward order) whose kept channels diverge.
"""
from __future__ import annotations

import torch
from torch import nn

from polarprune.common.cli import EXIT_FAILED
from polarprune.common.tolerance import allowed_difference, tolerance as tolerance_of

from .errors import TrainingError
from .gating import GatedNetwork, kept_index
from .graph import NetworkGraph
from .mask import Mask

TOLERANCE = tolerance_of("cpu", "fp32")  # pruned vs gated, both in torch


class EquivalenceError(TrainingError, RuntimeError):
    """The cut network does not compute what the gated network computes: a cut is wrong (exit code 1)."""

    exit_code = EXIT_FAILED


# -- pruned vs gated ----------------------------------------------------------------------------------

@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def check_equivalence(reference: nn.Module, pruned: nn.Module, graph: NetworkGraph, mask: Mask,
                      images: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """Max |logit difference| of pruned vs reference on `images`; SurgeryError naming the first layer
    that diverges when it exceeds `tolerance` (scaled by logits beyond 1, see `allowed_difference`)."""
    expected = _logits(reference, images)
    diff = (expected - _logits(pruned, images)).abs()
    worst = float(diff.max())
    if worst <= allowed_difference(tolerance, float(expected.abs().max())):
        return worst
    per_image = diff.amax(dim=1)
    suspects = images[per_image.argsort(descending=True)[:8]]
    layer, detail = first_divergent_layer(reference, pruned, graph, mask, suspects, tolerance)
    raise EquivalenceError(f"pruned network differs from the gated one by {worst:.3g} in the logits "
                       f"(tolerance {tolerance:g}); first diverging layer: {layer} ({detail})")


@torch.no_grad()
def first_divergent_layer(reference: nn.Module, pruned: nn.Module, graph: NetworkGraph, mask: Mask,
                          images: torch.Tensor, tolerance: float) -> tuple[str, str]:
    """(layer path, what differs) for the first conv/norm/linear, in forward order, whose output on the
    kept channels differs; the worst layer if none passes its tolerance. A gated layer's output is read
    before its gate, so closed channels of the reference are compared only where they were kept."""
    prefix = "network." if isinstance(reference, GatedNetwork) else ""
    names = [path for path in graph.layers if _has(pruned, path)]
    ref_out, cut_out = _record(reference, [prefix + n for n in names], images), _record(pruned, names, images)
    worst = ("", -1.0)
    for name in names:
        expected, got = ref_out[prefix + name], cut_out[name]
        kept = kept_index(graph, graph.layers[name].out_layout, mask)
        if kept is not None and expected.shape[1] != got.shape[1]:
            expected = expected[:, kept]
        if expected.shape != got.shape:
            return name, f"shape {list(got.shape)} vs {list(expected.shape)}"
        diff = float((expected - got).abs().max())
        scale = float(expected.abs().max())
        if diff > allowed_difference(tolerance, scale):
            return name, f"max abs diff {diff:.3g} at activation scale {scale:.3g}"
        worst = max(worst, (name, diff / max(1.0, scale)), key=lambda item: item[1])
    return worst[0], f"no single layer beyond tolerance; largest relative diff {worst[1]:.3g}"


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _record(model: nn.Module, names: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach())) for name in names]
    try:
        model.eval()
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs
