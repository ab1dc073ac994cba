"""Torch-Pruning (Fang et al., VainF/Torch-Pruning) as a peer on the shared loop, in three recipes.

Torch-Pruning chooses which channels go; the cut itself is the one every method makes
(`ShrinkingMethod.shrink`), so the peer's network is checkpointed, masked and exported like ours. Each cut
scans Torch-Pruning's global pruning ratio and keeps the ratio whose network comes closest to the kept-MACs
target (`target_flops_ratio`; `make compare` sets the MACs the polarized run reached), counted as every
method's `flops_ratio` is. The recipes follow Torch-Pruning's CIFAR benchmark (`reproduce/main.py`):

- `l1_oneshot`: L1 magnitude, one global cut at `tp_prune_at` of the steps (its `--method l1`);
- `taylor_iterative`: first-order Taylor group importance, `tp_steps` cuts spread evenly up to
  `tp_prune_at`, each to a kept-MACs target on a straight line from 1 to the final one; the importance of a
  cut sums the gradients of the `tp_grad_batches` batches before it (its examples' Taylor recipe);
- `group_sl`: `GroupNormPruner` with its group regulariser (`tp_reg`, its CIFAR value 5e-4) applied after
  every backward until one global cut at `tp_prune_at`, importance the group L2 norm normalised by its
  maximum (its `--method group_sl`).

The rest of the run fine-tunes the cut network. Widths: Torch-Pruning's own `round_to` floors a group's
kept width, so a 16-wide group that would lose 3 channels loses all 16 and the network breaks; here its
ranking runs unrounded and each group then keeps its most important channels up to the next deployable
width (`mask.kept_widths`, the rule every method's widths follow).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TrainingError
from ..graph import example_for
from ..mask import kept_widths, unit_sizes
from .base import RunContext, failed
from .shrinking import ShrinkingMethod

RECIPES = ("l1_oneshot", "taylor_iterative", "group_sl")
RATIO_GRID = tuple(round(0.01 * i, 2) for i in range(1, 96))  # global pruning ratios a cut tries
INSTALL_HINT = "pip install -r requirements-bench.txt (make compare does it)"


@dataclass
class TorchPruningSettings:
    """This method's config keys (flat in YAML and --set: `TrainConfig` inherits them)."""
    tp_recipe: str = "l1_oneshot"        # l1_oneshot | taylor_iterative | group_sl
    tp_prune_at: float = 0.5             # share of the steps by which the last cut is made
    tp_steps: int = 4                    # taylor_iterative: number of cuts
    tp_grad_batches: int = 10            # taylor_iterative: batches whose gradients a cut's importance sums
    tp_reg: float = 5e-4                 # group_sl: strength of GroupNormPruner's regulariser


