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

from polarprune.training.api import polarize

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
    gated = polarize(network, torch.randn(2, 3, 16, 16), round_to=1)
    with torch.no_grad():
        for gate in gated.channel_gates.values():
            gate.score.copy_(torch.where(torch.arange(gate.score.numel()) % 2 == 0, 3.0, -3.0))
    gated.prune(gated.mask(), check_input=torch.randn(4, 3, 16, 16))  # raises if the cut is wrong
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


class Split(nn.Module):
    """conv -> bn -> relu, split into two pieces (`take`), the second through a conv, concatenated back."""

    def __init__(self, take, dim):
        super().__init__()
        self.take, self.dim = take, dim
        self.conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.branch = nn.Conv2d(16 if dim != 1 else 8, 16 if dim != 1 else 8, 1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        first, second = self.take(F.relu(self.bn(self.conv(x))))
        x = torch.cat((first, self.branch(second)), self.dim)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.head(x)), 1), 1))


SPLITS = {  # (how to take the pieces, the axis): the channel axis pins with the reason; others keep channels
    "chunk": (lambda x: x.chunk(2, dim=1), 1),
    "split": (lambda x: torch.split(x, 8, dim=1), 1),
    "split_sizes": (lambda x: x.split([8, 8], 1), 1),
    "narrow": (lambda x: (x.narrow(1, 0, 8), x.narrow(1, 8, 8)), 1),
    "slice": (lambda x: (x[:, :8], x[:, 8:]), 1),
    "chunk_rows": (lambda x: x.chunk(2, dim=2), 2),
    "narrow_rows": (lambda x: (x.narrow(2, 0, 8), x.narrow(2, 8, 8)), 2),
}


@pytest.mark.parametrize("name", SPLITS)
def test_channel_splits_pin_with_a_reason_and_other_splits_keep_channels(name):
    take, dim = SPLITS[name]
    graph = prune_half(Split(take, dim))  # never a crash, never a wrong cut
    group = graph.output_group("conv")
    if dim == 1:
        assert not group.prunable and any("channel axis" in why for why in group.pinned), group.pinned
    else:
        assert group.prunable
