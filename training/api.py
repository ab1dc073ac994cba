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
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomicio import write_bytes

from .config import TrainConfig
from .gates import kept_target, polarized_penalty
from .gating import GatedNetwork, cut, mask_macs
from .graph import trace_network
from .mask import Mask
from .methods.polarized import PolarizedSettings
from .pruning_report import pruning_report, reachability

EQUIVALENCE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Polarization:
    """How the gates learn. Defaults: the training method's (`PolarizedSettings`), except the ramp, which
    is the default run's (`configs/fmnist_resnet20.yaml`) short-budget schedule."""
    target_flops: float = PolarizedSettings.target_flops_ratio   # kept MACs / dense MACs
    round_to: int = TrainConfig.round_to  # kept widths are multiples of this (onnxruntime's fast conv path)
    tolerance: float = PolarizedSettings.flops_tolerance  # the final mask lands within this of the target
    flops_weight: float = PolarizedSettings.flops_weight
    polarization_weight: float = PolarizedSettings.polarization_weight
    polarization_t: float = PolarizedSettings.polarization_t
    polarization_center: str = PolarizedSettings.polarization_center
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
        super().__init__(graph, settings.init_score)
        self.settings = settings

    def penalty(self, progress: float) -> torch.Tensor:
        """The gate loss for the last forward pass at `progress` (0..1 of training): the squared distance
        of kept MACs from the ramped target plus the polarizer. Zero during warm-up and once frozen."""
        s = self.settings
        ratio = self.kept_ratio()
        if progress < s.warmup_fraction or all(g.is_frozen for g in self.channel_gates.values()):
            return ratio * 0.0
        channel_probs, block_probs = self.gate_probs()
        target = kept_target(progress, s.target_flops, s.warmup_fraction, s.ramp_fraction)
        return polarized_penalty(ratio, channel_probs, block_probs, target, s.flops_weight,
                                 s.polarization_weight, s.polarization_t, s.polarization_center)

    def summary(self, mask: Mask | None = None) -> dict:
        """The pruning report of `mask` (default: `final_mask()`): per group width before and after or why
        it is pinned, per block kept or closed, per layer widths and MACs, the target and its miss
        (`training.pruning_report`; `report_markdown` renders it, `write_pruning_report` saves it)."""
        s = self.settings
        return pruning_report(self.graph, mask or self.final_mask(), s.target_flops, s.round_to)

    def flops_ratio(self, mask: Mask | None = None) -> float:
        """Kept MACs / dense MACs of `mask` (default: `final_mask()`)."""
        return mask_macs(self.graph, mask or self.final_mask()) / self.dense_macs

    def final_mask(self) -> Mask:
        """The deployable mask: what the gates chose, rounded to `round_to`, in the target band."""
        s = self.settings
        return self.mask(s.round_to, s.target_flops, s.tolerance)

    @torch.no_grad()
    def prune(self, mask: Mask | None = None, check_input: torch.Tensor | None = None) -> nn.Module:
        """The physically smaller network for `mask` (default: `final_mask()`; the gates are frozen to it).
        Checked against the gated network on `check_input` (default: random inputs of the example shape)."""
        mask = mask or self.final_mask()
        self.freeze(mask)
        pruned = cut(self.graph, mask, self.plain()).eval()
        was_training = self.training
        self.eval()
        try:
            images = check_input if check_input is not None else torch.randn(
                4, *self.graph.input_shape, device=next(self.parameters()).device)
            expected, got = self(images), pruned(images)
        finally:
            self.train(was_training)
        worst = float((expected - got).abs().max())
        if worst > EQUIVALENCE_TOLERANCE * max(1.0, float(expected.abs().max())):
            raise RuntimeError(f"the cut network differs from the gated one by {worst:.3g}: please report "
                               "this network, its cut is wrong")
        return pruned


def polarize(model: nn.Module, example_input: torch.Tensor, **settings) -> PolarizedNetwork:
    """Gates in a copy of `model` (which is left as it is), from one trace with `example_input` (one batch
    on the model's device). Keyword settings: the fields of `Polarization`."""
    settings = Polarization(**settings)
    gated = PolarizedNetwork(trace_network(copy.deepcopy(model), example_input), settings)
    unreachable = reachability(gated.graph, settings.target_flops, settings.round_to)
    if unreachable:
        warnings.warn(unreachable, stacklevel=2)
    return gated


def save_pruned(path: str | Path, pruned: nn.Module, example_input: torch.Tensor) -> None:
    """Write `pruned` (architecture and weights) as a torch.export program with a dynamic batch axis."""
    pruned = pruned.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()  # batch 2: no 0/1 specialising
    program = torch.export.export(pruned, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_bytes(path, buffer.getvalue())


def load_pruned(path: str | Path) -> nn.Module:
    """A network saved by `save_pruned`, ready for inference (no user code needed), with the module paths
    and state-dict keys of the network that was saved. The program was captured in inference mode and
    stays so: its train()/eval() only set the flag (an exported graph refuses to switch modes itself)."""
    network = torch.export.load(str(path)).module()

    def set_mode(mode: bool = True) -> nn.Module:
        network.training = mode
        return network
    network.train, network.eval = set_mode, lambda: set_mode(False)  # torch.export sets both to raise
    return network


PROGRAM_FILES = {"pruned": "pruned.pt2", "dense": "dense.pt2", "samples": "test_samples.npz"}


def save_for_export(folder: str | Path, pruned: nn.Module, dense: nn.Module, images: torch.Tensor,
                    labels: torch.Tensor) -> Path:
    """A folder `python -m export --run FOLDER` turns into ONNX files and Triton models: the pruned network,
    the dense one it came from (the latency baseline; e.g. `gated.plain()` or your original network) and
    real test images (normalised as the network expects) with their labels, for the checks and serving."""
    folder = Path(folder)
    example = images[:1]
    save_pruned(folder / PROGRAM_FILES["pruned"], pruned, example)
    save_pruned(folder / PROGRAM_FILES["dense"], dense, example)
    buffer = io.BytesIO()
    np.savez(buffer, images=images.detach().cpu().numpy().astype(np.float32),
             labels=labels.detach().cpu().numpy().astype(np.int64))
    write_bytes(folder / PROGRAM_FILES["samples"], buffer.getvalue())
    return folder
