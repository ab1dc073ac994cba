"""Network families users bring, defined here: grouped convolutions (ResNeXt, RegNet), channels-last MLPs
with LayerNorm (ConvNeXt), split channels (ShuffleNetV2). Each through the API: gates, a short training,
prune; the pruned network equals the gated one, onnxruntime runs its ONNX, and the cost model's dense and
kept MACs equal the ONNX graph's count (an independent count: Conv, Gemm and MatMul nodes).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from polarprune.export.onnx_export import count_onnx_macs, export_onnx, run_onnxruntime
from polarprune.training.api import polarize
from polarprune.training.gating import mask_macs

from user_networks import ConvNeXt, RegNet, ResNeXt, ShuffleNetV2

FAMILIES = {"resnext": ResNeXt, "regnet": RegNet, "convnext": ConvNeXt, "shufflenet_v2": ShuffleNetV2}
SHAPE = (3, 32, 32)


def train_briefly(gated, steps: int = 3) -> None:
    """A few SGD steps on random data with the task loss plus the gate penalty past warm-up."""
    optimizer = torch.optim.SGD(gated.parameters(), lr=0.01, momentum=0.9)
    gated.train()
    for step in range(steps):
        images, labels = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(gated(images), labels) + gated.penalty(0.3 + 0.1 * step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def close_some_gates(gated, seed: int = 1) -> None:
    """A random share of every channel gate closed, and the first block: the cut has work to do everywhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gated.channel_gates.values():
            gate.score.copy_(torch.randn(gate.score.shape, generator=generator) + 0.3)
        for index, gate in enumerate(gated.block_gates.values()):
            gate.score.fill_(-3.0 if index == 0 else 3.0)


def conv_groups(graph) -> list:
    """Channel groups the network's layers produce (the input's channels are not the network's)."""
    return [group for group in graph.groups.values() if group.producers]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gates_train_prune_export(name, tmp_path):
    torch.manual_seed(0)
    network = FAMILIES[name]()
    gated = polarize(network, torch.randn(2, *SHAPE), target_flops=0.5, round_to=4)
    train_briefly(gated)
    close_some_gates(gated)
    mask = gated.mask()
    pruned = gated.prune(mask)  # checks pruned == gated itself; again here on other inputs
    gated.eval()
    check = torch.randn(6, *SHAPE)
    with torch.no_grad():
        expected, got = gated(check), pruned(check)
    assert (expected - got).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))

    dense_onnx, pruned_onnx = tmp_path / "dense.onnx", tmp_path / "pruned.onnx"
    export_onnx(gated.plain().eval(), dense_onnx, SHAPE)
    export_onnx(pruned, pruned_onnx, SHAPE)
    from_ort = torch.from_numpy(run_onnxruntime(pruned_onnx, check.numpy()))
    assert (from_ort - got).abs().max() <= 1e-4 * max(1.0, float(got.abs().max()))
    kept = mask_macs(gated.graph, mask)
    assert kept < gated.dense_macs
    assert count_onnx_macs(dense_onnx) == pytest.approx(gated.dense_macs, rel=0.01)
    assert count_onnx_macs(pruned_onnx) == pytest.approx(kept, rel=0.01)


@pytest.mark.parametrize("name", ["resnext", "regnet"])
def test_grouped_conv_blocks_are_prunable(name):
    """A grouped conv with as many outputs as inputs keeps whole groups: its channels are one group with
    its 1x1 producer, prunable in runs of the conv's group width."""
    graph = polarize(FAMILIES[name](), torch.randn(2, *SHAPE), round_to=4).graph
    groups = conv_groups(graph)
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) >= 0.8 * len(groups), [(g.name, g.pinned) for g in groups if not g.prunable]
    grouped = [g for g in prunable if g.unit > 1]
    assert grouped and all(any(graph.layers[m].kind == "grouped" for m in g.members) for g in grouped)


