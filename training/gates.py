"""Binary gates: hard 0/1 in the forward pass, a straight-through estimator in the backward pass.

A gate holds one learnable score per unit (channel or residual block). Forward value = 1[score > 0];
backward treats it as sigmoid(score), so d(value)/d(score) = sigmoid'(score). A dynamic gate adds an
input-dependent term from a light head (global pool -> linear) on the layer input; the static consensus
mask is fixed later by majority vote. Once frozen, a gate is a constant 0/1 vector and trains no more.
"""
from __future__ import annotations

import torch
from torch import nn


def straight_through(logits: torch.Tensor, min_open: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard 0/1 values carrying sigmoid gradients, sigmoid probabilities). At least `min_open` units
    (the highest logits) stay open along the last dimension."""
    probs = torch.sigmoid(logits)
    hard = (logits > 0).to(logits.dtype)
    if min_open > 0:
        top = logits.detach().topk(min_open, dim=-1).indices
        hard = hard.scatter(-1, top, 1.0)
    return hard + (probs - probs.detach()), probs  # the bracket is exactly 0 forward: values stay 0/1


class Gate(nn.Module):
    def __init__(self, width: int, init_score: float = 2.0, dynamic_in: int | None = None, min_open: int = 0):
        super().__init__()
        self.width, self.min_open = width, min_open
        self.score = nn.Parameter(torch.full((width,), float(init_score)))
        # Zero-initialised so a dynamic gate starts as its static score.
        self.head = nn.Linear(dynamic_in, width) if dynamic_in else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.register_buffer("frozen", torch.zeros(()), persistent=True)
        self.register_buffer("frozen_mask", torch.ones(width), persistent=True)
        # Set by forward, read by the losses of the same step (values carry STE gradients).
        self.last_values: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen.item())

    def logits(self, layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """(width,) for a static gate, (batch, width) for a dynamic one."""
        if self.head is None or layer_input is None:
            return self.score
        return self.score + self.head(layer_input.mean(dim=(2, 3)))

    def forward(self, layer_input: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_frozen:
            values = self.frozen_mask
            self.last_values, self.last_probs = values, None
            return values
        values, probs = straight_through(self.logits(layer_input), self.min_open)
        self.last_values, self.last_probs = values, probs
        return values

    def freeze(self, mask: torch.Tensor) -> None:
        """Fix the gate to a 0/1 mask; the score stops receiving gradients through the forward pass."""
        self.frozen_mask.copy_(mask.to(self.frozen_mask))
        self.frozen.fill_(1.0)
        self._stop_training()

    def _stop_training(self) -> None:
        self.score.requires_grad_(False)
        if self.head is not None:
            self.head.requires_grad_(False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # requires_grad is not part of a state dict: a gate loaded frozen must stop training here, or a
        # resumed run holds scores that want gradients and never get any (DDP refuses to go on).
        if self.is_frozen:
            self._stop_training()


def polarization(probs: torch.Tensor, t: float, center: str = "threshold") -> torch.Tensor:
    """Polarizer of Zhuang et al. (NeurIPS 2020), t * mean(p) - mean|p - c|, on gate probabilities.

    Zhuang et al. centre on c = mean(p). Our gates are hard, decided at p = 0.5, so the default centres
    there: every gate is pushed away from its own decision boundary. With the mean as centre, closed
    gates whose p lies between the mean and 0.5 are pushed towards opening, and against a FLOPs target
    about half the gates hovered at the boundary in our toy runs (tests/test_gates.py; README).
    """
    probs = probs.reshape(-1)
    c = probs.mean() if center == "mean" else 0.5
    return t * probs.mean() - (probs - c).abs().mean()


def consensus_disagreement(probs: torch.Tensor) -> torch.Tensor:
    """For dynamic gates (batch, width): how far individual inputs sit from the batch consensus."""
    if probs.dim() < 2:
        return probs.new_zeros(())
    return (probs - probs.mean(dim=0, keepdim=True)).abs().mean()


def polarizer(channel_probs: list[torch.Tensor], block_probs: list[torch.Tensor], t: float,
              center: str = "threshold") -> torch.Tensor:
    """The polarizing term of a whole network: the mean over channel groups of each group's polarizer,
    plus one over all block gates together (a single block gate cannot polarize on its own)."""
    per_input = [p.mean(dim=0) if p.dim() > 1 else p for p in channel_probs]
    total = torch.stack([polarization(p, t, center) for p in per_input]).mean() if per_input else None
    if block_probs:
        blocks = polarization(torch.cat([p.mean(dim=0) if p.dim() > 1 else p for p in block_probs]), t, center)
        total = blocks if total is None else total + blocks
    if total is None:
        raise ValueError("the network has no gates to polarize")
    return total


def polarized_penalty(ratio: torch.Tensor, channel_probs: list[torch.Tensor], block_probs: list[torch.Tensor],
                      target: float, flops_weight: float, polarization_weight: float, t: float,
                      center: str = "threshold") -> torch.Tensor:
    """The polarized method's gate loss: flops_weight * (kept MACs ratio - target)^2 plus the polarizer.
    Squared: the push fades as the ratio tracks the ramped target, so near it the task loss decides which
    gates close (with abs, the constant push closed gates regardless of their use)."""
    return (flops_weight * (ratio - target) ** 2
            + polarization_weight * polarizer(channel_probs, block_probs, t, center))


def kept_target(progress: float, final: float, warmup_fraction: float, ramp_fraction: float) -> float:
    """The kept-FLOPs target at `progress` (share of all steps): 1 until warm-up ends, then linearly down
    to `final` at `ramp_fraction`. Closing everything at once overshoots, and the polarizer then locks
    gates shut."""
    span = max(ramp_fraction - warmup_fraction, 1e-9)
    done = min(1.0, max(0.0, (progress - warmup_fraction) / span))
    return 1.0 - (1.0 - final) * done
