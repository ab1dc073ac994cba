"""Elementwise ops where closed channels come back to life: the trace pins the group, never a wrong cut.

A 1-channel map broadcast over a group and added to it revives the closed channels, and so does a constant;
a product keeps them closed only when an operand as wide as the group is closed there. Each network closes
half of every gate and prunes: `prune` checks the cut network against the gated one.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.api import polarize

COMBINE = {
    "add_broadcast": lambda y, t, z: y + t,
    "sub_broadcast": lambda y, t, z: y - t,
    "rsub_broadcast": lambda y, t, z: t - y,
    "mul_after_constant": lambda y, t, z: (z + 1) * torch.sigmoid(t),
    "where": lambda y, t, z: torch.where(t > 0, y, t),
    "addcmul_broadcast_input": lambda y, t, z: torch.addcmul(t, y, y),
    "addcmul_into_group": lambda y, t, z: torch.addcmul(y, t, t),
    "div_by_broadcast": lambda y, t, z: (z + 1) / (1 + torch.sigmoid(t)),
}
REVIVING = {"add_broadcast", "sub_broadcast", "rsub_broadcast", "mul_after_constant", "div_by_broadcast"}
SAFE = {  # closed channels stay zero: the group stays prunable
    "mul_broadcast": lambda y, t, z: y * torch.sigmoid(t),
    "div_broadcast": lambda y, t, z: y / (1 + torch.sigmoid(t)),
    "add_same_group": lambda y, t, z: y + z,
}


class Combined(nn.Module):
    """conv -> bn (-> relu) combined with t(x), a 1-channel map of the input, then read by another conv."""

    def __init__(self, combine):
        super().__init__()
        self.combine = combine
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.t = nn.Conv2d(3, 1, 1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        z = self.bn(self.conv(x))
        y = self.combine(F.relu(z), self.t(x), z)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.head(y)), 1), 1))


def prune_half(network: nn.Module):
    torch.manual_seed(0)
    with torch.no_grad():
        for module in network.modules():  # non-trivial batch-norm shifts: a closed channel's bias matters
            if isinstance(module, nn.BatchNorm2d):
                module.bias.uniform_(-1, 1)
    gated = polarize(network, torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        for gate in gated.channel_gates.values():
            gate.score.copy_(torch.where(torch.arange(gate.score.numel()) % 2 == 0, 3.0, -3.0))
    gated.prune(gated.mask(round_to=1), check_input=torch.randn(4, 3, 16, 16))  # raises if the cut is wrong
    return gated.graph


@pytest.mark.parametrize("name", COMBINE)
def test_reviving_ops_pin_the_group(name):
    graph = prune_half(Combined(COMBINE[name]))
    group = graph.output_group("conv")
    assert not group.prunable, f"{name}: the group of conv was left prunable"
    if name in REVIVING:
        assert any("non-zero" in why for why in group.pinned), group.pinned


@pytest.mark.parametrize("name", SAFE)
def test_zero_keeping_ops_leave_the_group_prunable(name):
    graph = prune_half(Combined(SAFE[name]))
    assert graph.output_group("conv").prunable
