"""The static sub-network: which channels stay and which residual blocks go, and `mask.json` on disk.

A mask names channel groups and residual blocks as the trace names them (`training.graph`): a group by
its first producer's module path, a block by its branch's common module path. `check_mask` is what a mask
must satisfy; `training.gating` applies one to a network.

`choose_mask` turns gate decisions into a deployable mask: widths rounded to `round_to` (onnxruntime's
fast conv path wants multiples of 16 on AVX-512), never narrower than one group, then moved one group or
one block at a time until the kept cost (MACs, or predicted latency) sits within the tolerance of the target.
"""
from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.atomicio import write_json

from .arch import SpecError, check_header

MASK_FORMAT = "polarprune-mask"
MASK_VERSION = 2  # 1: units of the built-in specs, before masks named traced groups


class MaskError(SpecError):
    """A mask that is malformed or does not fit the network it is applied to."""


@dataclass
class Mask:
    kept_channels: dict[str, list[int]]   # channel group -> sorted kept indices (groups of closed blocks absent)
    closed_blocks: list[str] = field(default_factory=list)


def check_mask(mask: Mask, widths: dict[str, int], block_groups: dict[str, list[str]], source: str) -> None:
    """Every group and block the mask names exists, every group that stays keeps distinct, in-range,
    non-empty indices, and the groups of a closed block keep none."""
    unknown = sorted(set(mask.kept_channels) - set(widths)) + sorted(set(mask.closed_blocks) - set(block_groups))
    if unknown:
        raise MaskError(f"{source}: names groups or blocks the network does not have: {unknown}")
    if len(set(mask.closed_blocks)) != len(mask.closed_blocks):
        raise MaskError(f"{source}: closed_blocks names a block twice: {mask.closed_blocks}")
    gone = {group for block in mask.closed_blocks for group in block_groups[block]}
    for name, width in widths.items():
        kept = mask.kept_channels.get(name)
        if name in gone:
            if kept is not None:
                raise MaskError(f"{source}: group {name} belongs to a closed block but also keeps channels")
            continue
        if kept is None:
            raise MaskError(f"{source}: no kept channels for group {name}")
        if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= width:
            raise MaskError(f"{source}: group {name} keeps {len(kept)} channel indices that are not distinct, "
                            f"non-empty and within [0, {width})")


@dataclass
class GateDecision:
    """What training decided for one unit: per-channel open flags and confidences (probabilities or, for
    dynamic gates, the share of inputs that opened the channel), and whether its block stays."""
    channel_open: torch.Tensor      # bool (width,)
    channel_conf: torch.Tensor      # float (width,) in [0, 1]
    block_open: bool = True
    block_conf: float = 1.0


@dataclass
class MaskProblem:
    """What a mask chooses among: prunable channel groups and their widths, residual blocks with the groups
    that go when they close, and the kept cost of a mask (MACs, or predicted latency with `cost: latency`)."""
    widths: dict[str, int]
    block_groups: dict[str, list[str]]
    cost: Callable[[Mask], float]


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

    dense = problem.cost(to_mask(dict(layers), frozenset()))

    def ratio(widths: dict[str, int], closed: frozenset[str]) -> float:
        return problem.cost(to_mask(widths, closed)) / dense

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
        for block in closed:  # reopens with its groups at one step (they grow from there): fits the band
            reopened = {**kept, **{group: step(group) for group in inside[block]}}
            yield reopened, closed - {block}, block_confidence(block, reopened)

    # Shrink: least confidence lost per unit of cost saved, preferring moves that stay inside the band.
    while (current := ratio(kept, closed)) > target_ratio + tolerance:
        candidates = []
        for widths, blocks_closed, conf in shrink_moves():
            after = ratio(widths, blocks_closed)
            candidates.append((after < target_ratio - tolerance, conf / max(current - after, 1e-12),
                               len(candidates), widths, blocks_closed))
        if not candidates:
            break
        *_, kept, closed = min(candidates, key=lambda c: c[:3])
    # Grow back where gates or rounding overshot: most confidence gained per unit of cost, never past the band.
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


