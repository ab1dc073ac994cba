"""How the trace reads each kind of module call (`MODULE_HANDLERS` in training/graph.py), one module at a time.

Each network puts the module under test, `layer`, between a conv producing 8 channels (`conv`) and a layer
reading its output (`reader`), and the test checks what the trace made of it: the layer it recorded, the
group it joined, or the reason the channels are pinned.
"""
from __future__ import annotations

import pytest
import torch
import torch.ao.nn.qat as qat
import torch.nn.functional as F
from torch import nn

import polarprune
from polarprune.training.custom_layers import unregister_layer
from polarprune.training.graph import NetworkGraph, trace_network


def direct(layer, x):
    return layer(x)


class Probe(nn.Module):
    """conv (3 -> 8 channels) -> relu -> `around(layer, x)` -> `reader` (a 1x1 conv to 4 channels by default)."""

    def __init__(self, layer: nn.Module, around=direct, reader: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.layer, self.around = layer, around
        self.reader = reader if reader is not None else nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.reader(self.around(self.layer, F.relu(self.conv(x))))


def trace(layer: nn.Module, around=direct, reader: nn.Module | None = None) -> NetworkGraph:
    return trace_network(Probe(layer, around, reader).eval(), torch.randn(2, 3, 8, 8))


def channels_last(layer, x):
    return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def channels_on_axis_2(layer, x):
    return layer(x.transpose(1, 2)).transpose(1, 2)  # H = W = C = 8: every shape fits, only the axis moves


# -- nn.Conv2d ----------------------------------------------------------------------------------------------
def test_conv_reads_its_input_group_and_starts_its_own():
    graph = trace(nn.Conv2d(8, 8, 3, padding=1))
    assert graph.layers["layer"].kind == "conv"
    assert graph.groups["conv"].consumers == ["layer"] and graph.groups["conv"].prunable
    assert graph.groups["layer"].producers == ["layer"] and graph.groups["layer"].prunable


@pytest.mark.parametrize("groups, kind", [(8, "depthwise"), (2, "grouped")])
def test_convs_grouped_as_wide_as_their_input_keep_its_group(groups, kind):
    graph = trace(nn.Conv2d(8, 8, 3, padding=1, groups=groups))
    group = graph.groups["conv"]
    assert graph.layers["layer"].kind == kind and "layer" in group.members
    assert group.unit == 8 // groups and group.prunable


def test_grouped_conv_that_changes_the_width_is_pinned_with_the_reason():
    graph = trace(nn.Conv2d(8, 16, 3, padding=1, groups=2), reader=nn.Conv2d(16, 4, 1))
    assert graph.groups["conv"].pinned == [
        "grouped convolution layer (groups=2) maps 8 channels to 16: no cut keeps its groups whole"]
    assert graph.layers["layer"].kind == "fixed"  # its MACs are still counted


def test_conv_on_a_channels_last_tensor_is_pinned():
    graph = trace(nn.Conv2d(8, 8, 1), around=channels_last)
    assert graph.groups["conv"].pinned == ["module layer (Conv2d) is not a layer the cuts understand"]


def test_a_subclass_of_conv2d_is_read_by_the_conv2d_handler():
    """torch.fx keeps torch's own modules whole (a subclass defined elsewhere is traced through), so the
    subclass here is torch's quantization-aware Conv2d; the MRO lookup finds nn.Conv2d's handler for it."""
    qconfig = torch.ao.quantization.get_default_qat_qconfig()
    graph = trace(qat.Conv2d(8, 8, 3, padding=1, qconfig=qconfig))
    assert graph.layers["layer"].kind == "conv"
    assert graph.groups["conv"].prunable


# -- nn.Linear ----------------------------------------------------------------------------------------------
def test_linear_on_channels_last_is_a_1x1_conv_over_every_position():
    graph = trace(nn.Linear(8, 8), around=channels_last)
    layer = graph.layers["layer"]
    assert layer.kind == "linear" and layer.unit_macs == 8 * 8  # one per position of an 8x8 map
    assert graph.groups["conv"].consumers == ["layer"] and graph.groups["conv"].prunable
    assert graph.groups["layer"].consumers == ["reader"] and graph.groups["layer"].prunable


def test_linear_reading_another_axis_than_the_channels_is_pinned_with_the_axis():
    graph = trace(nn.Linear(8, 8), around=channels_on_axis_2)
    assert graph.groups["conv"].pinned == ["linear layer reads axis -1 of a tensor whose channel axis is 2"]


# -- BatchNorm ----------------------------------------------------------------------------------------------
def test_batch_norm_is_a_member_of_its_input_group():
    graph = trace(nn.BatchNorm2d(8))
    assert graph.layers["layer"].kind == "norm"
    assert graph.groups["conv"].members == ["layer"] and graph.groups["conv"].prunable


def test_batch_norm_on_another_axis_than_the_channels_is_pinned():
    graph = trace(nn.BatchNorm2d(8), around=channels_on_axis_2)
    assert graph.groups["conv"].pinned == ["module layer (BatchNorm2d) is not a layer the cuts understand"]


# -- nn.Flatten ---------------------------------------------------------------------------------------------
def pooled(layer, x):
    return layer(F.adaptive_avg_pool2d(x, 1))


def test_flatten_of_pooled_channels_keeps_them():
    graph = trace(nn.Flatten(), around=pooled, reader=nn.Linear(8, 4))
    assert graph.groups["conv"].consumers == ["reader"] and graph.groups["conv"].prunable


def test_flatten_of_a_spatial_map_is_pinned_with_the_reason():
    graph = trace(nn.Flatten(), reader=nn.Linear(8 * 8 * 8, 4))
    assert any("flattens a [8, 8, 8] map" in why for why in graph.groups["conv"].pinned), graph.groups["conv"].pinned


# -- channel-wise modules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [nn.ReLU(), nn.GELU(), nn.Hardswish(), nn.Identity(), nn.MaxPool2d(3, 1, 1),
                                   nn.Upsample(scale_factor=2), nn.Dropout(0.5), nn.Dropout2d(0.5)],
                         ids=lambda layer: type(layer).__name__)
