"""Polarized gates (Zhi et al., arXiv 2302.10798): one pass learns the weights and a static sub-network.

Loss = task + flops_weight * (kept MACs ratio - target)^2 + polarization_weight * polarizer
       (+ consensus_weight * disagreement for dynamic gates).
Schedule over one run: warm-up (gates open, weights settle) -> gates learn -> at `freeze_fraction` of the
epochs the decisions become a deployable mask (rounded widths, target met) and the gates are frozen ->
the remaining epochs fine-tune exactly the network that export will cut out.
"""
from __future__ import annotations

from typing import Any

import torch

from ..arch import residual_blocks
from ..flops import gated_macs, layer_costs
from ..gates import Gate, consensus_disagreement, kept_target
from ..gates import polarizer as gates_polarizer
from ..mask import GateDecision, Mask, finalize_mask, mask_macs
from ..models import GateOptions, SpecNet, build_model
from .base import Method, RunContext


def _unit(gate_path: str) -> str:
    return gate_path.rsplit(".", 1)[0]


class PolarizedMethod(Method):
    uses_gates = True

    def __init__(self, cfg, spec):
        super().__init__(cfg, spec)
        self.mask: Mask | None = None
        self.agreement: float | None = None
        self.last_ratio = 1.0

    def gate_options(self) -> GateOptions:
        return GateOptions(init_score=self.cfg.gate_init, dynamic=self.cfg.dynamic_gates)

    def build_model(self) -> SpecNet:
        return build_model(self.dense_spec, self.gate_options())

    def prepare(self, model: SpecNet, ctx: RunContext) -> None:
        self.costs = layer_costs(model)
        self.dense_macs = float(sum(cost.macs for cost in self.costs))
        self.blocks = set(residual_blocks(self.dense_spec))

    # --- during training -------------------------------------------------------------------------
    def _kept_ratio(self, gates: dict[str, Gate]) -> torch.Tensor:
        widths, blocks = {}, {}
        for path, gate in gates.items():
            values = gate.last_values
            per_input = values.mean(dim=0) if values.dim() > 1 else values  # dynamic: expected width
            if path.endswith(".block_gate"):
                blocks[_unit(path)] = per_input.sum()
            else:
                widths[_unit(path)] = per_input.sum()
        return gated_macs(self.costs, widths, blocks) / self.dense_macs

    def extra_loss(self, model: SpecNet, progress: float):
        gates = model.gates()
        if self.mask is not None:  # frozen: the sub-network is fixed, only the weights train
            return None, {"kept_flops": self.last_ratio}
        ratio = self._kept_ratio(gates)
        self.last_ratio = float(ratio.detach())
        if progress < self.cfg.warmup_fraction:
            return None, {"kept_flops": self.last_ratio}
        cfg = self.cfg
        channel_probs, block_probs = [], []
        for path, gate in gates.items():
            (block_probs if path.endswith(".block_gate") else channel_probs).append(gate.last_probs)
        polarizer = gates_polarizer(channel_probs, block_probs, cfg.polarization_t, cfg.polarization_center)
        # Squared: the push fades as the ratio tracks the ramped target, so near it the task loss decides
        # which gates close (with abs, the constant push closed gates regardless of their use).
        loss = cfg.flops_weight * (ratio - self.target_at(progress)) ** 2 + cfg.polarization_weight * polarizer
        if cfg.dynamic_gates:
            disagreement = [consensus_disagreement(gate.last_probs) for gate in gates.values()]
            loss = loss + cfg.consensus_weight * torch.stack(disagreement).mean()
        return loss, {"kept_flops": self.last_ratio}

    def target_at(self, progress: float) -> float:
        """The kept-FLOPs target of this step (`training.gates.kept_target`)."""
        cfg = self.cfg
        return kept_target(progress, cfg.target_flops_ratio, cfg.warmup_fraction, cfg.ramp_fraction)

    def start_epoch(self, model: SpecNet, epoch: int, ctx: RunContext) -> SpecNet:
        freeze_epoch = min(ctx.total_epochs, max(1, round(self.cfg.freeze_fraction * ctx.total_epochs)))
        if self.mask is None and epoch >= freeze_epoch:
            self._freeze(model, ctx)
        return model

    def finish(self, model: SpecNet, ctx: RunContext) -> SpecNet:
        if self.mask is None:
            self._freeze(model, ctx)
        return model

    # --- the consensus mask -------------------------------------------------------------------------
    @torch.no_grad()
    def decisions(self, model: SpecNet, ctx: RunContext) -> dict[str, GateDecision]:
        """Static gates: open = score > 0. Dynamic gates: majority vote of validation inputs."""
        gates = model.gates()
        if not self.cfg.dynamic_gates:
            open_share = {p: (g.score > 0).float() for p, g in gates.items()}
            confidence = {p: torch.sigmoid(g.score) for p, g in gates.items()}
        else:
            open_share, confidence = self._vote(model, gates, ctx)
        result = {}
        for path in gates:
            if path.endswith(".block_gate"):
                continue
            unit = _unit(path)
            decision = GateDecision((open_share[path] > 0.5).cpu(), confidence[path].cpu())
            block_path = f"{unit}.block_gate"
            if block_path in gates:
                decision.block_open = bool(open_share[block_path][0] > 0.5)
                decision.block_conf = float(confidence[block_path][0])
            result[unit] = decision
        return result

    def _vote(self, model, gates, ctx):
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
        if count == 0:
            raise ValueError("dynamic gates need a validation set for the consensus vote: set val_size > 0")
        share = {p: (opened[p] / count).cpu() for p in gates}
        agree = [(torch.cat(decisions_per_batch[p]) == (share[p] > 0.5).float()).float().mean() for p in gates]
        self.agreement = float(torch.stack(agree).mean())
        return share, share

    def _freeze(self, model: SpecNet, ctx: RunContext) -> None:
        decisions = self.decisions(model, ctx)
        self.mask = finalize_mask(self.dense_spec, decisions, self.costs, self.cfg.round_to,
                                  self.cfg.target_flops_ratio, self.cfg.flops_tolerance)
        self.apply_mask(model)
        self.last_ratio = mask_macs(self.costs, self.dense_spec, self.mask) / self.dense_macs

    def apply_mask(self, model: SpecNet) -> None:
        for path, gate in model.gates().items():
            unit = _unit(path)
            closed = unit in self.mask.closed_blocks
            if path.endswith(".block_gate"):
                gate.freeze(torch.tensor([0.0 if closed else 1.0]))
            else:
                values = torch.zeros(gate.width)
                if not closed:
                    values[self.mask.kept_channels[unit]] = 1.0
                gate.freeze(values)

    def final_mask(self, model: SpecNet) -> Mask:
        return self.mask

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dynamic_gates": self.cfg.dynamic_gates}
        if self.agreement is not None:
            out["consensus_agreement"] = self.agreement
        return out

    def state_dict(self) -> dict[str, Any]:
        mask = None if self.mask is None else {"kept_channels": self.mask.kept_channels,
                                               "closed_blocks": self.mask.closed_blocks}
        return {"mask": mask, "agreement": self.agreement, "last_ratio": self.last_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mask = state.get("mask")
        self.mask = None if mask is None else Mask(mask["kept_channels"], mask["closed_blocks"])
        self.agreement = state.get("agreement")
        self.last_ratio = state.get("last_ratio", 1.0)
