"""The static sub-network: which channels stay and which residual blocks go, and `mask.json` on disk.

A mask names channel groups and residual blocks as the trace names them (`training.graph`): a group by
its first producer's module path, a block by its branch's common module path. `check_fits` is what a mask
must satisfy; `training.gating` applies one to a network.

A group shrinks in whole units of `round_to` channels (`unit_sizes`, the one rule for deployable widths);
gates decide per unit. `choose_mask` turns gate decisions into a deployable mask and, given a target, moves
one unit or one block at a time until the kept cost (MACs, or predicted latency) sits within the tolerance
of it: a last resort, every move of which `projection_report` lists.
"""
from __future__ import annotations

import hashlib
import json
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from polarprune.common.atomicio import write_json

from .arch import SpecError, check_header

MASK_FORMAT = "polarprune-mask"
MASK_VERSION = 2  # 1: units of the built-in specs, before masks named traced groups


class MaskError(SpecError):
    """A mask that is malformed or does not fit the network it is applied to."""


@dataclass
class Mask:
    kept_channels: dict[str, list[int]]   # channel group -> sorted kept indices (groups of closed blocks absent)
    closed_blocks: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """sha256 of the mask's content: how a file names the mask it belongs to without holding a copy."""
        content = {"kept_channels": {name: sorted(kept) for name, kept in self.kept_channels.items()},
                   "closed_blocks": sorted(self.closed_blocks)}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def leading_mask(widths: dict[str, int], closed_blocks=(), gone=()) -> Mask:
    """The one constructor of width-only masks: the first `width` channels of every group in `widths` kept
    (all of them for the full mask), except the groups in `gone` (those inside `closed_blocks`, which close)."""
    return Mask({name: list(range(width)) for name, width in widths.items() if name not in gone}, list(closed_blocks))


def check_fits(mask: Mask, widths: dict[str, int], block_groups: dict[str, list[str]], source: str) -> None:
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


