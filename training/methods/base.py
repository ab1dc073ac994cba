"""The interface between the shared training loop and a pruning method.

The loop owns data, optimisers, checkpoints and metrics; a method decides the model it trains, the extra
loss it adds, what happens between steps and epochs, and the final static mask. A method may hand back a
new (smaller) model from `start_epoch` or `between_steps`; the loop then rebuilds its optimisers. Every method works on the
trace of the run's network (`training.graph.NetworkGraph`): built-in or the user's own, alike.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from ..distributed import Cluster
from ..gating import full_mask
from ..graph import NetworkGraph
from ..mask import Mask

if TYPE_CHECKING:  # the config inherits every method's settings, so it imports the methods, not the reverse
    from ..config import TrainConfig


def failed(*rules: tuple[bool, str, str]) -> list[tuple[str, str]]:
    """(key, why) of each (holds, key, why) rule that does not hold."""
    return [(key, why) for holds, key, why in rules if not holds]


@dataclass
class RunContext:
    """What the loop lends a method: the device, a way to walk the (whole, unsharded) validation set,
    the cluster of a data-parallel run, and the run folder (rank 0 writes there; None outside a run)."""
    device: torch.device
    val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    total_epochs: int
    steps_per_epoch: int
    cluster: Cluster = Cluster()
    run_dir: Path | None = None


class Method:
    uses_gates = False
    settings: type | None = None  # the dataclass of this method's config keys (TrainConfig inherits it)

    @classmethod
    def config_problems(cls, cfg: TrainConfig, chosen: bool) -> list[tuple[str, str]]:
        """(key, why) for each of this method's settings that cannot work. `TrainConfig.validate` asks every
        method (a bad value is an error whichever method runs); `chosen`: `cfg.method` is this one, so the
        checks that involve the rest of the run apply too."""
        return []

    def __init__(self, cfg: TrainConfig, graph: NetworkGraph):
        self.cfg, self.graph = cfg, graph

    def build_model(self) -> nn.Module:
        """The network this method trains, fresh: by default the plain traced network."""
        return copy.deepcopy(self.graph.module)

    def restore_model(self) -> nn.Module:
        """A network shaped like the one the loaded method state describes, for its checkpoint's weights."""
        return self.build_model()

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        """Called once the model sits on its device (fresh or resumed)."""

    def start_epoch(self, model: nn.Module, epoch: int, ctx: RunContext) -> nn.Module:
        return model

    def between_steps(self, model: nn.Module, progress: float, ctx: RunContext) -> nn.Module:
        """After each step (`progress`: share of all steps done): the model to go on with. A new one (e.g.
        the network cut once a mask froze) gets fresh optimisers, like one from `start_epoch`."""
        return model

    def schedule_restart(self) -> int | None:
        """The step from which the weights' cosine schedule starts again over the remaining steps, once the
        method knows it (`training.loop.cosine_schedule`); None: one schedule for the whole run."""
        return None

    def carry_momentum(self, momentum: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """After `start_epoch` handed back a new model: the optimiser momentum of its parameters (by name),
        from the old model's (`momentum`). Default: none carried, the new model's optimiser starts fresh."""
        return {}

    def extra_loss(self, model: nn.Module, progress: float) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Added to the task loss after each forward; `progress` is the share of all steps done."""
        return None, {}

    def before_step(self, model: nn.Module) -> None:
        """Called after backward, before the optimiser step (gradients are in place)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimiser step."""

    def end_epoch(self, model: nn.Module, epoch: int, ctx: RunContext) -> None:
        """After an epoch's last step, before its checkpoint. Statistics gathered from this rank's shard
        of the batches must be summed over `ctx.cluster` here, so every rank decides alike."""

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """End of training: make the model the static network that will be deployed."""
        return model

    def final_mask(self, model: nn.Module) -> Mask:
        return full_mask(self.graph)

    def summary(self) -> dict[str, Any]:
        """Extra entries for metrics.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
