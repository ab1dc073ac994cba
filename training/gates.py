"""Binary gates: hard 0/1 in the forward pass, a straight-through estimator in the backward pass.

A gate holds one learnable score per unit (a `round_to` slice of a channel group, or a residual block).
Forward value = 1[score > 0];
backward treats it as sigmoid(score), so d(value)/d(score) = sigmoid'(score). A dynamic gate adds an
input-dependent term from a light head (global pool -> linear) on the layer input; the static consensus
mask is fixed later by majority vote. Once frozen, a gate is a constant 0/1 vector and trains no more.
A network's learning static gates are evaluated together, once per forward pass (`StaticGates`).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn


def hard_values(logits: torch.Tensor, min_open: int = 0) -> torch.Tensor:
    """1[logit > 0], with at least `min_open` units (the highest logits) open along the last dimension."""
    hard = (logits > 0).to(logits.dtype)
    if min_open > 0:
        top = logits.detach().topk(min_open, dim=-1).indices
        hard = hard.scatter(-1, top, 1.0)
    return hard


def with_sigmoid_gradient(hard: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`hard` carrying the gradient of sigmoid(logits), sigmoid probabilities)."""
    probs = torch.sigmoid(logits)
    return hard + (probs - probs.detach()), probs  # the bracket is exactly 0 forward: values stay 0/1


