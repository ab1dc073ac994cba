"""The static sub-network: which channels stay and which residual blocks go, and `mask.json` on disk.

`finalize_mask` turns gate decisions into a deployable mask: widths rounded to `round_to` (onnxruntime's
fast conv path wants multiples of 16 on AVX-512), never narrower than one group, then moved one group or
one block at a time until the kept MACs sit within the tolerance of the target.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.atomicio import write_json

from .arch import Spec, SpecError, prune_spec, prunable_layers, residual_blocks, validate_spec
from .flops import LayerCost, gated_macs

MASK_FORMAT = "polarprune-mask"
MASK_VERSION = 1


@dataclass
class Mask:
    kept_channels: dict[str, list[int]]   # prunable unit -> sorted kept channel indices (closed blocks absent)
    closed_blocks: list[str] = field(default_factory=list)

    def widths(self, spec: Spec) -> dict[str, int]:
        return {name: len(self.kept_channels.get(name, [])) for name in prunable_layers(spec)}


@dataclass
class GateDecision:
    """What training decided for one unit: per-channel open flags and confidences (probabilities or, for
    dynamic gates, the share of inputs that opened the channel), and whether its block stays."""
    channel_open: torch.Tensor      # bool (width,)
    channel_conf: torch.Tensor      # float (width,) in [0, 1]
    block_open: bool = True
    block_conf: float = 1.0


def mask_macs(costs: list[LayerCost], spec: Spec, mask: Mask) -> float:
    widths = {name: float(w) for name, w in mask.widths(spec).items()}
    blocks = {name: float(name not in mask.closed_blocks) for name in residual_blocks(spec)}
    return float(gated_macs(costs, widths, blocks))


def finalize_mask(spec: Spec, decisions: dict[str, GateDecision], costs: list[LayerCost], round_to: int,
                  target_ratio: float | None, tolerance: float) -> Mask:
    """Deployable mask from gate decisions; see the module docstring."""
    layers, blocks = prunable_layers(spec), set(residual_blocks(spec))
    dense = mask_macs(costs, spec, Mask({n: list(range(w)) for n, w in layers.items()}))
    order = {name: torch.argsort(d.channel_conf + d.channel_open.float(), descending=True)
             for name, d in decisions.items()}  # open channels first, then by confidence
    kept_count: dict[str, int] = {}
    closed: set[str] = set()
    for name, width in layers.items():
        decision = decisions[name]
        n_open = int(decision.channel_open.sum())
        if name in blocks and (not decision.block_open or n_open == 0):
            closed.add(name)
            continue
        step = min(round_to, width)
        kept_count[name] = int(min(width, max(step, step * round(n_open / step))))

    def build() -> Mask:
        kept = {n: sorted(order[n][:k].tolist()) for n, k in kept_count.items() if n not in closed}
        return Mask(kept, sorted(closed))

    def ratio() -> float:
        return mask_macs(costs, spec, build()) / dense

    if target_ratio is not None:
        # Shrink: cheapest confidence lost per MAC saved first (closing a block counts its whole cost).
        while ratio() > target_ratio + tolerance:
            moves = []
            current = ratio()
            for name, k in kept_count.items():
                if name in closed:
                    continue
                step = min(round_to, layers[name])
                if k - step >= step:
                    lost = float(decisions[name].channel_conf[order[name][k - step:k]].sum())
                    moves.append((lost, ("shrink", name)))
                if name in blocks:
                    kept_conf = float(decisions[name].channel_conf[order[name][:k]].sum())
                    moves.append((decisions[name].block_conf * kept_conf, ("close", name)))
            if not moves:
                break
            scored = []
            for lost, (kind, name) in moves:
                _apply(kind, name, kept_count, closed, round_to, layers)
                after = ratio()
                _undo(kind, name, kept_count, closed, round_to, layers)
                overshoots = after < target_ratio - tolerance  # rank moves that stay in the band first
                scored.append((overshoots, lost / max(current - after, 1e-12), kind, name))
            _, _, kind, name = min(scored)
            _apply(kind, name, kept_count, closed, round_to, layers)
        # Grow back where rounding overshot, most confident channels first, never past the band.
        while ratio() < target_ratio - tolerance:
            best = None
            for name, k in kept_count.items():
                step = min(round_to, layers[name])
                if name in closed or k + step > layers[name]:
                    continue
                gained = float(decisions[name].channel_conf[order[name][k:k + step]].sum())
                kept_count[name] = k + step
                fits = ratio() <= target_ratio + tolerance
                kept_count[name] = k
                if fits and (best is None or gained > best[0]):
                    best = (gained, name)
            if best is None:
                break
            kept_count[best[1]] += min(round_to, layers[best[1]])
    return build()


def _apply(kind, name, kept_count, closed, round_to, layers):
    if kind == "shrink":
        kept_count[name] -= min(round_to, layers[name])
    else:
        closed.add(name)


def _undo(kind, name, kept_count, closed, round_to, layers):
    if kind == "shrink":
        kept_count[name] += min(round_to, layers[name])
    else:
        closed.discard(name)


def mask_document(model_name: str, dense_spec: Spec, mask: Mask, costs: list[LayerCost], round_to: int) -> dict:
    dense = mask_macs(costs, dense_spec, Mask({n: list(range(w)) for n, w in prunable_layers(dense_spec).items()}))
    pruned = mask_macs(costs, dense_spec, mask)
    return {
        "format": MASK_FORMAT, "version": MASK_VERSION, "model": model_name, "round_to": round_to,
        "kept_channels": mask.kept_channels, "closed_blocks": mask.closed_blocks,
        "dense_flops": int(dense), "pruned_flops": int(pruned), "flops_ratio": pruned / dense,
        "dense_spec": dense_spec, "pruned_spec": prune_spec(dense_spec, mask.kept_channels, mask.closed_blocks),
    }


def save_mask(path: str | Path, document: dict) -> None:
    write_json(path, document)


def load_mask(path: str | Path) -> tuple[dict, Mask]:
    """Read and check mask.json: the pruned spec must follow from the dense spec and the kept channels."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no mask.json (train first: make train)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SpecError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != MASK_FORMAT:
        raise SpecError(f"{path}: not a polarprune mask (format field is not {MASK_FORMAT!r})")
    if document.get("version") != MASK_VERSION:
        raise SpecError(f"{path}: mask version {document.get('version')} not supported (expected {MASK_VERSION})")
    for key in ("kept_channels", "closed_blocks", "dense_spec", "pruned_spec"):
        if key not in document:
            raise SpecError(f"{path}: mask is missing {key!r}")
    mask = Mask({k: list(v) for k, v in document["kept_channels"].items()}, list(document["closed_blocks"]))
    dense_spec = validate_spec(document["dense_spec"])
    expected = prune_spec(dense_spec, mask.kept_channels, mask.closed_blocks)
    if expected != document["pruned_spec"]:
        raise SpecError(f"{path}: pruned_spec does not match the kept channels and closed blocks")
    return document, mask
