"""A layer of the user's own, registered with `polarprune.register_layer`, is cut like a built-in one."""
import pytest
import torch
from torch import nn

import polarprune
from polarprune.training.custom_layers import LayerRuleError, unregister_layer
from polarprune.training.flops import count_macs
from polarprune.training.graph import trace_network
from polarprune.training.mask import Mask


class Pointwise(nn.Module):
    """A 1x1 conv written by hand (einsum): the trace cannot see through it to a conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin ** 0.5)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return torch.einsum("oi,nihw->nohw", self.weight, x) + self.bias[:, None, None]


class Scale(nn.Module):
    """A learned per-channel scale and shift: revives closed channels, so a gate must follow it."""

    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(width) + 0.5)
        self.shift = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x):
        return x * self.gain[:, None, None] + self.shift[:, None, None]


def cut_pointwise(module, keep_in, keep_out):
    weight, bias = module.weight.detach(), module.bias.detach()
    if keep_out is not None:
        weight, bias = weight[keep_out], bias[keep_out]
    if keep_in is not None:
        weight = weight[:, keep_in]
    smaller = Pointwise(weight.shape[1], weight.shape[0])
    smaller.weight.data.copy_(weight)
    smaller.bias.data.copy_(bias)
    return smaller


def cut_scale(module, keep, _keep_out):
    smaller = Scale(len(keep))
    smaller.gain.data.copy_(module.gain.detach()[keep])
    smaller.shift.data.copy_(module.shift.detach()[keep])
    return smaller


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.mix = Pointwise(32, 32)
        self.scale = Scale(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.scale(self.mix(x)))
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def registered():
    polarprune.register_layer(Pointwise, maps="mixing", cut=cut_pointwise)
    polarprune.register_layer(Scale, maps="per_channel", cut=cut_scale)
    yield
    unregister_layer(Pointwise)
    unregister_layer(Scale)


def test_unregistered_layers_pin_their_channels():
    graph = trace_network(Net().eval(), torch.randn(2, 1, 8, 8))
    assert not graph.prunable()  # einsum and the shift: nothing the trace can cut


def test_a_registered_layer_is_gated_trained_and_cut_through_the_api(registered):
    torch.manual_seed(0)
    net, images = Net(), torch.randn(8, 1, 8, 8)
    gated = polarprune.polarize(net, images, target_flops=0.5, round_to=8)
    assert set(gated.graph.prunable()) == {"conv", "mix"}  # both widths: the conv's and the custom layer's
    assert gated.graph.layers["mix"].kind == "custom"
    optimizer = torch.optim.SGD(gated.parameters(), lr=0.05)
    labels = torch.randint(0, 10, (8,))
    for step in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(gated(images), labels) + gated.penalty(progress=step / 30)
        loss.backward()
        optimizer.step()
    learned = gated.final_mask()
    assert abs(gated.flops_ratio(learned) - 0.5) <= 0.02
    # and a mask that cuts both sides of the registered layer, odd positions included
    mask = Mask({"conv": list(range(8, 24)), "mix": list(range(0, 32, 2))}, [])
    pruned = gated.prune(mask, check_input=images)  # raises unless pruned == gated within the tolerance
    gated.eval()
    assert torch.allclose(pruned(images), gated(images), atol=1e-4)
    mix = pruned.get_submodule("mix")
    assert isinstance(mix, Pointwise) and mix.weight.shape == (16, 16)
    assert pruned.get_submodule("scale").gain.shape == (16,)
    # the cost counts the registered layer at its kept widths (one MAC per channel pair and position)
    assert count_macs(pruned, (1, 8, 8)) == pytest.approx(gated.flops_ratio(mask) * gated.dense_macs)
    assert count_macs(pruned, (1, 8, 8)) < gated.dense_macs


def test_register_layer_names_what_is_wrong():
    with pytest.raises(LayerRuleError, match="not an nn.Module class"):
        polarprune.register_layer(int, maps="mixing", cut=cut_pointwise)
    with pytest.raises(LayerRuleError, match="'mixing'"):
        polarprune.register_layer(Pointwise, maps="conv", cut=cut_pointwise)
    with pytest.raises(LayerRuleError, match="unit_macs is for maps='mixing'"):
        polarprune.register_layer(Scale, maps="per_channel", cut=cut_scale, unit_macs=lambda *a: 1)