def unit_sizes(width: int, round_to: int) -> list[int]:
    """The one rule for deployable widths: a group of `width` channels keeps or drops whole units of
    `round_to` consecutive channels, the last unit taking the remainder, so every kept width is a sum of
    units and never less than one. A group narrower than 2 * round_to is a single unit: it stays whole and
    leaves only with its block. (onnxruntime's fast conv path wants widths in multiples of 16 on AVX-512.)"""
    count = max(1, width // round_to)
    return [round_to] * (count - 1) + [width - round_to * (count - 1)]


def kept_widths(sizes: list[int]) -> list[int]:
    """Every width a group laid out in units of `sizes` channels can keep (`unit_sizes`): the sums of
    one or more of its units, ascending."""
    sums = {0}
    for size in sizes:
        sums |= {total + size for total in sums}
    return sorted(sums - {0})


def unit_channels(sizes: list[int], units) -> list[int]:
    """The channel indices of the given units of a group laid out in `sizes`."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return sorted(c for u in units for c in range(starts[u], starts[u] + sizes[u]))


@dataclass
class GateDecision:
    """What training decided for one channel group, per unit (`unit_sizes`): open flags and confidences
    (probabilities or, for dynamic gates, the share of inputs that opened the unit)."""
    unit_open: torch.Tensor      # bool (units,)
    unit_conf: torch.Tensor      # float (units,) in [0, 1]


@dataclass
class MaskProblem:
    """What a mask chooses among: prunable channel groups as units of channels (`unit_sizes`), residual
    blocks with the groups that go when they close, and the kept cost of a mask (MACs, or predicted latency
    with `cost: latency`)."""
    units: dict[str, list[int]]
    block_groups: dict[str, list[str]]
    cost: Callable[[Mask], float]

    @property
    def widths(self) -> dict[str, int]:
        return {name: sum(sizes) for name, sizes in self.units.items()}

    def full(self) -> Mask:
        return leading_mask(self.widths)

    def ratio(self, mask: Mask) -> float:
        return self.cost(mask) / self.cost(self.full())


def choose_mask(problem: MaskProblem, decisions: dict[str, GateDecision], blocks: dict[str, tuple[bool, float]],
                target_ratio: float | None, tolerance: float) -> Mask:
    """Deployable mask from gate decisions (`blocks`: block -> (open, confidence)); see the module docstring.
    Every group keeps its open units (at least one); with a target, whole units and blocks then move, least
    confidence per unit of cost first, until the kept cost is within `tolerance` of it."""
    units, inside = problem.units, problem.block_groups
    # Units in the order they are kept: open ones first, then by confidence.
    order = {name: torch.argsort(d.unit_conf + d.unit_open.float(), descending=True).tolist()
             for name, d in decisions.items()}

    def to_mask(kept: dict[str, int], closed: frozenset[str]) -> Mask:
        gone = {group for block in closed for group in inside[block]}
        return Mask({n: unit_channels(units[n], order[n][:k]) for n, k in kept.items() if n not in gone},
                    sorted(closed))

    def confidence(name: str, lo: int, hi: int) -> float:
        """Confidence of units lo..hi (in keeping order), each weighted by its channel count."""
        return sum(float(decisions[name].unit_conf[u]) * units[name][u] for u in order[name][lo:hi])

    def block_confidence(block: str, kept: dict[str, int]) -> float:
        """What closing a block throws away: its gate's confidence times its groups' kept channels."""
        held = sum(confidence(group, 0, kept[group]) for group in inside[block])
        return blocks[block][1] * (held if inside[block] else 1.0)

    dense = problem.cost(to_mask({n: len(s) for n, s in units.items()}, frozenset()))

    def ratio(kept: dict[str, int], closed: frozenset[str]) -> float:
        return problem.cost(to_mask(kept, closed)) / dense

    kept = {name: max(1, int(decisions[name].unit_open.sum())) for name in units}
    # A block closes when its gate says so or every unit of a group inside it closed (a vote of dynamic gates).
    closed = frozenset(b for b, (is_open, _) in blocks.items()
                       if not is_open or any(int(decisions[g].unit_open.sum()) == 0 for g in inside[b]))
    if target_ratio is None:
        return to_mask(kept, closed)

    def shrink_moves():
        gone = {group for block in closed for group in inside[block]}
        for name, k in kept.items():
            if name not in gone and k > 1:
                yield {**kept, name: k - 1}, closed, confidence(name, k - 1, k)
        for block in blocks:
            if block not in closed:
                yield kept, closed | {block}, block_confidence(block, kept)

    def grow_moves():
        gone = {group for block in closed for group in inside[block]}
        for name, k in kept.items():
            if name not in gone and k < len(units[name]):
                yield {**kept, name: k + 1}, closed, confidence(name, k, k + 1)
        for block in closed:  # reopens with its groups at one unit (they grow from there): fits the band
            reopened = {**kept, **{group: 1 for group in inside[block]}}
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
    # Grow back where gates overshot: most confidence gained per unit of cost, never past the band.
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


def _combine(a: Mask, b: Mask, keep, close) -> Mask:
    """Channel sets and closed blocks of two masks combined (for costs only: groups may keep none)."""
    names = set(a.kept_channels) | set(b.kept_channels)
    return Mask({n: sorted(keep(set(a.kept_channels.get(n, [])), set(b.kept_channels.get(n, [])))) for n in names},
                sorted(close(set(a.closed_blocks), set(b.closed_blocks))))


def flipped_cost(problem: MaskProblem, learned: Mask, final: Mask) -> float:
    """The cost the move from `learned` to `final` touched, as a share of the dense cost: what either keeps
    minus what both keep (channels opened plus channels closed, blocks likewise, priced together)."""
    either = _combine(learned, final, set.union, set.intersection)
    both = _combine(learned, final, set.intersection, set.union)
    for name in problem.units:  # a group of a block that both masks close is absent from both: not kept
        if name not in learned.kept_channels and name not in final.kept_channels:
            either.kept_channels.pop(name, None)
            both.kept_channels.pop(name, None)
    return (problem.cost(either) - problem.cost(both)) / problem.cost(problem.full())


def closed_by(problem: MaskProblem, mask: Mask) -> dict[str, float]:
    """The dense cost the mask removes, as shares of the dense cost: by its closed blocks (their branches at
    full width) and by its channel cuts (the rest)."""
    dense = problem.cost(problem.full())
    blocks_only = problem.cost(leading_mask(problem.widths, mask.closed_blocks,
                                            set(problem.widths) - set(mask.kept_channels)))
    return {"blocks": (dense - blocks_only) / dense, "channels": (blocks_only - problem.cost(mask)) / dense}


def projection_report(problem: MaskProblem, learned: Mask, final: Mask, cost_name: str = "flops") -> dict:
    """What moving the learned mask into the target band changed: the kept cost ratio before and after
    (`learned_<cost_name>_ratio`, `final_<cost_name>_ratio`), and per group and block the gates it flipped
    (channel indices opened or closed, blocks closed or reopened), and the share of the dense cost it flipped
    (`flipped_<cost_name>_share`, `flipped_cost`)."""
    dense = problem.cost(problem.full())
    flipped = {}
    for name in problem.widths:
        before, after = set(learned.kept_channels.get(name, [])), set(final.kept_channels.get(name, []))
        if before != after:
            flipped[name] = {"kept_before": len(before), "kept_after": len(after),
                             "opened": sorted(after - before), "closed": sorted(before - after)}
    return {f"learned_{cost_name}_ratio": problem.cost(learned) / dense,
            f"final_{cost_name}_ratio": problem.cost(final) / dense,
            f"flipped_{cost_name}_share": flipped_cost(problem, learned, final),
            "flipped_groups": flipped,
            "closed_blocks": sorted(set(final.closed_blocks) - set(learned.closed_blocks)),
            "reopened_blocks": sorted(set(learned.closed_blocks) - set(final.closed_blocks))}


def mask_document(mask: Mask, problem: MaskProblem, network: dict, round_to: int) -> dict:
    """mask.json: the mask, what it chose among (group widths, each block's groups), the network it was made
    for (`network`: model, model_args, input shape) and its MACs."""
    dense = problem.cost(problem.full())
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
    check_fits(mask, widths, block_groups, str(path))
    return document, mask


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _mask_of(document: dict, path: Path) -> Mask:
    """The Mask a mask.json document holds, its JSON types checked (range checks follow in check_fits):
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
