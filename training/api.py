"""The Python API: polarized gates in your own network, your own training loop, a smaller network out.

    gated = polarize(model, example_input, target_flops=0.5, round_to=16)
    loss = criterion(gated(x), y) + gated.penalty(progress)     # progress: share of training done, 0..1
    pruned = gated.prune()                                       # a plain, smaller nn.Module
    save_pruned("pruned.pt2", pruned, example_input)             # architecture and weights, one file

`pruned` is the user's traced network (a torch.fx GraphModule with the user's module paths) with closed
channels and residual blocks physically removed; `prune` checks it computes what the gated network
computes with the same mask. `save_pruned` writes a torch.export program: it loads with `load_pruned`
without the user's code and without pickle, so it can never hit "size mismatch".
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polarprune.common.atomicio import write_bytes, write_json

from .config import TrainConfig
from .equivalence import check_equivalence
from .errors import TrainingError
from .gates import TargetConstraint, gate_loss, kept_target
from .gating import GatedNetwork, cut, mask_macs
from .graph import trace_network
from .mask import Mask, projection_report
from .methods.polarized import PolarizedSettings
from .program import NORMALIZATION_FILE, PROGRAM_FILES, ProgramError, check_program, load_pruned, save_pruned  # noqa: F401
from .pruning_report import pruning_report, reachability, write_pruning_report


@dataclass(frozen=True)
class Polarization:
    """How the gates learn. Defaults: the training method's (`PolarizedSettings`), except the ramp, which
    is the default run's (`configs/fmnist_resnet20.yaml`) short-budget schedule."""
    target_flops: float = PolarizedSettings.target_flops_ratio   # kept MACs / dense MACs
    round_to: int = TrainConfig.round_to  # gates decide units of this many channels (onnxruntime's fast path)
    tolerance: float = PolarizedSettings.flops_tolerance  # the final mask lands within this of the target
    constraint_lr: float = PolarizedSettings.constraint_lr  # ascent step of the target's multipliers
    score_clamp: float = PolarizedSettings.gate_score_clamp
    polarization_weight: float = PolarizedSettings.polarization_weight
    polarization_t: float = PolarizedSettings.polarization_t
    polarization_center: str = PolarizedSettings.polarization_center
    release_pulled_gates: bool = PolarizedSettings.release_pulled_gates  # polarizer: out of band, spare the moved
    warmup_fraction: float = PolarizedSettings.warmup_fraction   # of training, before the gate losses start
    ramp_fraction: float = 0.4         # of training, when the target reaches its final value
    init_score: float = PolarizedSettings.gate_init  # gates start open: the gated network equals the network

    def __post_init__(self) -> None:
        if not 0 < self.target_flops <= 1:
            raise ValueError(f"target_flops must be in (0, 1], got {self.target_flops}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be at least 1, got {self.round_to}")
        if not 0 <= self.warmup_fraction <= self.ramp_fraction <= 1:
            raise ValueError("need 0 <= warmup_fraction <= ramp_fraction <= 1")
        if self.init_score <= 0:
            raise ValueError("init_score must be > 0: gates start open")


class PolarizedNetwork(GatedNetwork):
    """A gated network with the polarized method's penalty and the mask it leads to."""

    def __init__(self, graph, settings: Polarization):
        super().__init__(graph, settings.init_score, round_to=settings.round_to, score_clamp=settings.score_clamp)
        self.settings = settings
        self.constraint = TargetConstraint(settings.constraint_lr)  # one-sided while ramping, restarts after

    def penalty(self, progress: float) -> torch.Tensor:
        """The gate loss for the last forward pass at `progress` (0..1 of training): the training method's
        (`training.gates.gate_loss`): the kept-MACs target as a constraint whose multipliers rise on every call
        (one-sided while the target ramps), pushing only the flips that land nearer the target band, plus the
        polarizer. Zero during warm-up and once frozen."""
        s = self.settings
        if progress < s.warmup_fraction or not any(g.learns for g in self.gates().values()):
            return torch.zeros((), device=next(self.parameters()).device)
        target = kept_target(progress, s.target_flops, s.warmup_fraction, s.ramp_fraction)
        loss, _ = gate_loss(self, self.macs_cost, target, s.tolerance, self.constraint, s.polarization_weight,
                            s.polarization_t, s.polarization_center, ramping=progress < s.ramp_fraction,
                            release_pulled=s.release_pulled_gates)
        return loss

    def learned_ratio(self) -> float:
        """Kept MACs / dense MACs of the mask the gates hold now, rounded to `round_to`, nothing moved.
        Within `tolerance` of the target, the gates have learned it: `final_mask()` then moves nothing
        (the training method freezes once this has held for a while, `freeze_patience`)."""
        return self.flops_ratio(self.mask())

    def summary(self, mask: Mask | None = None) -> dict:
        """The pruning report of `mask` (default: `final_mask()`, with what the gates chose and what moving
        it into the target band changed): per group width before and after or why it is pinned, per block
        kept or closed, per layer widths and MACs, the target and its miss (`training.pruning_report`;
        `report_markdown` renders it, `write_pruning_report` saves it)."""
        s = self.settings
        projection = None
        if mask is None:
            learned, mask = self.mask(s.round_to), self.final_mask()
            projection = {"mode": "band", **projection_report(self.mask_problem(), learned, mask),
                          "target_flops_ratio": s.target_flops}
        return pruning_report(self.graph, mask, s.target_flops, s.round_to, projection)

    def flops_ratio(self, mask: Mask | None = None) -> float:
        """Kept MACs / dense MACs of `mask` (default: `final_mask()`)."""
        return mask_macs(self.graph, mask or self.final_mask()) / self.dense_macs

    def final_mask(self) -> Mask:
        """The deployable mask: what the gates chose, in the target band."""
        s = self.settings
        return self.mask(s.target_flops, s.tolerance)

    @torch.no_grad()
    def prune(self, mask: Mask | None = None, check_input: torch.Tensor | None = None) -> nn.Module:
        """The physically smaller network for `mask` (default: `final_mask()`; the gates are frozen to it).
        Checked against the gated network on `check_input` (default: random inputs of the example shape)."""
        mask = mask or self.final_mask()
        self.freeze(mask)
        pruned = cut(self.graph, mask, self.plain()).eval()
        images = check_input if check_input is not None else torch.randn(
            4, *self.graph.input_shape, device=next(self.parameters()).device)
        was_training = self.training
        try:
            check_equivalence(self, pruned, self.graph, mask, images)
        finally:
            self.train(was_training)
        return pruned


