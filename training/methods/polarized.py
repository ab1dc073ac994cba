"""Polarized gates (Zhi et al., arXiv 2302.10798): one pass learns the weights and a static sub-network.

Loss = task + flops_weight * (kept MACs ratio - target)^2 + polarization_weight * polarizer
       (+ consensus_weight * disagreement for dynamic gates).
Schedule over one run: warm-up (gates open, weights settle) -> gates learn -> at `freeze_fraction` of the
epochs the decisions become a deployable mask (rounded widths, target met) and the gates are frozen ->
the remaining epochs fine-tune exactly the network that export will cut out. The gates sit wherever the
trace of the network puts them (`training.gating`), built-in network or the user's own.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..gates import consensus_disagreement, kept_target, polarized_penalty
from ..gating import GatedNetwork, cut, embed, mask_macs, mask_problem
from ..mask import GateDecision, Mask, choose_mask, projection_report
from .base import Method, RunContext, failed


PROJECTIONS = ("band", "none")
POLARIZATION_CENTERS = ("threshold", "mean")
LOSS_WEIGHTS = ("flops_weight", "polarization_weight", "polarization_t", "consensus_weight")


@dataclass
class PolarizedSettings:
    """This method's config keys. `TrainConfig` inherits them, so they stay flat keys in YAML and --set."""
    target_flops_ratio: float = 0.5      # kept MACs / dense MACs
    flops_tolerance: float = 0.02        # the final mask lands within this of the target (if widths allow)
    projection: str = "band"             # "band": move the learned mask into the target band; "none": keep
                                         # it as the gates chose (rounded), and report the miss
    flops_weight: float = 20.0
    polarization_weight: float = 1.0
    polarization_t: float = 0.0          # extra closing push; the FLOPs term already sets how much closes
    polarization_center: str = "threshold"  # "threshold" (p = 0.5, default) or "mean" (Zhuang et al.)
    consensus_weight: float = 1.0        # dynamic gates: pull inputs towards one consensus sub-network
    gate_init: float = 2.0               # initial gate score: all gates open, sigmoid = 0.88
    gate_lr: float = 1.0                 # SGD with momentum on gate scores (see loop.make_optimizers)
    dynamic_gates: bool = False
    warmup_fraction: float = 0.1         # of all steps, before gate losses start
    ramp_fraction: float = 0.5           # of all steps, when the kept-FLOPs target reaches its final value;
                                         # it falls linearly from 1 after warm-up, so gates close gradually
    freeze_fraction: float = 0.75        # of all epochs, when the mask is fixed; the rest fine-tunes it
    cut_after_freeze: bool = True        # fine-tune the physically cut network (cheaper); false: the gated one


def flops_floor(graph, round_to: int) -> tuple[float, str]:
    """The smallest kept-FLOPs ratio a mask can reach, and how: every residual block closed, every other
    group at one step of `round_to` channels (as `choose_mask` allows)."""
    problem = mask_problem(graph)
    gone = {g for groups in problem.block_groups.values() for g in groups}
    smallest = Mask({n: list(range(min(round_to, w))) for n, w in problem.widths.items() if n not in gone},
                    list(problem.block_groups))
    dense = problem.macs(Mask({n: list(range(w)) for n, w in problem.widths.items()}, []))
    how = (f"{len(problem.block_groups)} residual blocks closed, every other group at "
           f"{round_to} channels")
    return problem.macs(smallest) / dense, how