def test_zero_keeping_modules_leave_the_group_prunable(layer):
    group = trace(layer).groups["conv"]
    assert group.consumers == ["reader"] and not group.pinned


@pytest.mark.parametrize("layer", [nn.Sigmoid(), nn.Hardsigmoid()], ids=lambda layer: type(layer).__name__)
def test_zero_reviving_modules_pin_the_group_at_its_reader(layer):
    assert trace(layer).groups["conv"].pinned == [
        "closed channels would reach reader non-zero (through layer (layer)), so cutting them would change its output"]


# -- precedence: registered layers, attention heads ---------------------------------------------------------
class RegisteredConv(nn.Conv2d):
    """A conv the user registered: its rule, not nn.Conv2d's handler, reads it."""


@pytest.fixture
def registered_conv():
    polarprune.register_layer(RegisteredConv, maps="mixing", cut=lambda module, keep_in, keep_out: module)
    yield
    unregister_layer(RegisteredConv)


def test_a_registered_rule_comes_before_the_handler_of_its_base_class(registered_conv):
    graph = trace(RegisteredConv(8, 8, 1))
    assert graph.layers["layer"].kind == "custom"


class ModuleAttention(nn.Module):
    """timm-style attention whose softmax and dropout are modules."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.softmax, self.drop = nn.Softmax(-1), nn.Dropout(0.1)

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = self.drop(self.softmax(q @ k.transpose(-2, -1)))
        return self.proj((scores @ v).transpose(1, 2).reshape(b, n, c)).mean(1)


def test_modules_on_attention_heads_are_read_as_head_ops():
    graph = trace_network(ModuleAttention().eval(), torch.randn(2, 32, 4, 4))
    group = graph.groups["qkv"]
    assert group.prunable and group.head_dim == 8, group.pinned


# -- the fallback -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, why, macs", [
    (nn.PReLU(8), "module layer (PReLU) is not a layer the cuts understand", 0),
    (nn.ConvTranspose2d(8, 8, 1), "module layer (ConvTranspose2d) is not a layer the cuts understand", 8 * 8 * 8 * 8),
    (nn.GroupNorm(2, 8), "GroupNorm layer normalises across channels: cutting some changes what it computes "
                         "for the rest", 0),
], ids=["PReLU", "ConvTranspose2d", "GroupNorm"])
def test_a_module_no_handler_takes_is_pinned_with_the_reason(layer, why, macs):
    graph = trace(layer)
    assert graph.groups["conv"].pinned == [why]
    assert sum(l.unit_macs for l in graph.layers.values() if l.kind == "fixed") == macs  # counted at full widths
