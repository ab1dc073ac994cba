"""Polarized gates (Zhi et al., arXiv 2302.10798): one pass learns the weights and a static sub-network.

Loss = task + lambda1 * gap + lambda2 * gap^2 + polarization_weight * polarizer
       (+ consensus_weight * disagreement for dynamic gates), gap = kept cost ratio - ramped target,
the multipliers raised by ascent (`training.gates.TargetConstraint`; `constraint: squared` is the earlier
fixed flops_weight * gap^2). Gates decide whole `round_to` units, so the ratio is that of a deployable mask.
The cost is the kept MACs (`cost: flops`, target `target_flops_ratio`) or the latency predicted by a table
measured on the deployment runtime (`cost: latency`, target `target_latency_ratio`, `training.latency`):
one cost object, chosen once, prices the loss, the rounding into the target band and the floor check.
Schedule over one run: warm-up (gates open, weights settle) -> gates learn, the target ramping down ->
once the target is final and the learned ratio has stayed in the band for `freeze_patience` of the steps
(at `freeze_fraction` at the latest, then moved into the band as a last resort, every flip reported) the
decisions become the mask and the gates are frozen -> the remaining steps fine-tune exactly the network
that export will cut out. The gates sit wherever the
trace of the network puts them (`training.gating`), built-in network or the user's own.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polarprune.common.atomicio import write_json

from ..errors import ConfigError
from ..gates import TargetConstraint, consensus_disagreement, gate_loss, kept_target
from ..gating import Cost, GatedNetwork, MacsCost, cut, embed, mask_cost, mask_problem
from ..mask import GateDecision, Mask, choose_mask, closed_by, projection_report
from .base import Method, RunContext, failed


PROJECTIONS = ("band", "none")
CONSTRAINTS = ("lagrangian", "squared")
CONSTRAINT_RATIOS = ("hard", "expected")
CONSTRAINT_MOVES = ("band", "all")
TRACE_EVERY = 0.005  # of all steps: how often the kept ratio is recorded for metrics.json
POLARIZATION_CENTERS = ("threshold", "mean")
COSTS = ("flops", "latency")
LOSS_WEIGHTS = ("flops_weight", "polarization_weight", "polarization_t", "consensus_weight", "constraint_lr",
                "gate_momentum", "gate_score_clamp")


@dataclass
class PolarizedSettings:
    """This method's config keys. `TrainConfig` inherits them, so they stay flat keys in YAML and --set."""
    target_flops_ratio: float = 0.5      # kept MACs / dense MACs
    flops_tolerance: float = 0.02        # the final mask lands within this of the target (if widths allow)
    projection: str = "band"             # "band": move the learned mask into the target band; "none": keep
                                         # it as the gates chose (rounded), and report the miss
    constraint: str = "lagrangian"       # the target as a constraint with multipliers raised by ascent (CoFi);
                                         # "squared": the fixed term flops_weight * (ratio - target)^2
    one_sided_ramp: bool = True          # while the target ramps, lambda1 >= 0: gates ahead of it are not
                                         # pushed back open (afterwards the target is an equality)
    constraint_restart: bool = True      # once the target is final, lambda1 never pushes the ratio away from it:
                                         # it starts again from 0 when the ratio leaves the band on the other side
    constraint_lr: float = 1.0           # ascent step of the multipliers, per step and unit of ratio missed
    constraint_moves: str = "band"       # "band": the target term pushes only gates whose flip lands nearer the
                                         # band, in tiers once the target is final (GatedNetwork.band_ratio); "all"
    constraint_ratio: str = "hard"       # the ratio the target term sees: "hard" (the network the step ran) or
                                         # "expected" (of the gate probabilities; the polarizer makes them agree)
    flops_weight: float = 20.0           # constraint: squared only
    polarization_weight: float = 1.0
    polarization_t: float = 0.0          # extra closing push; the FLOPs term already sets how much closes
    polarization_center: str = "threshold"  # "threshold" (p = 0.5, default) or "mean" (Zhuang et al.)
    release_pulled_gates: bool = True    # once the target is final and the kept ratio is outside the band, the
                                         # polarizer leaves out the gates the target term moves (it held them)
    consensus_weight: float = 1.0        # dynamic gates: pull inputs towards one consensus sub-network
    gate_init: float = 2.0               # initial gate score: all gates open, sigmoid = 0.88
    gate_lr: float = 3.0                 # SGD on gate scores (see loop.make_optimizers)
    gate_momentum: float = 0.0           # momentum carried gates past the target (docs/method.md)
    gate_score_clamp: float = 3.0        # scores stay in [-c, c] (0: unbounded); sigmoid'(c) is the slowest turn
    dynamic_gates: bool = False
    warmup_fraction: float = 0.1         # of all steps, before gate losses start
    ramp_fraction: float = 0.5           # of all steps, when the kept-FLOPs target reaches its final value;
                                         # it falls linearly from 1 after warm-up, so gates close gradually
    freeze_patience: float = 0.02        # of all steps: the learned ratio stays in the target band this long,
                                         # with the target final, before the mask freezes
    freeze_fraction: float = 0.75        # of all steps, when the mask freezes at the latest; the rest fine-tunes
    cut_after_freeze: bool = True        # fine-tune the physically cut network (cheaper); false: the gated one
    lr_restart_at_freeze: bool = True    # the weights' cosine starts again at the freeze, over the steps left
                                         # (learning-rate rewinding, Renda et al. 2020; docs/accuracy.md)
    # the gates' cost (training/latency.py): kept MACs, or latency measured on the deployment runtime
    cost: str = "flops"                  # "flops": kept MACs; "latency": a per-layer latency table
    target_latency_ratio: float | None = None  # cost=latency: kept / dense latency (0.5 = "2x faster"); the
                                         # band around it is flops_tolerance wide, whichever the cost
    latency_batch: int = 1               # batch the table is timed at
    latency_threads: int = 2             # onnxruntime intra-op threads, no spinning
    latency_runtime: str = "onnxruntime-cpu"  # or "onnxruntime-cuda" (onnxruntime's CUDA provider, real GPU)
    latency_cache: str = "~/.cache/polarprune/latency"  # tables by runtime, machine, batch, threads, network


