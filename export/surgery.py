"""Surgery: the physically smaller network from a gated network and its mask.

Three questions, answered in three places:
  which layers shrink together  -> `export.graph` (dependency groups traced from the network)
  which channels and blocks stay -> mask.json (`training.mask.Mask`)
  how one layer is cut           -> `training.cuts`, one function per layer type and side
The cut network is loaded into `build_model(pruned_spec)` only after its state-dict keys and shapes match
that model exactly, so the pruned network always loads from its own spec, without the gated class.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from common.atomicio import write_bytes
from common.cli import EXIT_FAILED
from training.arch import Spec, SpecError, validate_spec
from training.cuts import cut_batchnorm, cut_conv_in, cut_conv_out, cut_linear_in
from training.flops import input_shape
from training.gates import Gate
from training.mask import Mask
from training.models import GateOptions, SpecNet, build_model

from . import TOLERANCE, ExportError, allowed_difference
from .graph import DependencyGraph, trace_dependencies

PRUNED_FORMAT = "polarprune-pruned-model"


class MaskMismatchError(ExportError):
    """mask.json does not fit the network (unknown units, bad indices, gates frozen differently)."""


class SurgeryError(ExportError):
    """The cut network does not match its spec or does not compute what the gated network computes."""

    exit_code = EXIT_FAILED


# -- one cut per layer type (the cuts themselves live in training.cuts) -------------------------------

Cut = Callable[[nn.Module, torch.Tensor], nn.Module]
OUTPUT_CUTS: dict[type, Cut] = {nn.Conv2d: cut_conv_out}
NORM_CUTS: dict[type, Cut] = {nn.BatchNorm2d: cut_batchnorm}
INPUT_CUTS: dict[type, Cut] = {nn.Conv2d: cut_conv_in, nn.Linear: cut_linear_in}


def _set_submodule(root: nn.Module, path: str, module: nn.Module | None) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if module is None:
        if hasattr(parent, name):
            delattr(parent, name)
    else:
        setattr(parent, name, module)


def _cut(root: nn.Module, path: str, cuts: dict[type, Cut], kept: torch.Tensor, side: str) -> None:
    module = root.get_submodule(path)
    cut = cuts.get(type(module))
    if cut is None:
        raise SurgeryError(f"no {side} cut for {type(module).__name__} at {path}")
    _set_submodule(root, path, cut(module, kept))


# -- mask against the network -------------------------------------------------------------------------

def dependency_graph(model: SpecNet) -> DependencyGraph:
    """Groups of `model`; an ungated network (method dense) is traced through its gated twin, whose
    module paths are the same, so its mask speaks the same unit names."""
    has_gates = any(isinstance(m, Gate) for m in model.modules())
    traced = model if has_gates else build_model(model.spec, GateOptions())
    return trace_dependencies(traced, input_shape(model.spec))


def check_mask(graph: DependencyGraph, mask: Mask, source: str = "mask.json") -> None:
    """Every unit the mask names exists; every open unit has distinct, in-range, non-empty kept indices."""
    prunable, blocks = graph.prunable(), graph.blocks()
    unknown = sorted(set(mask.kept_channels) - set(prunable))
    if unknown:
        raise MaskMismatchError(f"{source}: keeps channels of layers the network does not gate: {unknown}")
    unknown = sorted(set(mask.closed_blocks) - set(blocks))
    if unknown:
        raise MaskMismatchError(f"{source}: closes blocks the network does not have: {unknown}")
    for unit, group in prunable.items():
        kept = mask.kept_channels.get(unit)
        if unit in mask.closed_blocks:
            if kept is not None:
                raise MaskMismatchError(f"{source}: block {unit} is closed but also keeps channels")
            continue
        if kept is None:
            raise MaskMismatchError(f"{source}: no kept channels for layer {unit}")
        if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= group.width:
            raise MaskMismatchError(f"{source}: layer {unit} keeps {len(kept)} channel indices that are not "
                                    f"distinct, non-empty and within [0, {group.width})")


def full_mask(graph: DependencyGraph) -> Mask:
    """Every channel kept, no block closed: the dense architecture."""
    return Mask({unit: list(range(group.width)) for unit, group in graph.prunable().items()}, [])


def _removes_anything(graph: DependencyGraph, mask: Mask) -> bool:
    return bool(mask.closed_blocks) or any(len(mask.kept_channels[u]) < g.width
                                           for u, g in graph.prunable().items())


def masked_reference(model: SpecNet, graph: DependencyGraph, mask: Mask, source: str = "checkpoint") -> SpecNet:
    """The gated network with every gate fixed to `mask` (hard 0/1): what the pruned network must equal.

    A gate the checkpoint already froze must agree with the mask; an unfrozen one (interrupted run) is
    frozen here on a copy. An ungated network is its own reference and admits only the all-kept mask."""
    gates = {name: m for name, m in model.named_modules() if isinstance(m, Gate)}
    if not gates:
        if _removes_anything(graph, mask):
            raise MaskMismatchError(f"{source}: the network has no gates (method dense) but the mask removes "
                                    "channels or blocks")
        return model
    wanted: dict[str, torch.Tensor] = {}
    for unit, group in graph.prunable().items():
        if unit not in mask.closed_blocks:
            values = torch.zeros(group.width)
            values[mask.kept_channels[unit]] = 1.0
            wanted[group.gate] = values
    for unit, block in graph.blocks().items():
        wanted[block.gate] = torch.tensor([0.0 if unit in mask.closed_blocks else 1.0])
    reference = copy.deepcopy(model)
    for path, values in wanted.items():
        gate = reference.get_submodule(path)
        if gate.is_frozen and not torch.equal(gate.frozen_mask, values.to(gate.frozen_mask)):
            raise MaskMismatchError(
                f"{source}: gate {path} is frozen to {_describe(gate.frozen_mask)} but the mask wants "
                f"{_describe(values)}; the mask was not made for this checkpoint")
        gate.freeze(values)
    return reference.eval()


def _describe(values: torch.Tensor) -> str:
    open_ = torch.nonzero(values > 0.5).flatten().tolist()
    return f"{len(open_)}/{values.numel()} open {open_[:8]}{'...' if len(open_) > 8 else ''}"


# -- the surgery itself -------------------------------------------------------------------------------

def apply_mask(model: SpecNet, graph: DependencyGraph, mask: Mask, target_spec: Spec) -> SpecNet:
    """Cut `model` (gated or not; it is not modified) down to `mask` and return it as
    `build_model(target_spec)` holding the cut weights."""
    check_mask(graph, mask)
    cut = copy.deepcopy(model)
    closed = set(mask.closed_blocks)
    for unit, group in graph.prunable().items():
        if unit in closed or len(mask.kept_channels[unit]) == group.width:
            continue
        kept = torch.tensor(sorted(mask.kept_channels[unit]), dtype=torch.long)
        for path in group.producers:
            _cut(cut, path, OUTPUT_CUTS, kept, "output-channel")
        for path in group.norms:
            _cut(cut, path, NORM_CUTS, kept, "norm")
        for path in group.consumers:
            _cut(cut, path, INPUT_CUTS, kept, "input-channel")
    removed = set(graph.gate_paths())
    for unit in closed:
        removed.update(graph.blocks()[unit].branch_modules)
    for path in sorted(removed, key=len, reverse=True):  # children before parents
        _set_submodule(cut, path, None)
    target = build_model(target_spec)
    _check_layout(cut.state_dict(), target.state_dict())
    target.load_state_dict(cut.state_dict(), strict=True)
    return target.eval()


def _check_layout(cut: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(expected) - set(cut)), sorted(set(cut) - set(expected))
    if missing or extra:
        raise SurgeryError(f"cut network does not match build_model(pruned_spec): missing {missing[:4]}, "
                           f"unexpected {extra[:4]}")
    for key, tensor in expected.items():
        if cut[key].shape != tensor.shape:
            raise SurgeryError(f"cut network does not match build_model(pruned_spec): {key} has shape "
                               f"{list(cut[key].shape)}, the spec wants {list(tensor.shape)}")


@dataclass
class Networks:
    """The three networks the export stage compares."""
    reference: SpecNet  # gated, gates fixed to the mask: what was trained
    dense: SpecNet      # dense architecture, trained weights, no gates
    pruned: SpecNet     # physically cut
    graph: DependencyGraph


def prune(model: SpecNet, document: dict, mask: Mask, checkpoint_source: str = "checkpoint",
          mask_source: str = "mask.json") -> Networks:
    """Reference, dense and pruned networks for a trained model and its loaded mask.json."""
    graph = dependency_graph(model)
    check_mask(graph, mask, mask_source)
    reference = masked_reference(model, graph, mask, checkpoint_source)
    dense = apply_mask(model, graph, full_mask(graph), model.spec)
    pruned = apply_mask(model, graph, mask, document["pruned_spec"])
    return Networks(reference, dense, pruned, graph)


# -- pruned vs gated ----------------------------------------------------------------------------------

@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def check_equivalence(reference: nn.Module, pruned: nn.Module, graph: DependencyGraph, mask: Mask,
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
    raise SurgeryError(f"pruned network differs from the gated one by {worst:.3g} in the logits "
                       f"(tolerance {tolerance:g}); first diverging layer: {layer} ({detail})")


@torch.no_grad()
def first_divergent_layer(reference: nn.Module, pruned: nn.Module, graph: DependencyGraph, mask: Mask,
                          images: torch.Tensor, tolerance: float) -> tuple[str, str]:
    """(layer path, what differs) for the first conv/BN/linear, in forward order, whose output on the kept
    channels differs; the worst layer if none passes its tolerance."""
    names = [n for n, m in pruned.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    ref_out, cut_out = _record(reference, names, images), _record(pruned, names, images)
    worst = ("", -1.0)
    for name in cut_out:  # forward order
        expected, got = ref_out[name], cut_out[name]
        group = graph.output_group.get(name)
        unit = group.unit if group is not None else None
        if unit in mask.kept_channels and len(mask.kept_channels[unit]) < expected.shape[1]:
            expected = expected[:, sorted(mask.kept_channels[unit])]
        if expected.shape != got.shape:
            return name, f"shape {list(got.shape)} vs {list(expected.shape)}"
        diff = float((expected - got).abs().max())
        scale = float(expected.abs().max())
        if diff > allowed_difference(tolerance, scale):
            return name, f"max abs diff {diff:.3g} at activation scale {scale:.3g}"
        worst = max(worst, (name, diff / max(1.0, scale)), key=lambda item: item[1])
    return worst[0], f"no single layer beyond tolerance; largest relative diff {worst[1]:.3g}"


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
    return outputs  # insertion order = forward order


# -- pruned_model.pt ----------------------------------------------------------------------------------

def pruned_model_bytes(model: SpecNet) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": PRUNED_FORMAT, "spec": model.spec, "state_dict": model.state_dict()}, buffer)
    return buffer.getvalue()


def save_pruned(path: str | Path, model: SpecNet) -> None:
    write_bytes(path, pruned_model_bytes(model))


def load_pruned(path: str | Path) -> SpecNet:
    """The pruned network from pruned_model.pt, built from its own spec (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no pruned model (run the export first)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged zip/pickle raise many types
        raise ExportError(f"{path}: unreadable pruned model ({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict) or "spec" not in saved or "state_dict" not in saved:
        raise ExportError(f"{path}: not a pruned model (expected keys 'spec' and 'state_dict')")
    try:
        model = build_model(validate_spec(saved["spec"]))
        model.load_state_dict(saved["state_dict"], strict=True)
    except (SpecError, KeyError, TypeError, RuntimeError) as error:
        raise ExportError(f"{path}: weights do not fit the saved spec ({str(error).splitlines()[0]})") from None
    return model.eval()