# The CLI's names for the same settings (configs/*.yaml), so a user coming from there is told the API's.
CLI_NAMES = {"target_flops_ratio": "target_flops", "flops_tolerance": "tolerance", "gate_init": "init_score"}


class ApiError(TrainingError, TypeError):
    """A Python API call with an argument of the wrong kind or name (one line: what to pass instead)."""


def check_settings(settings: dict) -> None:
    """Unknown keyword settings are named with the setting meant (did-you-mean)."""
    known = [f.name for f in dataclasses.fields(Polarization)]
    for name in settings:
        if name not in known:
            guess = CLI_NAMES.get(name) or next(iter(difflib.get_close_matches(name, known, 1)), None)
            hint = f"; did you mean {guess!r}?" if guess else f"; the settings are {', '.join(known)}"
            raise ApiError(f"polarize() got an unknown setting {name!r}{hint}")


def check_batch(images, what: str = "example_input") -> None:
    if not isinstance(images, torch.Tensor):
        raise ApiError(f"{what} must be one batch tensor (N, C, H, W), got a {type(images).__name__}")
    if images.dim() < 2 or not images.is_floating_point():
        raise ApiError(f"{what} must be a float batch (N, C, H, W), got {images.dtype} of shape {list(images.shape)}")


def polarize(model: nn.Module, example_input: torch.Tensor, **settings) -> PolarizedNetwork:
    """Gates in a copy of `model` (which is left as it is), from one trace with `example_input` (one batch
    on the model's device). Keyword settings: the fields of `Polarization`."""
    check_settings(settings)
    check_batch(example_input)
    settings = Polarization(**settings)
    gated = PolarizedNetwork(trace_network(copy.deepcopy(model), example_input), settings)
    unreachable = reachability(gated.graph, settings.target_flops, settings.round_to)
    if unreachable:
        warnings.warn(unreachable, stacklevel=2)
    return gated


def prune(gated: PolarizedNetwork, mask: Mask | None = None, check_input: torch.Tensor | None = None) -> nn.Module:
    """`gated.prune(mask, check_input)` as a function: the smaller plain network, checked against `gated`."""
    if not isinstance(gated, PolarizedNetwork):
        raise ApiError(f"prune takes what polarize returned, got {type(gated).__name__}")
    return gated.prune(mask, check_input)


def save_for_export(folder: str | Path, pruned: nn.Module, dense: nn.Module, images: torch.Tensor,
                    labels: torch.Tensor, *, report: dict | None = None,
                    normalization: dict | None = None) -> Path:
    """A folder `python -m export --run FOLDER` turns into ONNX files and Triton models: the pruned network,
    the dense one it came from (the latency baseline; e.g. `gated.plain()` or your original network) and
    real test images (normalised as the network expects) with their labels, for the checks and serving.
    `report`: `gated.summary()` (written as pruning.md/.json/.png; export reports its closed blocks);
    `normalization`: {"mean": [...], "std": [...]} per input channel, for export_report.json and clients."""
    check_batch(images, "images")
    if normalization is not None and not (
            isinstance(normalization, dict) and set(normalization) == {"mean", "std"} and all(
                isinstance(normalization[k], (list, tuple)) and len(normalization[k]) == images.shape[1]
                for k in ("mean", "std"))):
        raise ApiError(f"normalization must be {{'mean': [...], 'std': [...]}} with one number per input channel "
                       f"({images.shape[1]})")
    for what, network in (("pruned", pruned), ("dense", dense)):
        if not isinstance(network, nn.Module):
            raise ApiError(f"{what} must be an nn.Module, got a {type(network).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),) or labels.is_floating_point():
        raise ApiError(f"labels must be one integer class per image ({len(images)}), got "
                       f"{getattr(labels, 'dtype', type(labels).__name__)} of shape {list(getattr(labels, 'shape', []))}")
    folder = Path(folder)
    example = images[:1]
    save_pruned(folder / PROGRAM_FILES["pruned"], pruned, example)
    save_pruned(folder / PROGRAM_FILES["dense"], dense, example)
    buffer = io.BytesIO()
    np.savez(buffer, images=images.detach().cpu().numpy().astype(np.float32),
             labels=labels.detach().cpu().numpy().astype(np.int64))
    write_bytes(folder / PROGRAM_FILES["samples"], buffer.getvalue())
    if report is not None:
        write_pruning_report(folder, report)
    if normalization is not None:
        write_json(folder / NORMALIZATION_FILE, {k: [float(v) for v in normalization[k]] for k in ("mean", "std")})
    return folder