def cost_floor(graph, round_to: int, cost: Cost | None = None) -> tuple[float, str]:
    """The smallest kept-cost ratio (default: FLOPs) a mask can reach, and how: every residual block
    closed, every other group at one unit (`training.mask.unit_sizes`, as `choose_mask` allows)."""
    problem = mask_problem(graph, cost, round_to)
    gone = {g for groups in problem.block_groups.values() for g in groups}
    smallest = Mask({n: list(range(sizes[0])) for n, sizes in problem.units.items() if n not in gone},
                    list(problem.block_groups))
    how = (f"{len(problem.block_groups)} residual blocks closed, every other group at one unit of "
           f"{round_to} channels")
    return problem.ratio(smallest), how


class PolarizedMethod(Method):
    uses_gates = True

    settings = PolarizedSettings

    @classmethod
    def config_problems(cls, cfg, chosen: bool) -> list[tuple[str, str]]:
        found = failed(
            (0 < cfg.target_flops_ratio <= 1, "target_flops_ratio", "must be in (0, 1]"),
            (0 <= cfg.flops_tolerance < 1, "flops_tolerance", "must be in [0, 1)"),
            (cfg.projection in PROJECTIONS, "projection", f"must be one of {', '.join(PROJECTIONS)}"),
            (cfg.constraint in CONSTRAINTS, "constraint", f"must be one of {', '.join(CONSTRAINTS)}"),
            (cfg.constraint_moves in CONSTRAINT_MOVES, "constraint_moves",
             f"must be one of {', '.join(CONSTRAINT_MOVES)}"),
            (cfg.constraint_ratio in CONSTRAINT_RATIOS, "constraint_ratio",
             f"must be one of {', '.join(CONSTRAINT_RATIOS)}"),
            (cfg.gate_momentum < 1, "gate_momentum", "must be in [0, 1)"),
            (0 <= cfg.freeze_patience < 1, "freeze_patience", "must be in [0, 1)"),
            (cfg.polarization_center in POLARIZATION_CENTERS, "polarization_center",
             f"must be one of {', '.join(POLARIZATION_CENTERS)}"),
            (cfg.gate_init > 0, "gate_init", "must be > 0: gates start open, so training starts from the network"),
            (cfg.gate_lr > 0, "gate_lr", "must be a positive number"),
            (0 <= cfg.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)"),
            (0 < cfg.freeze_fraction <= 1, "freeze_fraction", "must be in (0, 1]"),
            (cfg.warmup_fraction < cfg.freeze_fraction, "warmup_fraction", "must be below freeze_fraction"),
            (cfg.warmup_fraction <= cfg.ramp_fraction <= 1, "ramp_fraction", "must be in [warmup_fraction, 1]"),
            *((getattr(cfg, key) >= 0, key, "must be >= 0") for key in LOSS_WEIGHTS),
            (cfg.cost in COSTS, "cost", f"must be one of {', '.join(COSTS)}"),
            (cfg.latency_batch >= 1, "latency_batch", "must be at least 1"),
            (cfg.latency_threads >= 1, "latency_threads", "must be at least 1"),
            (bool(cfg.latency_cache.strip()), "latency_cache", "must name a folder"))
        if cfg.cost == "latency":
            found += cls._latency_problems(cfg, chosen)
        if chosen and cfg.dynamic_gates and cfg.val_size == 0:
            found.append(("val_size", "dynamic gates need a validation set for their consensus vote: set val_size > 0"))
        return found

    @staticmethod
    def _latency_problems(cfg, chosen: bool) -> list[tuple[str, str]]:
        if not chosen:
            return [("cost", f"'latency' is a cost of the polarized gates; method {cfg.method!r} prunes by its "
                             "own rule: use cost: flops")]
        if cfg.target_latency_ratio is None:
            return [("target_latency_ratio", "is required with cost: latency (kept / dense latency, e.g. 0.5 "
                                             "for 2x faster)")]
        from ..latency import runtime_problem  # loads onnxruntime: only when the latency cost is used
        problem = runtime_problem(cfg.latency_runtime)
        return failed((0 < cfg.target_latency_ratio <= 1, "target_latency_ratio", "must be in (0, 1]"),
                      (problem is None, "latency_runtime", problem or ""))

    def __init__(self, cfg, graph):
        super().__init__(cfg, graph)
        if not graph.prunable() and not graph.blocks:
            raise ConfigError(f"config key 'model': {cfg.model} has nothing the gates can prune (every channel "
                              "group is pinned and there is no residual block); see the pin reasons with "
                              "training.graph.trace_network", "model")
        self.flops = MacsCost(graph)  # always reported; the cost the gates pay unless cost: latency
        self.latency_table = None      # cost: latency: the table (measured or cached) the run prices masks by
        self.latency_report: dict | None = None  # predicted vs measured latency of the final mask
        self.cost: Cost | None = None
        self._problem = None  # (cost, its MaskProblem), see mask_problem
        if cfg.cost == "flops":
            self._use_cost(self.flops)
        self.mask: Mask | None = None
        self.projection: dict | None = None  # what the move into the target band changed
        self.cut_at_freeze = cfg.cut_after_freeze  # this run trains the cut network after the freeze
        self.finished = False
        self._cut_momentum = None  # maps the gated network's momentum onto the cut network's
        self._table_written = False
        self.agreement: float | None = None
        self.last_ratio = self.last_flops = 1.0
        self.constraint = TargetConstraint(cfg.constraint_lr, cfg.one_sided_ramp, cfg.constraint_restart)
        self.steps_in_band = 0          # consecutive steps with the target final and the learned ratio in band
        self.freeze_point: dict | None = None  # when and why the mask froze
        self.trace: list[list[float]] = []     # [progress, kept ratio, target, lambda1] every TRACE_EVERY steps

    @property
    def target(self) -> float:
        """The final kept-cost ratio the gates aim for."""
        return self.cfg.target_latency_ratio if self.cfg.cost == "latency" else self.cfg.target_flops_ratio

    def mask_problem(self):
        """What this run's masks choose among (units of round_to), priced by its cost: built once per cost."""
        if self._problem is None or self._problem[0] is not self.cost:
            self._problem = (self.cost, mask_problem(self.graph, self.cost, self.cfg.round_to))
        return self._problem[1]

    def _use_cost(self, cost: Cost) -> None:
        """Price everything with `cost` from now on, once it is known that the target can be reached."""
        floor, how = cost_floor(self.graph, self.cfg.round_to, cost)
        key = f"target_{cost.name}_ratio"
        if self.target + self.cfg.flops_tolerance < floor:
            what = "FLOPs" if cost.name == "flops" else "predicted latency (latency_table.json)"
            raise ConfigError(f"config key {key!r}: {self.cfg.model} cannot go below {floor:.4f} of its {what} "
                              f"({how}), even with flops_tolerance {self.cfg.flops_tolerance:g} (got "
                              f"{self.target!r})", key)
        self.cost = cost

    def _use_table(self, table) -> None:
        from ..latency import LatencyCost  # onnxruntime and onnx load only for cost: latency
        self.latency_table = table
        self._use_cost(LatencyCost(self.graph, table))

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        """cost: latency: the table of this runtime, machine and network (rank 0 measures or reads it, every
        rank prices masks by the same one), copied into the run folder."""
        if self.cfg.cost != "latency":
            return
        if self.cost is None:
            from ..latency import LatencySettings, load_or_measure
            settings = LatencySettings.from_config(self.cfg)
            table, _ = ctx.cluster.from_main(
                lambda: load_or_measure(self.graph, self.cfg.round_to, settings,
                                        print if self.cfg.progress else lambda _: None))
            self._use_table(table)
        if not self._table_written and ctx.cluster.is_main and ctx.run_dir is not None:
            write_json(ctx.run_dir / "latency_table.json", self.latency_table.to_dict())
            self._table_written = True

    def build_model(self) -> GatedNetwork:
        cfg = self.cfg
        return GatedNetwork(self.graph, cfg.gate_init, cfg.dynamic_gates, cfg.round_to, cfg.gate_score_clamp)

    def restore_model(self) -> nn.Module:
        if self.mask is not None and self.cut_at_freeze and not self.finished:
            return cut(self.graph, self.mask, self.graph.module)
        return self.build_model()

    # --- during training -------------------------------------------------------------------------
    def extra_loss(self, model: GatedNetwork, progress: float):
        if self.mask is not None:  # frozen: the sub-network is fixed, only the weights train
            return None, self._logs()
        cfg = self.cfg
        target, learning = self.target_at(progress), progress >= cfg.warmup_fraction
        lambda1 = self.constraint.lambda1  # before this step raises it
        if learning:
            loss, self.last_ratio = gate_loss(
                model, self.cost, target, cfg.flops_tolerance,
                self.constraint if cfg.constraint == "lagrangian" else cfg.flops_weight,
                cfg.polarization_weight, cfg.polarization_t, cfg.polarization_center,
                ramping=progress < cfg.ramp_fraction, moves=cfg.constraint_moves, ratio=cfg.constraint_ratio,
                release_pulled=cfg.release_pulled_gates)
        else:
            self.last_ratio = float(model.kept_ratio(self.cost).detach())
        self.last_flops = self.last_ratio if self.cost is self.flops else float(model.kept_ratio(self.flops).detach())
        if not learning:
            return None, self._logs()
        if len(self.trace) == 0 or progress - self.trace[-1][0] >= TRACE_EVERY:
            self.trace.append([round(progress, 4), round(self.last_ratio, 4), round(target, 4), round(lambda1, 4),
                               round(float(model.kept_ratio(self.cost, expected=True).detach()), 4)])
        if cfg.dynamic_gates:
            disagreement = [consensus_disagreement(p) for p in sum(model.gate_probs(), [])]
            loss = loss + cfg.consensus_weight * torch.stack(disagreement).mean()
        return loss, self._logs()

    def _logs(self) -> dict[str, float]:
        return {"kept_flops": self.last_flops, **({"kept_latency": self.last_ratio} if self.cfg.cost == "latency"
                                                  else {})}

    def target_at(self, progress: float) -> float:
        """The kept-cost target of this step (`training.gates.kept_target`)."""
        cfg = self.cfg
        return kept_target(progress, self.target, cfg.warmup_fraction, cfg.ramp_fraction)

    def learned_ratio(self, model: GatedNetwork, ctx: RunContext) -> float:
        """Kept cost ratio of the mask the gates hold now (after the last step), nothing moved."""
        if self.cfg.dynamic_gates:  # the vote walks the validation set: the last steps' mean stands in
            return self.last_ratio
        problem = self.mask_problem()
        return problem.ratio(choose_mask(problem, *model.decisions(), None, self.cfg.flops_tolerance))

    def between_steps(self, model: nn.Module, progress: float, ctx: RunContext) -> nn.Module:
        """The freeze that waits for the gates: once the target is final and the learned ratio has stayed in
        the band for `freeze_patience` of the steps, or at `freeze_fraction` at the latest. The rest of the
        run then trains the cut network (`cut_after_freeze`): only what export will keep, cheaper."""
        if self.mask is not None or progress >= 1.0:
            return model
        cfg = self.cfg
        in_band = progress >= cfg.ramp_fraction and abs(self.learned_ratio(model, ctx) - self.target) <= cfg.flops_tolerance
        self.steps_in_band = self.steps_in_band + 1 if in_band else 0
        total_steps = ctx.total_epochs * ctx.steps_per_epoch
        patience = max(1, round(cfg.freeze_patience * total_steps))
        if self.steps_in_band < patience and progress < cfg.freeze_fraction:
            return model
        self.freeze_point = {"step": round(progress * total_steps), "progress": progress,
                             "reason": "in band" if self.steps_in_band >= patience else "latest (freeze_fraction)",
                             "patience_steps": patience, "latest_progress": cfg.freeze_fraction}
        self._freeze(model, ctx)
        return self._cut(model) if self.cut_at_freeze else model

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
            self.freeze_point = {"progress": 1.0, "reason": "end of training", "latest_progress": self.cfg.freeze_fraction}
            self._freeze(model, ctx)
        self.finished = True  # also when the mask froze only now: the saved model is the gated one
        if self.cfg.cost == "latency" and self.latency_report is None:  # rank 0 times, every rank reports
            self.latency_report = ctx.cluster.from_main(self._measure_latency)
        if isinstance(model, GatedNetwork):
            return model
        # the cut network back in the dense shape, gates frozen: what checkpoints and export expect
        device = next(model.parameters()).device
        gated = embed(self.graph, model, self.mask, self.cfg.gate_init, self.gate_state, self.cfg.round_to,
                      self.cfg.dynamic_gates)
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
                values = gate.last_values if gate.last_values is not None else gate.score.new_ones(len(gate.sizes))
                hard = (values.detach() > 0.5).float()
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
        cfg = self.cfg
        problem, macs = self.mask_problem(), mask_problem(self.graph, self.flops)
        learned = choose_mask(problem, channels, blocks, None, cfg.flops_tolerance)
        self.mask = learned if cfg.projection == "none" else choose_mask(
            problem, channels, blocks, self.target, cfg.flops_tolerance)
        name = self.cost.name
        self.projection = {"mode": cfg.projection, **projection_report(macs, learned, self.mask),
                           **projection_report(problem, learned, self.mask, name), f"target_{name}_ratio": self.target,
                           "closed_flops_share": closed_by(macs, self.mask)}
        self.projection["target_miss"] = self.projection[f"final_{name}_ratio"] - self.target
        model.freeze(self.mask)
        self.last_ratio = mask_cost(self.cost, self.mask) / self.cost.dense
        self.last_flops = mask_cost(self.flops, self.mask) / self.flops.dense

    def _measure_latency(self) -> dict[str, Any]:
        """The dense and the final cut network exported and timed interleaved with the table's settings:
        what the table predicted for the mask beside what the runtime measured."""
        from ..latency import LatencySettings, measure_networks
        settings = LatencySettings.from_config(self.cfg)
        pruned = cut(self.graph, self.mask, self.graph.module)  # timing does not depend on the weights
        times = measure_networks(self.graph.module, pruned, tuple(self.graph.input_shape), settings)
        return {"predicted_ratio": mask_cost(self.cost, self.mask) / self.cost.dense, **times,
                "batch": settings.batch, "threads": settings.threads, "runtime": settings.runtime,
                "table": "latency_table.json"}

    def schedule_restart(self) -> int | None:
        """The freeze step, with `lr_restart_at_freeze`: the cut network trains on a schedule of its own."""
        if self.cfg.lr_restart_at_freeze and self.freeze_point is not None:
            return self.freeze_point.get("step")  # none when the mask froze only at the end
        return None

    def final_mask(self, model: GatedNetwork) -> Mask:
        return self.mask

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dynamic_gates": self.cfg.dynamic_gates, "projection": self.projection,
                               "cost": self.cfg.cost, "freeze": self.freeze_point, "ratio_trace": self.trace,
                               "constraint": {"kind": self.cfg.constraint, **self.constraint.state_dict()}}
        if self.cfg.cost == "latency":
            out.update(target_flops_ratio=None, target_latency_ratio=self.cfg.target_latency_ratio,
                       latency=self.latency_report)
        if self.agreement is not None:
            out["consensus_agreement"] = self.agreement
        return out

    def state_dict(self) -> dict[str, Any]:
        mask = None if self.mask is None else {"kept_channels": self.mask.kept_channels,
                                               "closed_blocks": self.mask.closed_blocks}
        return {"mask": mask, "agreement": self.agreement, "last_ratio": self.last_ratio,
                "projection": self.projection, "cut_at_freeze": self.cut_at_freeze, "finished": self.finished,
                "gate_state": getattr(self, "gate_state", None), "last_flops": self.last_flops,
                "latency_table": self.latency_table.to_dict() if self.latency_table is not None else None,
                "latency_report": self.latency_report, "constraint": self.constraint.state_dict(),
                "steps_in_band": self.steps_in_band, "freeze_point": self.freeze_point, "trace": self.trace}

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
        self.last_flops = state.get("last_flops", self.last_ratio)
        self.latency_report = state.get("latency_report")
        self.constraint.load_state_dict(state.get("constraint", {}))
        self.steps_in_band = state.get("steps_in_band", 0)
        self.freeze_point = state.get("freeze_point")
        self.trace = state.get("trace", [])
        if state.get("latency_table") is not None:  # a resume prices masks by the table the run began with
            from ..latency import LatencyTable
            self._use_table(LatencyTable.from_dict(state["latency_table"], "checkpoint latency_table"))