def projection_report(problem: MaskProblem, learned: Mask, final: Mask, cost_name: str = "flops") -> dict:
    """What moving the learned mask into the target band changed: the kept cost ratio before and after
    (`learned_<cost_name>_ratio`, `final_<cost_name>_ratio`), and per group and block the gates it flipped
    (channel indices opened or closed, blocks closed or reopened)."""
    dense = problem.cost(Mask({n: list(range(w)) for n, w in problem.widths.items()}, []))
    flipped = {}
    for name in problem.widths:
        before, after = set(learned.kept_channels.get(name, [])), set(final.kept_channels.get(name, []))
        if before != after:
            flipped[name] = {"kept_before": len(before), "kept_after": len(after),
                             "opened": sorted(after - before), "closed": sorted(before - after)}
    return {f"learned_{cost_name}_ratio": problem.cost(learned) / dense,
            f"final_{cost_name}_ratio": problem.cost(final) / dense,
            "flipped_groups": flipped,
            "closed_blocks": sorted(set(final.closed_blocks) - set(learned.closed_blocks)),
            "reopened_blocks": sorted(set(learned.closed_blocks) - set(final.closed_blocks))}


def mask_document(mask: Mask, problem: MaskProblem, network: dict, round_to: int) -> dict:
    """mask.json: the mask, what it chose among (group widths, each block's groups), the network it was made
    for (`network`: model, model_args, input shape) and its MACs."""
    dense = problem.cost(Mask({n: list(range(w)) for n, w in problem.widths.items()}, []))
    pruned = problem.cost(mask)
    return {
        "format": MASK_FORMAT, "version": MASK_VERSION, "network": network, "round_to": round_to,
        "group_widths": problem.widths, "block_groups": problem.block_groups,
        "kept_channels": mask.kept_channels, "closed_blocks": mask.closed_blocks,
        "dense_flops": int(round(dense)), "pruned_flops": int(round(pruned)), "flops_ratio": pruned / dense,
    }


def save_mask(path: str | Path, document: dict) -> None:
    write_json(path, document)


def load_mask(path: str | Path) -> tuple[dict, Mask]:
    """Read and check mask.json: types, and the mask against the groups and blocks it records."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise MaskError(f"{path}: no mask.json (train first: make train)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MaskError(f"{path}: not valid JSON ({error})") from None
    if isinstance(document, dict) and document.get("format") == MASK_FORMAT and document.get("version") == 1:
        raise MaskError(f"{path}: a mask.json of version 1 (polarprune before traced channel groups); retrain "
                        "the run with this version (make train)")
    check_header(document, path, "mask", MASK_FORMAT, MASK_VERSION,
                 ("kept_channels", "closed_blocks", "group_widths", "block_groups", "network", "dense_flops",
                  "pruned_flops"), MaskError)
    mask = _mask_of(document, path)
    widths, block_groups = document["group_widths"], document["block_groups"]
    if not isinstance(widths, dict) or not all(isinstance(k, str) and _is_count(v) for k, v in widths.items()):
        raise MaskError(f"{path}: group_widths must map group names to channel counts")
    if not isinstance(block_groups, dict) or not all(
            isinstance(v, list) and all(g in widths for g in v) for v in block_groups.values()):
        raise MaskError(f"{path}: block_groups must map block names to lists of known groups")
    check_mask(mask, widths, block_groups, str(path))
    return document, mask


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _mask_of(document: dict, path: Path) -> Mask:
    """The Mask a mask.json document holds, its JSON types checked (range checks follow in check_mask):
    a float index 0.5 would otherwise slice as channel 0 and a string block name closes its letters."""
    kept, closed = document["kept_channels"], document["closed_blocks"]
    if not isinstance(kept, dict):
        raise MaskError(f"{path}: kept_channels must map layer names to lists of channel indices")
    for name, indices in kept.items():
        if not isinstance(indices, list) or not all(_is_count(i) for i in indices):
            raise MaskError(f"{path}: kept_channels[{name!r}] must be a list of channel indices (integers "
                            f">= 0), got {reprlib.repr(indices)}")
    if not isinstance(closed, list) or not all(isinstance(name, str) for name in closed):
        raise MaskError(f"{path}: closed_blocks must be a list of block names, got {reprlib.repr(closed)}")
    for key in ("dense_flops", "pruned_flops"):
        if not _is_count(document[key]):
            raise MaskError(f"{path}: {key} must be a MAC count (integer >= 0), got {document[key]!r}")
    return Mask({name: list(indices) for name, indices in kept.items()}, list(closed))