class PolarizedMethod(Method):
    uses_gates = True

    settings = PolarizedSettings

    @classmethod
    def config_problems(cls, cfg, chosen: bool) -> list[tuple[str, str]]:
        found = failed(
            (0 < cfg.target_flops_ratio <= 1, "target_flops_ratio", "must be in (0, 1]"),
            (0 <= cfg.flops_tolerance < 1, "flops_tolerance", "must be in [0, 1)"),
            (cfg.projection in PROJECTIONS, "projection", f"must be one of {', '.join(PROJECTIONS)}"),
            (cfg.polarization_center in POLARIZATION_CENTERS, "polarization_center",
             f"must be one of {', '.join(POLARIZATION_CENTERS)}"),
            (cfg.gate_init > 0, "gate_init", "must be > 0: gates start open, so training starts from the network"),
            (cfg.gate_lr > 0, "gate_lr", "must be a positive number"),
            (0 <= cfg.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)"),
            (0 < cfg.freeze_fraction <= 1, "freeze_fraction", "must be in (0, 1]"),
            (cfg.warmup_fraction < cfg.freeze_fraction, "warmup_fraction", "must be below freeze_fraction"),
            (cfg.warmup_fraction <= cfg.ramp_fraction <= 1, "ramp_fraction", "must be in [warmup_fraction, 1]"),
            *((getattr(cfg, key) >= 0, key, "must be >= 0") for key in LOSS_WEIGHTS))
        if chosen and cfg.dynamic_gates and cfg.val_size == 0:
            found.append(("val_size", "dynamic gates need a validation set for their consensus vote: set val_size > 0"))
        return found

    def __init__(self, cfg, graph):
        super().__init__(cfg, graph)
        if not graph.prunable() and not graph.blocks:
            raise ConfigError(f"config key 'model': {cfg.model} has nothing the gates can prune (every channel "
                              "group is pinned and there is no residual block); see the pin reasons with "
                              "training.graph.trace_network", "model")
        floor, how = flops_floor(graph, cfg.round_to)
        if cfg.target_flops_ratio + cfg.flops_tolerance < floor:
            raise ConfigError(f"config key 'target_flops_ratio': {cfg.model} cannot go below {floor:.4f} of its "
                              f"FLOPs ({how}), even with flops_tolerance {cfg.flops_tolerance:g} (got "
                              f"{cfg.target_flops_ratio!r})", "target_flops_ratio")
        self.dense_macs = float(mask_macs(graph, Mask({n: list(range(g.width)) for n, g in graph.prunable().items()})))
        self.mask: Mask | None = None
        self.projection: dict | None = None  # what the move into the target band changed
        self.cut_at_freeze = cfg.cut_after_freeze  # this run trains the cut network after the freeze
        self.finished = False
        self._cut_momentum = None  # maps the gated network's momentum onto the cut network's
        self.agreement: float | None = None
        self.last_ratio = 1.0

    def build_model(self) -> GatedNetwork:
        return GatedNetwork(self.graph, self.cfg.gate_init, self.cfg.dynamic_gates)

    def restore_model(self) -> nn.Module:
        if self.mask is not None and self.cut_at_freeze and not self.finished:
            return cut(self.graph, self.mask, self.graph.module)
        return self.build_model()

    # --- during training -------------------------------------------------------------------------
    def extra_loss(self, model: GatedNetwork, progress: float):
        if self.mask is not None:  # frozen: the sub-network is fixed, only the weights train
            return None, {"kept_flops": self.last_ratio}
        ratio = model.kept_ratio()
        self.last_ratio = float(ratio.detach())
        if progress < self.cfg.warmup_fraction:
            return None, {"kept_flops": self.last_ratio}
        cfg = self.cfg
        channel_probs, block_probs = model.gate_probs()
        loss = polarized_penalty(ratio, channel_probs, block_probs, self.target_at(progress), cfg.flops_weight,
                                 cfg.polarization_weight, cfg.polarization_t, cfg.polarization_center)
        if cfg.dynamic_gates:
            disagreement = [consensus_disagreement(p) for p in channel_probs + block_probs]
            loss = loss + cfg.consensus_weight * torch.stack(disagreement).mean()
        return loss, {"kept_flops": self.last_ratio}

    def target_at(self, progress: float) -> float:
        """The kept-FLOPs target of this step (`training.gates.kept_target`)."""
        cfg = self.cfg
        return kept_target(progress, cfg.target_flops_ratio, cfg.warmup_fraction, cfg.ramp_fraction)

    def start_epoch(self, model: nn.Module, epoch: int, ctx: RunContext) -> nn.Module:
        freeze_epoch = min(ctx.total_epochs, max(1, round(self.cfg.freeze_fraction * ctx.total_epochs)))
        if self.mask is None and epoch >= freeze_epoch:
            self._freeze(model, ctx)
            if self.cut_at_freeze:  # the rest of the run trains only what export will keep: cheaper
                return self._cut(model)
        return model

    def _cut(self, model: GatedNetwork) -> nn.Module:
        """The frozen gated network physically cut (same function, fewer MACs). The gate scores are kept
        for the end of the run; the optimiser momentum is cut like the weights it belongs to."""
        self.gate_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                           if k.startswith(("network.channel_gates.", "network.block_gates."))}
        plain = model.plain()
        small = cut(self.graph, self.mask, plain).train(model.training)

        def carry(momentum: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            shadow = copy.deepcopy(plain)  # the same network holding momentum where it held weights
            with torch.no_grad():
                for name, p in shadow.named_parameters():
                    p.copy_(momentum.get(f"network.{name}", torch.zeros_like(p)))
            return {name: p.detach() for name, p in cut(self.graph, self.mask, shadow).named_parameters()}
        self._cut_momentum = carry
        return small

    def carry_momentum(self, momentum: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._cut_momentum(momentum) if self._cut_momentum else {}

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        if self.mask is None:
            self._freeze(model, ctx)
        self.finished = True  # also when the mask froze only now: the saved model is the gated one
        if isinstance(model, GatedNetwork):
            return model
        # the cut network back in the dense shape, gates frozen: what checkpoints and export expect
        device = next(model.parameters()).device
        gated = embed(self.graph, model, self.mask, self.cfg.gate_init, self.gate_state)
        return gated.to(device).train(model.training)

    # --- the consensus mask -------------------------------------------------------------------------
    @torch.no_grad()
    def decisions(self, model: GatedNetwork, ctx: RunContext) -> tuple[dict[str, GateDecision], dict]:
        """Static gates: open = score > 0. Dynamic gates: majority vote of validation inputs."""
        if not self.cfg.dynamic_gates:
            return model.decisions()
        share = self._vote(model, ctx)
        channels = {name: GateDecision(share[f"channel_gates.{key}"] > 0.5, share[f"channel_gates.{key}"])
                    for name, key in zip(self.graph.prunable(), model.channel_gates)}
        blocks = {name: (bool(share[f"block_gates.{key}"][0] > 0.5), float(share[f"block_gates.{key}"][0]))
                  for name, key in zip(self.graph.blocks, model.block_gates)}
        return channels, blocks

    def _vote(self, model: GatedNetwork, ctx: RunContext) -> dict[str, torch.Tensor]:
        """Per gate, the share of validation inputs that opened each unit; sets `agreement`. (The config
        refuses dynamic gates without a validation set, so there is at least one input.)"""
        gates = model.gates()
        was_training = model.training
        model.eval()
        opened = {p: 0.0 for p in gates}
        decisions_per_batch = {p: [] for p in gates}
        count = 0
        for images, _ in ctx.val_batches():
            model(images.to(ctx.device))
            for path, gate in gates.items():
                hard = (gate.last_values.detach() > 0.5).float()
                hard = hard.expand(images.shape[0], -1) if hard.dim() == 1 else hard
                opened[path] = opened[path] + hard.sum(dim=0)
                decisions_per_batch[path].append(hard.cpu())
            count += images.shape[0]
        model.train(was_training)
        share = {p: (opened[p] / count).cpu() for p in gates}
        agree = [(torch.cat(decisions_per_batch[p]) == (share[p] > 0.5).float()).float().mean() for p in gates]
        self.agreement = float(torch.stack(agree).mean())
        return share

    def _freeze(self, model: GatedNetwork, ctx: RunContext) -> None:
        """The gates' decisions, rounded to round_to (the learned mask), then moved into the target band
        unless `projection: none`; what the move changed is reported, never hidden."""
        channels, blocks = self.decisions(model, ctx)
        problem, cfg = mask_problem(self.graph), self.cfg
        learned = choose_mask(problem, channels, blocks, cfg.round_to, None, cfg.flops_tolerance)
        self.mask = learned if cfg.projection == "none" else choose_mask(
            problem, channels, blocks, cfg.round_to, cfg.target_flops_ratio, cfg.flops_tolerance)
        self.projection = {"mode": cfg.projection, **projection_report(problem, learned, self.mask),
                           "target_flops_ratio": cfg.target_flops_ratio}
        self.projection["target_miss"] = self.projection["final_flops_ratio"] - cfg.target_flops_ratio
        model.freeze(self.mask)
        self.last_ratio = mask_macs(self.graph, self.mask) / self.dense_macs

    def final_mask(self, model: GatedNetwork) -> Mask:
        return self.mask

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dynamic_gates": self.cfg.dynamic_gates, "projection": self.projection}
        if self.agreement is not None:
            out["consensus_agreement"] = self.agreement
        return out

    def state_dict(self) -> dict[str, Any]:
        mask = None if self.mask is None else {"kept_channels": self.mask.kept_channels,
                                               "closed_blocks": self.mask.closed_blocks}
        return {"mask": mask, "agreement": self.agreement, "last_ratio": self.last_ratio,
                "projection": self.projection, "cut_at_freeze": self.cut_at_freeze, "finished": self.finished,
                "gate_state": getattr(self, "gate_state", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mask = state.get("mask")
        self.mask = None if mask is None else Mask(mask["kept_channels"], mask["closed_blocks"])
        self.agreement = state.get("agreement")
        self.projection = state.get("projection")
        self.cut_at_freeze = state.get("cut_at_freeze", False)  # absent: saved before runs cut at the freeze
        self.finished = state.get("finished", False)
        self.gate_state = state.get("gate_state")
        if self.mask is not None and self.cut_at_freeze and not self.finished and self.gate_state is not None:
            self._cut_momentum = None  # a resumed cut network already holds its own momentum
        self.last_ratio = state.get("last_ratio", 1.0)