def torch_pruning():
    """The torch_pruning module, or a clear error (a benchmark-only dependency)."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise TrainingError(f"method torch_pruning needs Torch-Pruning, which is not installed: {INSTALL_HINT}") from None
    return tp


class TorchPruningMethod(ShrinkingMethod):
    settings = TorchPruningSettings

    @classmethod
    def config_problems(cls, cfg, chosen: bool) -> list[tuple[str, str]]:
        return failed(
            (cfg.tp_recipe in RECIPES, "tp_recipe", f"must be one of {', '.join(RECIPES)}"),
            (0 < cfg.tp_prune_at < 1, "tp_prune_at", "must be in (0, 1): the cut needs steps before and after it"),
            (cfg.tp_steps >= 1, "tp_steps", "must be at least 1"),
            (cfg.tp_grad_batches >= 1, "tp_grad_batches", "must be at least 1"),
            (cfg.tp_reg >= 0, "tp_reg", "must be >= 0"),
            (not chosen or importlib.util.find_spec("torch_pruning") is not None, "method",
             f"torch_pruning needs the Torch-Pruning package: {INSTALL_HINT}"),
        )

    def __init__(self, cfg, graph):
        super().__init__(cfg, graph)
        self.unit_of_producer = {producer: unit for unit, group in graph.prunable().items()
                                 for producer in group.producers}
        self.cuts: list[dict[str, Any]] = []
        self.regularizer = None     # group_sl: the GroupNormPruner whose regulariser trains the dense network
        self.grad_sum: dict[str, torch.Tensor] = {}
        self.progress, self.total_steps = 0.0, 1
        self.macs_ratio = 1.0       # kept MACs of the current network, as a share of the dense one's

    def schedule(self) -> list[tuple[float, float]]:
        """(progress, kept-MACs target) of every cut, in order."""
        count = self.cfg.tp_steps if self.cfg.tp_recipe == "taylor_iterative" else 1
        target = self.cfg.target_flops_ratio
        return [(self.cfg.tp_prune_at * i / count, 1 - (1 - target) * i / count) for i in range(1, count + 1)]

    def next_cut(self) -> tuple[float, float] | None:
        planned = self.schedule()
        return planned[len(self.cuts)] if len(self.cuts) < len(planned) else None

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        torch_pruning()
        self.total_steps = ctx.total_epochs * ctx.steps_per_epoch
        if self.cfg.tp_recipe == "group_sl" and not self.cuts and not self.finished:
            self.regularizer = self.pruner(model, 0.0)

    # --- Torch-Pruning's choice ---------------------------------------------------------------------
    def pruner(self, model: nn.Module, ratio: float):
        """A global Torch-Pruning pruner of the recipe over `model`'s prunable units (the rest ignored)."""
        tp = torch_pruning()
        ignored = [module for name, module in model.named_modules()
                   if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in self.unit_of_producer]
        example = example_for(model, self.graph.input_shape)
        common = dict(global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored)
        if self.cfg.tp_recipe == "group_sl":
            return tp.pruner.GroupNormPruner(model, example, reg=self.cfg.tp_reg, **common,
                                             importance=tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"))
        importance = (tp.importance.GroupTaylorImportance() if self.cfg.tp_recipe == "taylor_iterative"
                      else tp.importance.MagnitudeImportance(p=1))
        return tp.pruner.MetaPruner(model, example, importance=importance, **common)

    def choose(self, model: nn.Module, ratio: float) -> dict[str, list[int]]:
        """Kept channels per unit (indices into the current widths) when Torch-Pruning removes `ratio` of
        the channels globally, each unit rounded up to a deployable width by Torch-Pruning's importance.
        Nothing is pruned by Torch-Pruning itself."""
        pruner = self.pruner(model, ratio)
        names = {module: name for name, module in model.named_modules()}
        local = {}
        for group in pruner.step(interactive=True):
            unit = next((self.unit_of_producer[names[dep.target.module]] for dep, _ in group
                         if pruner.DG.is_out_channel_pruning_fn(dep.handler)
                         and names.get(dep.target.module) in self.unit_of_producer), None)
            if unit is None:
                continue
            width = len(self.kept[unit])
            removed = len(set(int(i) for i in group[0].idxs))
            allowed = [w for w in kept_widths(unit_sizes(self.dense_widths[unit], self.cfg.round_to)) if w <= width]
            keep = min((w for w in allowed if w >= width - removed), default=width)
            root = group[0].dep  # the importance of every channel of the unit, not only of those that go
            importance = pruner.estimate_importance(
                pruner.DG.get_pruning_group(root.target.module, root.handler, list(range(width))))
            local[unit] = sorted(torch.argsort(importance, descending=True)[:keep].tolist())
        return local

    def cut_to(self, model: nn.Module, target: float) -> tuple[dict[str, list[int]], dict[str, Any]]:
        """Torch-Pruning's choice at the global ratio whose network comes closest to `target` kept MACs."""
        # A scan, not a bisection: kept MACs do not fall monotonically with the ratio (on ResNet-20 with
        # projections, L1 keeps 0.479 at 0.7 and 0.543 at 0.9). A choice takes about 25 ms there.
        tried = {}
        for ratio in RATIO_GRID:
            local = self.choose(model, ratio)
            tried[ratio] = (self.kept_macs_ratio(self.composed(local)), local)
        ratio = min(tried, key=lambda r: (abs(tried[r][0] - target), r))
        kept, local = tried[ratio]
        return local, {"pruning_ratio": ratio, "target_flops_ratio": target, "flops_ratio": kept}

    # --- the loop's hooks ---------------------------------------------------------------------------
    def before_step(self, model: nn.Module) -> None:
        if self.regularizer is not None:
            self.regularizer.regularize(model)
        upcoming = self.next_cut()
        window = self.cfg.tp_grad_batches / self.total_steps
        if self.cfg.tp_recipe == "taylor_iterative" and upcoming and upcoming[0] - self.progress <= window:
            for name, parameter in model.named_parameters():
                if parameter.grad is not None:
                    total = self.grad_sum.get(name)
                    self.grad_sum[name] = parameter.grad.detach().clone() if total is None else total + parameter.grad

    def between_steps(self, model: nn.Module, progress: float, ctx: RunContext) -> nn.Module:
        self.progress = progress
        upcoming = self.next_cut()
        if upcoming is None or progress < upcoming[0]:
            return model
        if self.grad_sum:  # the Taylor importance reads .grad: the sum over the batches before the cut
            for name, parameter in model.named_parameters():
                parameter.grad = self.grad_sum.get(name)
        local, record = self.cut_to(model, upcoming[1])
        model.zero_grad(set_to_none=True)
        self.grad_sum, self.regularizer = {}, None
        self.cuts.append({"progress": progress, **record})
        self.macs_ratio = record["flops_ratio"]
        print(f"torch_pruning: cut {len(self.cuts)} of {len(self.schedule())} at {progress:.3f} of the steps, "
              f"ratio {record['pruning_ratio']:.2f}, kept MACs {record['flops_ratio']:.3f} "
              f"(target {record['target_flops_ratio']:.3f})", flush=True)
        return self.shrink(model, local)

    def extra_loss(self, model: nn.Module, progress: float):
        return None, {"kept_flops": self.macs_ratio}

    # --- reporting and resume -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"torch_pruning": {"version": importlib.metadata.version("torch-pruning"), "recipe": self.cfg.tp_recipe,
                                  "cuts": self.cuts}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cuts": self.cuts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cuts = list(state.get("cuts", []))
        self.macs_ratio = self.kept_macs_ratio(self.kept)