def straight_through(logits: torch.Tensor, min_open: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard 0/1 values carrying sigmoid gradients, sigmoid probabilities). At least `min_open` units
    (the highest logits) stay open along the last dimension."""
    return with_sigmoid_gradient(hard_values(logits, min_open), logits)


def hold_unpulled(probs: torch.Tensor, pulled: torch.Tensor | None) -> torch.Tensor:
    """`probs` whose gradient skips the units `pulled` (0/1 per unit) marks; None: all of them pass."""
    if pulled is None:
        return probs
    return probs.detach() + (1 - pulled) * (probs - probs.detach())


@torch.no_grad()
def clamp_scores(gates: list[Gate]) -> None:
    """Each learning gate's score clamped in place to [-score_clamp, score_clamp] (0: no clamp), before use;
    one in-place call per clamp value for all the scores."""
    scores: dict[float, list[torch.Tensor]] = {}
    for gate in gates:
        if gate.score_clamp > 0 and gate.score.requires_grad:
            scores.setdefault(gate.score_clamp, []).append(gate.score)
    for clamp, group in scores.items():
        torch._foreach_clamp_min_(group, -clamp)  # = clamp_(-c, c), bit for bit
        torch._foreach_clamp_max_(group, clamp)


class Gate(nn.Module):
    """One learnable score per unit: a `round_to` slice of a channel group (`unit_sizes`: units of `sizes`
    channels each) or a residual block (one unit of size 1). The forward value is per channel: each unit's
    0/1 value repeated over its channels. Scores are clamped to [-score_clamp, score_clamp] before each use
    (0: no clamp), so sigmoid' never vanishes and a gate the cost pushes can still turn."""

    def __init__(self, sizes: list[int], init_score: float = 2.0, dynamic_in: int | None = None,
                 min_open: int = 0, score_clamp: float = 0.0):
        super().__init__()
        self.sizes, self.min_open, self.score_clamp = list(sizes), min_open, score_clamp
        # a single unit that must stay open decides nothing: a constant, no score to train
        self.fixed = len(self.sizes) <= min_open
        self.score = nn.Parameter(torch.full((len(self.sizes),), float(init_score)), requires_grad=not self.fixed)
        # Zero-initialised so a dynamic gate starts as its static score.
        self.head = nn.Linear(dynamic_in, len(self.sizes)) if dynamic_in and not self.fixed else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.register_buffer("frozen", torch.zeros(()), persistent=True)
        self.register_buffer("frozen_mask", torch.ones(sum(self.sizes)), persistent=True)  # per channel
        self.register_buffer("unit_of_channel", torch.repeat_interleave(
            torch.arange(len(self.sizes)), torch.tensor(self.sizes)), persistent=False)
        self.register_buffer("unit_width", torch.tensor(self.sizes, dtype=torch.float32), persistent=False)
        # Set by forward, read by the losses of the same step (values carry STE gradients), per unit.
        self.last_values: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None
        self.pulled: torch.Tensor | None = None   # 0/1 per unit: the units the target term moved this step
        # Per channel, this forward's values when `StaticGates` evaluated them with the network's other gates.
        self.channel_values: torch.Tensor | None = None

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen.item())

    @property
    def learns(self) -> bool:
        """Whether the score decides anything now (not a fixed unit, not frozen)."""
        return not self.fixed and not self.is_frozen

    def logits(self, layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """(units,) for a static gate, (batch, units) for a dynamic one."""
        clamp_scores([self])
        if self.head is None or layer_input is None:
            return self.score
        return self.score + self.head(layer_input.mean(dim=(2, 3)))

    def forward(self, layer_input: torch.Tensor | None = None) -> torch.Tensor:
        if self.channel_values is not None:
            return self.channel_values
        if self.is_frozen or self.fixed:
            self.last_values, self.last_probs = None, None
            return self.frozen_mask
        values, probs = straight_through(self.logits(layer_input), self.min_open)
        self.last_values, self.last_probs, self.pulled = values, probs, None
        return values.index_select(-1, self.unit_of_channel)

    def kept_width(self, expected: bool = False) -> torch.Tensor | float:
        """Channels the last forward pass kept (averaged over inputs for dynamic gates), or with `expected`
        the channels its probabilities expect; carries the gradient while the gate learns."""
        if self.last_values is None:
            return float(self.frozen_mask.sum())
        values = self.last_probs if expected else self.last_values
        width = (values * self.unit_width).sum(dim=-1)
        return width.mean() if width.dim() else width

    def held_probs(self) -> torch.Tensor:
        """`last_probs` whose gradient skips the units the target term moved this step (`pulled`): a loss
        that holds gates where they are (the polarizer) leaves those to it."""
        return hold_unpulled(self.last_probs, self.pulled)

    def freeze(self, mask: torch.Tensor) -> None:
        """Fix the gate to a 0/1 mask per channel; the score stops receiving gradients."""
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


class StaticGates:
    """The learning gates of a network that have no dynamic head, evaluated together once per forward pass:
    one clamp, threshold, sigmoid and straight-through over all their scores concatenated and one expansion
    to channels; each gate gets views of the result (`last_values`, `last_probs`, `channel_values`), a gate
    called at several points computes nothing more. Values and gradients are each gate's own evaluation
    (tests/test_gates.py); per gate, those small ops and their backward were most of what the gates cost a
    training step. The whole vectors serve the gate losses (`kept_widths`, `training.gating.GatedNetwork`)."""

    def __init__(self, gates: list[Gate]):
        self.gates = gates
        self.units = [len(gate.sizes) for gate in gates]
        self.starts = [0, *itertools.accumulate(self.units)][:-1]
        self.channels = [len(gate.unit_of_channel) for gate in gates]
        self.unit_of_channel = torch.cat([g.unit_of_channel + start for g, start in zip(gates, self.starts)])
        self.unit_width = torch.cat([gate.unit_width for gate in gates])
        self.gate_of_unit = torch.repeat_interleave(torch.arange(len(gates)), torch.tensor(self.units)).to(
            self.unit_width.device)
        self.min_open = self.unit_width.new_tensor([gate.min_open for gate in gates])
        self.values: torch.Tensor | None = None   # per unit of every gate, of the last evaluation
        self.probs: torch.Tensor | None = None
        self.pulled: torch.Tensor | None = None   # per unit: what the target term moved (`Gate.pulled`)

    def fits(self, gates: list[Gate]) -> bool:
        """Whether these are the gates (same ones, same order) and their buffers are where these are."""
        return gates == self.gates and gates[0].unit_width.device == self.unit_width.device \
            and gates[0].unit_width.dtype == self.unit_width.dtype

    def evaluate(self) -> None:
        """Every gate's values for the coming forward pass, as `Gate.forward` computes them one by one."""
        clamp_scores(self.gates)
        logits = torch.cat([gate.score for gate in self.gates])
        hard = hard_values(logits)
        opened = hard.new_zeros(len(self.gates)).index_add_(0, self.gate_of_unit, hard)
        for index in (opened < self.min_open).nonzero().flatten().tolist():  # rare: too few units open
            start, gate = self.starts[index], self.gates[index]
            hard[start:start + self.units[index]] = hard_values(logits[start:start + self.units[index]],
                                                                gate.min_open)
        values, probs = with_sigmoid_gradient(hard, logits)
        per_channel = values.index_select(0, self.unit_of_channel).split(self.channels)
        for gate, gate_values, gate_probs, channel_values in zip(
                self.gates, values.split(self.units), probs.split(self.units), per_channel):
            gate.last_values, gate.last_probs, gate.pulled = gate_values, gate_probs, None
            gate.channel_values = channel_values
        self.values, self.probs, self.pulled = values, probs, None

    def release(self) -> None:
        """After the forward pass: the gates evaluate themselves again if called outside of one."""
        for gate in self.gates:
            gate.channel_values = None

    def pull(self, pulled: torch.Tensor) -> None:
        """The units the target term moved this step (0/1 per unit of every gate), also per gate."""
        self.pulled = pulled
        for gate, gate_pulled in zip(self.gates, pulled.split(self.units)):
            gate.pulled = gate_pulled

    def kept_widths(self, expected: bool = False) -> list[torch.Tensor]:
        """`Gate.kept_width` of every gate, from one sum over units."""
        values = self.probs if expected else self.values
        widths = values.new_zeros(len(self.gates)).index_add(0, self.gate_of_unit, values * self.unit_width)
        return list(widths.unbind())


def polarization(probs: torch.Tensor, t: float, center: str = "threshold") -> torch.Tensor:
    """Polarizer of Zhuang et al. (NeurIPS 2020), t * mean(p) - mean|p - c|, on gate probabilities.

    Zhuang et al. centre on c = mean(p). Our gates are hard, decided at p = 0.5, so the default centres
    there: every gate is pushed away from its own decision boundary. With the mean as centre, closed
    gates whose p lies between the mean and 0.5 are pushed towards opening, and against a FLOPs target
    about half the gates hovered at the boundary in our toy runs (tests/test_gates.py; README).
    """
    return polarizations([probs.reshape(-1)], t, center)[0]


def polarizations(probs: list[torch.Tensor], t: float, center: str = "threshold") -> torch.Tensor:
    """`polarization` of each vector in `probs`, in one vector, from sums over them concatenated (a few
    ops, not a few per gate); the gradients are those of each vector's own."""
    flat = torch.cat(probs)
    sizes = [len(p) for p in probs]
    group = torch.repeat_interleave(torch.arange(len(probs), device=flat.device),
                                    torch.tensor(sizes, device=flat.device))
    count = flat.new_tensor(sizes)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return flat.new_zeros(len(probs)).index_add(0, group, x) / count
    average = mean(flat)
    c = average.index_select(0, group) if center == "mean" else 0.5
    return t * average - mean((flat - c).abs())


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
    total = polarizations(per_input, t, center).mean() if per_input else None
    if block_probs:
        blocks = polarization(torch.cat([p.mean(dim=0) if p.dim() > 1 else p for p in block_probs]), t, center)
        total = blocks if total is None else total + blocks
    if total is None:
        raise ValueError("the network has no gates to polarize")
    return total


class TargetConstraint:
    """The kept-cost target as a constraint (CoFi, Xia et al. 2022): lambda1 * gap + lambda2 * gap^2 with
    gap = kept ratio - target, the multipliers raised by gradient ascent after every step (lambda1 += lr *
    gap, lambda2 += lr * gap^2). The pull grows for as long as the target is missed and turns round when
    the gates overshoot, so the gates reach the target themselves, with no weight tuned per network.

    Two phases. While the target still ramps down (`ramping`), "kept <= target" is an inequality
    (`one_sided_ramp`): lambda1 stays >= 0, so gates running ahead of the schedule are not pushed back open.
    Once the target is final it is an equality, and with `restart` lambda1 never pushes the ratio away from
    it: when the ratio lies outside the band (`tolerance`) on the other side of the target than lambda1
    pushes, lambda1 starts again from 0. Without the restart, the lambda1 built up while the ratio lagged the
    ramp kept closing gates for hundreds of steps after the ratio had fallen below the band. Within the band
    lambda1 is kept: it is the force that holds the gates it moved against the task loss (`gate_loss`), and a
    restart there let the task loss reopen a block the moment the ramp ended (docs/method.md)."""

    def __init__(self, lr: float, one_sided_ramp: bool = True, restart: bool = True):
        self.lr, self.one_sided_ramp, self.restart = lr, one_sided_ramp, restart
        self.lambda1 = self.lambda2 = 0.0

    def __call__(self, ratio: torch.Tensor, target: float, ramping: bool = False,
                 tolerance: float = 0.0) -> torch.Tensor:
        """The term for this step; the multipliers are raised after it is formed."""
        gap = ratio - target
        loss = self.lambda1 * gap + self.lambda2 * gap ** 2
        miss = float(gap.detach())  # equal on every rank: the gates are synchronised
        if self.restart and not ramping and miss * self.lambda1 < 0 and abs(miss) > tolerance:
            self.lambda1 = 0.0
        self.lambda1 += self.lr * miss
        if ramping and self.one_sided_ramp:
            self.lambda1 = max(0.0, self.lambda1)
        self.lambda2 += self.lr * miss * miss
        return loss

    def state_dict(self) -> dict[str, float]:
        return {"lambda1": self.lambda1, "lambda2": self.lambda2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lambda1, self.lambda2 = float(state.get("lambda1", 0.0)), float(state.get("lambda2", 0.0))


def gate_loss(model, cost, target: float, tolerance: float, target_term: TargetConstraint | float,
              polarization_weight: float, t: float, center: str = "threshold", ramping: bool = False,
              moves: str = "band", ratio: str = "hard", release_pulled: bool = True) -> tuple[torch.Tensor, float]:
    """The polarized method's gate loss for the last forward pass of `model` (a `GatedNetwork`), and its kept
    ratio of `cost` (hard gates): the target term plus the polarizer. One definition for the training method
    and the Python API.

    - The target term: a `TargetConstraint` (`ramping`: the target still falls), or, given a number w, the
      fixed w * (ratio - target)^2. It sees the hard ratio (`ratio: expected`: of the gate probabilities);
      with `moves: band` its gradient reaches only the gates whose flip lands nearer the band
      (`GatedNetwork.band_ratio`), and, within the band once the target is final, the gates held in the
      state lambda1 pushes towards; else every gate.
    - The polarizer holds gates where they are. With `release_pulled`, once the target is final and the
      ratio lies outside the band, it leaves out the gates the target term moves: some gate has to flip
      there, and the polarizer held exactly those against it (docs/method.md)."""
    lagrangian = isinstance(target_term, TargetConstraint)
    hold = 0.0 if ramping or not lagrangian else target_term.lambda1
    hard = model.band_ratio(cost, target, tolerance, final=not ramping, hold=hold) if moves == "band" \
        else model.kept_ratio(cost)
    seen = model.kept_ratio(cost, expected=True) if ratio == "expected" else hard
    loss = target_term(seen, target, ramping, tolerance) if lagrangian else target_term * (seen - target) ** 2
    kept = float(hard.detach())
    if polarization_weight == 0:
        return loss, kept
    release = release_pulled and not ramping and abs(kept - target) > tolerance
    channel_probs, block_probs = model.gate_probs(held=release)
    if channel_probs or block_probs:
        loss = loss + polarization_weight * polarizer(channel_probs, block_probs, t, center)
    return loss, kept


def kept_target(progress: float, final: float, warmup_fraction: float, ramp_fraction: float) -> float:
    """The kept-FLOPs target at `progress` (share of all steps): 1 until warm-up ends, then linearly down
    to `final` at `ramp_fraction`. Closing everything at once overshoots, and the polarizer then locks
    gates shut."""
    span = max(ramp_fraction - warmup_fraction, 1e-9)
    done = min(1.0, max(0.0, (progress - warmup_fraction) / span))
    return 1.0 - (1.0 - final) * done
