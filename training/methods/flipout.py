"""FlipOut (Apostol, Stol, Forré, "Pruning by leveraging training dynamics", AI Communications 2021).

A weight that keeps changing sign is not doing much: saliency = |w|^2 / (sign flips since training began
+ 1), ranked globally over every conv and linear weight (batch norm is left alone). At the start of each
pruning epoch (`flipout_prune_epochs`) the least salient half of the remaining weights
goes, the last time only down to `final_sparsity`. Each layer's gradient gets Gaussian noise of std
`flipout_noise` x that layer's RMS gradient before the optimiser step, so weights near zero flip more.

The sparsity is unstructured: the network keeps its dense shape with zeros in it, mask.json keeps every
channel, and no runtime used here runs it faster. metrics.json reports the weight sparsity only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..flops import count_params
from .base import Method, RunContext, failed


@dataclass
class FlipOutSettings:
    """This method's config keys (flat in YAML and --set: `TrainConfig` inherits them)."""
    final_sparsity: float = 0.75         # share of conv/linear weights zeroed at the end
    prune_freq: int | None = None        # epochs between halvings (None: as far apart as the epochs allow)
    flipout_noise: float = 1.0           # lambda: gradient noise std in units of the layer's RMS gradient


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Module path -> weight of every conv and linear, in module order."""
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))}


def sign_flips(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """1 where a weight changed sign (a step to or from exactly zero is not a flip), else 0."""
    return (torch.sign(before) * torch.sign(after) < 0).to(torch.int32)


def saliency(weight: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    return weight.detach() ** 2 / (flips + 1)


def add_gradient_noise(grad: torch.Tensor, kept: torch.Tensor, scale: float,
                       generator: torch.Generator | None = None) -> None:
    """In place: grad += scale x RMS(grad over kept weights) x N(0, 1); pruned entries then get zero."""
    live = grad[kept]
    if scale > 0 and live.numel():
        rms = live.pow(2).mean().sqrt()
        grad.add_(torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype) * rms * scale)
    grad.mul_(kept)


def prune_to(saliencies: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """New masks that keep the `keep` most salient weights among those the current masks keep."""
    flat = torch.cat([torch.where(masks[n], saliencies[n], torch.tensor(-1.0, device=saliencies[n].device)).flatten()
                      for n in saliencies])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    new_masks, start = {}, 0
    for name, mask in masks.items():
        new_masks[name] = chosen[start:start + mask.numel()].view_as(mask)
        start += mask.numel()
    return new_masks


def flipout_prune_epochs(final_sparsity: float, epochs: int, prune_freq: int | None) -> list[int]:
    """The epochs (0-based; pruning happens as each starts) at which FlipOut halves the remaining weights:
    enough halvings to reach `final_sparsity` (the last one stops there), each followed by training."""
    halvings = math.ceil(math.log(1 - final_sparsity, 0.5) - 1e-9)
    every = prune_freq or (epochs - 1) // halvings
    if every < 1 or halvings * every > epochs - 1:
        raise ValueError(f"{final_sparsity:g} sparsity takes {halvings} halvings of the remaining weights, one "
                         f"every prune_freq={max(every, 1)} epochs, each followed by training: that needs "
                         f"epochs >= {halvings * max(every, 1) + 1} (got {epochs})")
    return [every * i for i in range(1, halvings + 1)]


class FlipOutMethod(Method):
    settings = FlipOutSettings

    @classmethod
    def config_problems(cls, cfg, chosen: bool) -> list[tuple[str, str]]:
        found = failed((0 < cfg.final_sparsity < 1, "final_sparsity", "must be in (0, 1)"),
                       (cfg.prune_freq is None or cfg.prune_freq >= 1, "prune_freq", "must be at least 1"),
                       (cfg.flipout_noise >= 0, "flipout_noise", "must be >= 0"))
        if chosen and not found:
            try:
                flipout_prune_epochs(cfg.final_sparsity, cfg.epochs, cfg.prune_freq)
            except ValueError as error:
                found.append(("final_sparsity", str(error)))
        return found

    def __init__(self, cfg, graph):
        super().__init__(cfg, graph)
        self.masks: dict[str, torch.Tensor] | None = None    # bool, True = weight kept
        self.flips: dict[str, torch.Tensor] | None = None    # int32 sign-change counts since the start
        self.prunes: list[dict[str, Any]] = []
        self._signs: dict[str, torch.Tensor] = {}

    def prune_epochs(self, total_epochs: int) -> list[int]:
        return flipout_prune_epochs(self.cfg.final_sparsity, total_epochs, self.cfg.prune_freq)

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        weights = prunable_weights(model)
        if self.masks is None:
            self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
            self.flips = {n: torch.zeros_like(w, dtype=torch.int32) for n, w in weights.items()}
        device = next(model.parameters()).device
        self.masks = {n: m.to(device) for n, m in self.masks.items()}
        self.flips = {n: f.to(device) for n, f in self.flips.items()}
        self.apply_masks(model)

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        for name, weight in prunable_weights(model).items():
            weight.mul_(self.masks[name])

    def before_step(self, model: nn.Module) -> None:
        for name, weight in prunable_weights(model).items():
            if weight.grad is not None:
                add_gradient_noise(weight.grad, self.masks[name], self.cfg.flipout_noise)
            self._signs[name] = torch.sign(weight.detach()).to(torch.int8)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for name, weight in prunable_weights(model).items():
            weight.mul_(self.masks[name])  # weight decay and momentum must not revive pruned weights
            self.flips[name] += sign_flips(self._signs[name], weight)

    def start_epoch(self, model: nn.Module, epoch: int, ctx: RunContext) -> nn.Module:
        schedule = self.prune_epochs(ctx.total_epochs)
        if epoch in schedule:
            self.prune(model, target_sparsity=min(self.cfg.final_sparsity, 1 - 0.5 ** (schedule.index(epoch) + 1)),
                       epoch=epoch)
        return model

    def prune(self, model: nn.Module, target_sparsity: float, epoch: int | None = None) -> None:
        """Keep the most salient (1 - target_sparsity) of all conv/linear weights (never revives any)."""
        weights = prunable_weights(model)
        total = sum(w.numel() for w in weights.values())
        keep = min(self.nonzero(), round(total * (1 - target_sparsity)))
        saliencies = {n: saliency(w, self.flips[n]) for n, w in weights.items()}
        self.masks = prune_to(saliencies, self.masks, keep)
        self.apply_masks(model)
        self.prunes.append({"epoch": epoch, "sparsity": 1 - keep / total})

    def nonzero(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def extra_loss(self, model: nn.Module, progress: float):
        return None, {"kept_flops": 1.0}  # zeros in dense kernels: the runtime does every MAC

    def summary(self) -> dict[str, Any]:
        total = sum(m.numel() for m in self.masks.values())
        dense_params = count_params(self.graph.module)
        return {"weight_sparsity": 1 - self.nonzero() / total, "prunable_weights": total,
                "nonzero_params": dense_params - (total - self.nonzero()), "prunes": self.prunes,
                "flipout_noise": self.cfg.flipout_noise,
                "speedup_note": "unstructured zeros in dense kernels: no runtime speed-up (flops_ratio 1)"}

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda tensors: None if tensors is None else {n: t.cpu() for n, t in tensors.items()}  # noqa: E731
        return {"masks": cpu(self.masks), "flips": cpu(self.flips), "prunes": self.prunes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks, self.flips = state.get("masks"), state.get("flips")
        self.prunes = list(state.get("prunes", []))
