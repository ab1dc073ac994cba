"""The static sub-network: which channels stay and which residual blocks go, and `mask.json` on disk.

`finalize_mask` turns gate decisions into a deployable mask: widths rounded to `round_to` (onnxruntime's
fast conv path wants multiples of 16 on AVX-512), never narrower than one group, then moved one group or
one block at a time until the kept MACs sit within the tolerance of the target.
"""
from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.atomicio import write_json

from .arch import Spec, SpecError, check_header, prune_spec, prunable_layers, residual_blocks, validate_spec
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
    """Deployable mask of a spec network (a residual block's gate closes its unit); see `choose_mask`."""
    problem = MaskProblem(prunable_layers(spec), {name: [name] for name in residual_blocks(spec)},
                          lambda mask: mask_macs(costs, spec, mask))
    blocks = {name: (decisions[name].block_open, decisions[name].block_conf) for name in residual_blocks(spec)}
    return choose_mask(problem, decisions, blocks, round_to, target_ratio, tolerance)


@dataclass
class MaskProblem:
    """What a mask chooses among: prunable channel groups and their widths, residual blocks with the groups
    that go when they close, and the kept MACs of a mask."""
    widths: dict[str, int]
    block_groups: dict[str, list[str]]
    macs: Callable[[Mask], float]


def choose_mask(problem: MaskProblem, decisions: dict[str, GateDecision], blocks: dict[str, tuple[bool, float]],
                round_to: int, target_ratio: float | None, tolerance: float) -> Mask:
    """Deployable mask from gate decisions (`blocks`: block -> (open, confidence)); see the module docstring."""
    layers, inside = problem.widths, problem.block_groups
    # Channels in the order they are kept: open ones first, then by confidence.
    order = {name: torch.argsort(d.channel_conf + d.channel_open.float(), descending=True).tolist()
             for name, d in decisions.items()}

    def step(name: str) -> int:
        return min(round_to, layers[name])

    def to_mask(widths: dict[str, int], closed: frozenset[str]) -> Mask:
        gone = {group for block in closed for group in inside[block]}
        return Mask({n: sorted(order[n][:k]) for n, k in widths.items() if n not in gone}, sorted(closed))

    def confidence(name: str, lo: int, hi: int) -> float:
        return float(decisions[name].channel_conf[order[name][lo:hi]].sum())

    def block_confidence(block: str, widths: dict[str, int]) -> float:
        """What closing a block throws away: its gate's confidence times its groups' kept channels."""
        kept = sum(confidence(group, 0, widths[group]) for group in inside[block])
        return blocks[block][1] * (kept if inside[block] else 1.0)

    dense = problem.macs(to_mask(dict(layers), frozenset()))

    def ratio(widths: dict[str, int], closed: frozenset[str]) -> float:
        return problem.macs(to_mask(widths, closed)) / dense

    kept: dict[str, int] = {}
    for name, width in layers.items():
        n_open = int(decisions[name].channel_open.sum())
        kept[name] = min(width, max(step(name), step(name) * round(n_open / step(name))))
    # A block closes when its gate says so or every channel of a group inside it closed.
    closed = frozenset(b for b, (is_open, _) in blocks.items()
                       if not is_open or any(int(decisions[g].channel_open.sum()) == 0 for g in inside[b]))
    if target_ratio is None:
        return to_mask(kept, closed)

    def shrink_moves():
        gone = {group for block in closed for group in inside[block]}
        for name, k in kept.items():
            if name not in gone and k - step(name) >= step(name):
                yield {**kept, name: k - step(name)}, closed, confidence(name, k - step(name), k)
        for block in blocks:
            if block not in closed:
                yield kept, closed | {block}, block_confidence(block, kept)

    def grow_moves():
        gone = {group for block in closed for group in inside[block]}
        for name, k in kept.items():
            if name not in gone and k + step(name) <= layers[name]:
                yield {**kept, name: k + step(name)}, closed, confidence(name, k, k + step(name))
        for block in closed:
            yield kept, closed - {block}, block_confidence(block, kept)

    # Shrink: least confidence lost per MAC saved, preferring moves that stay inside the band.
    while (current := ratio(kept, closed)) > target_ratio + tolerance:
        candidates = []
        for widths, blocks_closed, conf in shrink_moves():
            after = ratio(widths, blocks_closed)
            candidates.append((after < target_ratio - tolerance, conf / max(current - after, 1e-12),
                               len(candidates), widths, blocks_closed))
        if not candidates:
            break
        *_, kept, closed = min(candidates, key=lambda c: c[:3])
    # Grow back where gates or rounding overshot: most confidence gained per MAC, never past the band.
    while (current := ratio(kept, closed)) < target_ratio - tolerance:
        candidates = []
        for widths, blocks_closed, conf in grow_moves():
            after = ratio(widths, blocks_closed)
            if after <= target_ratio + tolerance:
                candidates.append((conf / max(after - current, 1e-12), -len(candidates), widths, blocks_closed))
        if not candidates:
            break
        *_, kept, closed = max(candidates, key=lambda c: c[:2])
    return to_mask(kept, closed)


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
    check_header(document, path, "mask", MASK_FORMAT, MASK_VERSION,
                 ("kept_channels", "closed_blocks", "dense_spec", "pruned_spec", "dense_flops", "pruned_flops"),
                 SpecError)
    mask = _mask_of(document, path)
    try:
        dense_spec = validate_spec(document["dense_spec"])
        expected = prune_spec(dense_spec, mask.kept_channels, mask.closed_blocks)
    except (SpecError, KeyError, TypeError) as error:
        why = f"dense_spec is missing key {error}" if isinstance(error, KeyError) else str(error)
        raise SpecError(f"{path}: {why}") from None
    if expected != document["pruned_spec"]:
        raise SpecError(f"{path}: pruned_spec does not match the kept channels and closed blocks")
    return document, mask


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _mask_of(document: dict, path: Path) -> Mask:
    """The Mask a mask.json document holds, its JSON types checked (range checks follow in prune_spec):
    a float index 0.5 would otherwise slice as channel 0 and a string block name closes its letters."""
    kept, closed = document["kept_channels"], document["closed_blocks"]
    if not isinstance(kept, dict):
        raise SpecError(f"{path}: kept_channels must map layer names to lists of channel indices")
    for name, indices in kept.items():
        if not isinstance(indices, list) or not all(_is_count(i) for i in indices):
            raise SpecError(f"{path}: kept_channels[{name!r}] must be a list of channel indices (integers "
                            f">= 0), got {reprlib.repr(indices)}")
    if not isinstance(closed, list) or not all(isinstance(name, str) for name in closed):
        raise SpecError(f"{path}: closed_blocks must be a list of block names, got {reprlib.repr(closed)}")
    if len(set(closed)) != len(closed):
        raise SpecError(f"{path}: closed_blocks names a block twice: {closed}")
    both = sorted(set(closed) & set(kept))
    if both:
        raise SpecError(f"{path}: block(s) {both} are closed but also keep channels")
    for key in ("dense_flops", "pruned_flops"):
        if not _is_count(document[key]):
            raise SpecError(f"{path}: {key} must be a MAC count (integer >= 0), got {document[key]!r}")
    return Mask({name: list(indices) for name, indices in kept.items()}, list(closed))
