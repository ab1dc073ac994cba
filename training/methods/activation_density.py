"""Activation density (Foldy-Porto, Venkatesha, Panda, arXiv 2002.02949): the network shrinks as it trains.

A unit's activation density is the share of its post-ReLU activations that are non-zero over the training
batches of an epoch. Every `density_every` epochs (until `density_stop` of the run) each prunable unit is
cut to about density x its current width, rounded to `round_to` and never below one group, keeping the
channels that fire most often; training goes on with the physically smaller network, so later epochs
cost less. Units are the prunable channel groups of the network's trace (`training.graph`), and a resize
is the same cut export makes, and the run ends with an ordinary mask (`shrinking.ShrinkingMethod`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..gating import mask_macs
from ..mask import Mask
from .base import RunContext, failed
from .shrinking import ShrinkingMethod


@dataclass
class ActivationDensitySettings:
    """This method's config keys (flat in YAML and --set: `TrainConfig` inherits them)."""
    density_every: int = 1               # epochs between resizes to (activation density x width)
    density_stop: float = 0.75           # of all epochs, after which widths stay fixed (the rest fine-tunes)


class DensityMeter:
    """Per-channel counts of positive values at each unit's first norm (or producer) output, before its
    activation (relu(x) != 0 exactly when x > 0), over forward passes in training mode."""

    def __init__(self) -> None:
        self.positive: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}  # values per channel (batch x height x width), summed
        self._hooks: list[Any] = []

    def attach(self, norms: dict[str, nn.Module]) -> None:
        """Start counting at each unit's measuring point (unit -> module)."""
        self.detach()
        for unit, norm in norms.items():
            self._hooks.append(norm.register_forward_hook(
                lambda module, _inputs, out, unit=unit: self.record(unit, out) if module.training else None))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def reset(self) -> None:
        self.positive, self.seen = {}, {}

    @torch.no_grad()
    def record(self, unit: str, pre_relu: torch.Tensor) -> None:
        fired = (pre_relu > 0).sum(dim=(0, *range(2, pre_relu.dim()))).to("cpu", torch.float64)
        self.positive[unit] = self.positive.get(unit, 0) + fired
        self.seen[unit] = self.seen.get(unit, 0) + pre_relu.numel() // pre_relu.shape[1]

    def sum_over(self, cluster) -> None:
        """Add up the counts of all ranks (a no-op in one process)."""
        for unit in sorted(self.positive):
            cluster.sum_tensor_(self.positive[unit])
            self.seen[unit] = int(cluster.sum([self.seen[unit]])[0])

    def channel_density(self, unit: str) -> torch.Tensor:
        """Share of non-zero post-ReLU values per channel."""
        return self.positive[unit] / self.seen[unit]

    def density(self, unit: str) -> float:
        """Share of non-zero post-ReLU values over the whole unit."""
        return float(self.channel_density(unit).mean())


def resized_width(width: int, density: float, step: int) -> int:
    """density x width rounded to a multiple of `step`, at least one step, never wider than now."""
    return min(width, max(step, step * round(density * width / step)))