def test_grouped_conv_keeps_whole_groups():
    """Gates decide whole, aligned conv groups (units of lcm(round_to, group width)): a mask keeps them whole."""
    gated = polarize(ResNeXt(), torch.randn(2, *SHAPE), round_to=4)
    close_some_gates(gated, seed=3)
    with torch.no_grad():
        gate = gated.channel_gate("layer1.1.conv1")
        gate.score.copy_(torch.where(torch.arange(gate.score.numel()) % 2 == 0, -3.0, 3.0))
    mask = gated.mask()
    for name, kept in mask.kept_channels.items():
        unit = gated.graph.groups[name].unit
        assert len(kept) % unit == 0 and all(kept[i] // unit == kept[i - i % unit] // unit for i in range(len(kept)))
    conv = gated.prune(mask).get_submodule("layer1.1.conv2")
    kept = len(mask.kept_channels["layer1.1.conv1"])
    assert kept < 16 and conv.groups == kept // 4 and conv.in_channels == conv.out_channels == kept


def test_convnext_mlp_hidden_widths_prune_and_layer_norm_pins_the_stream():
    graph = polarize(ConvNeXt(), torch.randn(2, *SHAPE), round_to=4).graph
    hidden = [graph.output_group(f"{block}.block.3") for block in ("features.1", "features.2", "features.4")]
    assert all(group.prunable for group in hidden) and [g.width for g in hidden] == [64, 64, 128]
    stream = graph.output_group("features.0.0")
    assert not stream.prunable and any("normalises across channels" in why for why in stream.pinned)
    assert len(graph.blocks) == 3  # a ConvNeXt block can still go whole
    assert graph.layers["features.1.block.3"].kind == "linear"  # a Linear over (N, H, W, C) is a channel layer


def test_shufflenet_split_pins_with_a_reason_and_branches_still_prune():
    graph = polarize(ShuffleNetV2(), torch.randn(2, *SHAPE), round_to=4).graph
    assert any(any("splits the channel axis" in why for why in g.pinned) for g in graph.groups.values())
    assert graph.groups["stage2.1.branch2.0"].prunable  # the branch's inner width


class TokenAttention(nn.Module):
    """A conv stem, then tokens (N, HW, C), one attention layer (Linear q/k/v, two matrix products), a
    grouped conv that widens, a 1-D conv: MACs no gate touches, all counted."""

    def __init__(self, dim=16, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.widen = nn.Conv2d(dim, 2 * dim, 3, padding=1, groups=4)
        self.qkv = nn.Linear(2 * dim, 6 * dim)
        self.proj = nn.Linear(2 * dim, 2 * dim)
        self.mix = nn.Conv1d(2 * dim, 2 * dim, 3, padding=1)
        self.fc = nn.Linear(2 * dim, num_classes)

    def forward(self, x):
        x = self.widen(torch.relu(self.stem(x)))
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        tokens = tokens + self.proj(torch.bmm(attention, v))
        mixed = self.mix(tokens.transpose(1, 2))
        return self.fc(mixed.mean(2))


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x)
        x = torch.einsum("nchw,nchw->nc", x, x)
        return self.fc(x)


def test_attention_and_fixed_layers_count_every_mac(tmp_path):
    network = TokenAttention().eval()
    gated = polarize(network, torch.randn(2, *SHAPE))
    export_onnx(network, tmp_path / "dense.onnx", SHAPE)
    assert count_onnx_macs(tmp_path / "dense.onnx") == pytest.approx(gated.dense_macs, rel=0.01)
    fixed = {path for path, layer in gated.graph.layers.items() if layer.kind == "fixed"}
    assert {"widen", "mix", "matmul", "bmm"} <= fixed


def test_a_layer_the_cost_cannot_count_is_named():
    with pytest.warns(UserWarning, match="einsum"):
        graph = polarize(Einsum(), torch.randn(2, *SHAPE)).graph
    assert graph.uncounted and "einsum" in graph.uncounted[0]


def drop_path(x, p: float, training: bool):
    """timm's drop_path, traced through (not wrapped): the branch on `training` is resolved at trace time."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep.div_(1 - p)


class NoisyBlocks(nn.Module):
    """Residual blocks with every kind of train-time noise: Dropout2d, functional dropout, timm's drop
    path and torchvision's stochastic depth (a wrapped function)."""

    def __init__(self):
        super().__init__()
        from user_networks import StochasticDepth
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.drop = nn.Dropout2d(0.2)
        self.conv2 = nn.Conv2d(32, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv4 = nn.Conv2d(32, 16, 3, padding=1)
        self.depth = StochasticDepth(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + drop_path(self.conv2(self.drop(torch.relu(self.conv1(x)))), 0.2, self.training)
        hidden = torch.nn.functional.dropout(torch.relu(self.conv3(x)), 0.1, self.training)
        x = x + self.depth(self.conv4(hidden))
        return self.fc(x.mean((2, 3)))


def test_identity_in_eval_ops_do_not_pin():
    torch.manual_seed(0)
    gated = polarize(NoisyBlocks(), torch.randn(2, *SHAPE), round_to=4)
    assert {"conv1", "conv3", "stem"} <= set(gated.graph.prunable()) and len(gated.graph.blocks) == 2
    close_some_gates(gated)
    gated.prune(gated.mask())  # checked against the gated network in eval: no noise left in it


class SharedConv(nn.Module):
    """One conv applied twice (weight sharing): both calls cost MACs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.shared(torch.relu(self.shared(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def test_a_module_called_twice_costs_twice(tmp_path):
    network = SharedConv().eval()
    gated = polarize(network, torch.randn(2, *SHAPE))
    export_onnx(network, tmp_path / "dense.onnx", SHAPE)
    assert count_onnx_macs(tmp_path / "dense.onnx") == gated.dense_macs
    assert "shared#2" in gated.graph.layers and not gated.graph.prunable()