def most_active(channel_density: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` most active channels, in channel order (ties: the lower index)."""
    order = torch.sort(channel_density, descending=True, stable=True).indices
    return sorted(order[:count].tolist())


class ActivationDensityMethod(ShrinkingMethod):
    settings = ActivationDensitySettings

    @classmethod
    def config_problems(cls, cfg, chosen: bool) -> list[tuple[str, str]]:
        found = failed((cfg.density_every >= 1, "density_every", "must be at least 1"),
                       (0 < cfg.density_stop <= 1, "density_stop", "must be in (0, 1]"))
        if chosen and not found and cfg.density_every >= cfg.density_stop * cfg.epochs:
            found.append(("density_every", f"no resize fits: resizes happen at multiples of density_every below "
                                           f"density_stop x epochs = {cfg.density_stop * cfg.epochs:g}"))
        return found

    def __init__(self, cfg, graph):
        super().__init__(cfg, graph)
        self.resizes: list[dict[str, Any]] = []
        self.train_macs = 0          # forward MACs x examples x 3 (forward + backward), as trained
        self.dense_train_macs = 0    # the same examples through the dense network
        self.epoch_seconds: dict[int, float] = {}  # epoch -> seconds of its training steps (and resize)
        self.meter = DensityMeter()
        self.macs = self.dense_macs
        self._hooks: list[Any] = []
        self._epoch_started, self._world_size = 0.0, 1

    def resize_epochs(self, total_epochs: int) -> list[int]:
        every, stop = self.cfg.density_every, self.cfg.density_stop * total_epochs
        return [epoch for epoch in range(every, total_epochs, every) if epoch < stop]

    # --- hooks: density and examples --------------------------------------------------------------
    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.meter.detach()

    def measuring_points(self) -> dict[str, str]:
        """Unit -> the module whose output the density is read at: the group's first norm, else its first
        producer (both come before the activation)."""
        return {name: (group.members and next((m for m in group.members if self.graph.layers[m].kind == "norm"),
                                              None)) or group.producers[0]
                for name, group in self.graph.prunable().items()}

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        self._detach()
        self._world_size = ctx.cluster.world_size
        if self.finished:  # a finished run resumed: nothing left to train
            return
        self.macs = mask_macs(self.graph, Mask(self.kept))
        self.meter.attach({unit: model.get_submodule(path) for unit, path in self.measuring_points().items()})
        self._hooks = [model.register_forward_pre_hook(self._count_examples)]

    def _count_examples(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if model.training:
            examples = inputs[0].shape[0] * self._world_size  # every rank runs an equal shard
            self.train_macs += 3 * self.macs * examples
            self.dense_train_macs += 3 * self.dense_macs * examples

    # --- the schedule -------------------------------------------------------------------------------
    def start_epoch(self, model: nn.Module, epoch: int, ctx: RunContext) -> nn.Module:
        self._epoch_started = time.perf_counter()
        if epoch in self.resize_epochs(ctx.total_epochs) and self.meter.positive:
            model = self.resize(model, epoch)
        self.meter.reset()  # each resize reads the density of the epoch before it
        return model

    def resize(self, model: nn.Module, epoch: int) -> nn.Module:
        """Cut every unit to density x width, keeping its most active channels; the same model if no
        width changes."""
        local: dict[str, list[int]] = {}
        record: dict[str, Any] = {"epoch": epoch, "density": {}, "width": {}}
        for unit, kept in self.kept.items():
            width, density = len(kept), self.meter.density(unit)
            keep = resized_width(width, density, min(self.cfg.round_to, self.dense_widths[unit]))
            if self.graph.groups[unit].unit > 1:
                keep = width  # read by a grouped conv (whole groups only): not resized by density
            local[unit] = most_active(self.meter.channel_density(unit), keep) if keep < width else list(range(width))
            record["density"][unit], record["width"][unit] = density, keep
        record["changed"] = any(len(local[u]) < len(self.kept[u]) for u in local)
        self.resizes.append(record)
        return self.shrink(model, local)

    def extra_loss(self, model: nn.Module, progress: float):
        return None, {"kept_flops": self.macs / self.dense_macs}

    def end_epoch(self, model: nn.Module, epoch: int, ctx: RunContext) -> None:
        self.meter.sum_over(ctx.cluster)  # every rank counted its own shard: resize on the global counts
        self.epoch_seconds[epoch] = time.perf_counter() - self._epoch_started

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self._detach()
        return super().finish(model, ctx)

    # --- reporting and resume -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train_flops": self.train_macs, "dense_train_flops": self.dense_train_macs,
            "train_flops_ratio": self.train_macs / self.dense_train_macs if self.dense_train_macs else None,
            "resizes": self.resizes,
            "epoch_train_seconds": [self.epoch_seconds[e] for e in sorted(self.epoch_seconds)],
        }
        # Epochs before the first resize trained the dense network: the dense pace, measured in this run.
        first_resize = min((r["epoch"] for r in self.resizes if r["changed"]), default=None)
        dense_epochs = [s for e, s in self.epoch_seconds.items() if first_resize is None or e < first_resize]
        if dense_epochs and len(dense_epochs) < len(self.epoch_seconds):
            pace = sum(dense_epochs) / len(dense_epochs)
            out["train_seconds_ratio_vs_dense_pace"] = sum(self.epoch_seconds.values()) / (
                pace * len(self.epoch_seconds))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "resizes": self.resizes, "train_macs": self.train_macs,
                "dense_train_macs": self.dense_train_macs, "epoch_seconds": self.epoch_seconds,
                "meter": {"positive": self.meter.positive, "seen": self.meter.seen}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.resizes = list(state.get("resizes", []))
        self.train_macs = state.get("train_macs", 0)
        self.dense_train_macs = state.get("dense_train_macs", 0)
        self.epoch_seconds = dict(state.get("epoch_seconds", {}))
        meter = state.get("meter", {})
        self.meter.positive, self.meter.seen = dict(meter.get("positive", {})), dict(meter.get("seen", {}))
