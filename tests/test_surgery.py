"""Surgery: dependency groups, per-layer cuts, and pruned == gated (hard mask) for every architecture."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export import ExportError
from export.graph import GraphError, trace_dependencies
from export.surgery import (MaskMismatchError, SurgeryError, check_equivalence, cut_batchnorm, cut_conv_in,
                            cut_conv_out, cut_linear_in, load_pruned, prune, save_pruned)
from export_fixtures import single_torch_thread, trained_model  # noqa: F401 (autouse fixture)
from training.flops import count_macs
from training.gates import Gate, gate_multiplier
from training.mask import Mask
from training.arch import make_spec
from training.models import GateOptions, GatedBatchNorm2d, build_model

CASES = {
    # many closed blocks in a row, including the stride-2 option-A block; one 1-channel layer
    "resnet20": dict(model_name="resnet20", input_size=(28, 28), round_to=4,
                     closed_blocks=["layer1.1", "layer1.2", "layer2.0", "layer2.1"],
                     one_channel=["layer3.0"], round_to_width=["layer3.1"]),
    # the last stage closed from its downsampling block on
    "resnet32": dict(model_name="resnet32", input_size=(16, 16), round_to=8,
                     closed_blocks=["layer3.0", "layer3.1", "layer3.2", "layer3.3"],
                     one_channel=["layer1.0"], round_to_width=["layer2.4"]),
    # a closed block with a 1x1 conv shortcut (stride 2)
    "resnet18": dict(model_name="resnet18", input_size=(16, 16), round_to=16,
                     closed_blocks=["layer2.0", "layer4.1"], one_channel=["layer1.1"],
                     round_to_width=["layer3.0"]),
    "vgg16": dict(model_name="vgg16", input_size=(16, 16), round_to=8, one_channel=["features.3"],
                  round_to_width=["features.0", "features.12"]),
    # dynamic gates carry a linear head each: it must go with the gate
    "resnet20-dynamic": dict(model_name="resnet20", input_size=(16, 16), round_to=4, dynamic=True,
                             closed_blocks=["layer3.2"], one_channel=["layer2.1"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    options = dict(CASES[request.param])
    model, mask, document = trained_model(seed=3, **options)
    networks = prune(model, document, mask)
    images = torch.randn(16, 1, *options["input_size"], generator=torch.Generator().manual_seed(7))
    return request.param, model, mask, document, networks, images


def test_pruned_matches_spec_layout(case):
    _, _, _, document, networks, _ = case
    expected = build_model(document["pruned_spec"]).state_dict()
    got = networks.pruned.state_dict()
    assert list(got) == list(expected)
    assert all(got[k].shape == expected[k].shape for k in expected)
    assert not any(isinstance(m, Gate) for m in networks.pruned.modules())
    assert not any(isinstance(m, Gate) for m in networks.dense.modules())


def test_pruned_equals_gated(case):
    _, _, mask, _, networks, images = case
    with torch.no_grad():
        reference = networks.reference(images)
    assert reference.std(dim=0).mean() > 1e-3, "fixture too degenerate: logits do not depend on the input"
    diff = check_equivalence(networks.reference, networks.pruned, networks.graph, mask, images)
    assert diff <= 1e-4


def test_kept_widths_and_macs(case):
    name, model, mask, document, networks, _ = case
    assert count_macs(networks.pruned) == document["pruned_flops"]
    assert count_macs(networks.dense) == document["dense_flops"]
    chained = name.startswith("vgg")  # each VGG conv also reads the previous layer's kept channels
    previous = None
    for unit, kept in mask.kept_channels.items():
        path = f"{unit}.conv" if chained else f"{unit}.conv1"
        conv = networks.pruned.get_submodule(path)
        assert conv.out_channels == len(kept)
        expected = model.get_submodule(path).weight[kept]
        if chained and previous is not None:
            expected = expected[:, previous]
        assert torch.equal(conv.weight, expected)
        previous = kept
    for unit in mask.closed_blocks:
        block = networks.pruned.get_submodule(unit)
        assert block.closed and not hasattr(block, "conv1")
    widths = {unit: len(kept) for unit, kept in mask.kept_channels.items()}
    assert 1 in widths.values() and document["round_to"] in widths.values()


def test_dense_holds_trained_weights(case):
    _, model, _, _, networks, _ = case
    trained = model.state_dict()
    for key, tensor in networks.dense.state_dict().items():
        assert torch.equal(tensor, trained[key]), key


@pytest.fixture(scope="module")
def resnet20_run():
    """(model, mask, document, networks) of a small resnet20 run shared by the tests below."""
    model, mask, document = trained_model("resnet20", (16, 16), seed=1, closed_blocks=["layer1.0", "layer2.0"])
    return model, mask, document, prune(model, document, mask)


def test_divergence_names_the_first_bad_layer(resnet20_run):
    _, mask, _, networks = resnet20_run
    broken = copy.deepcopy(networks.pruned)
    with torch.no_grad():
        broken.get_submodule("layer2.2.bn1").bias.add_(1.0)
    images = torch.randn(16, 1, 16, 16)
    with pytest.raises(SurgeryError, match=r"first diverging layer: layer2\.2\.bn1"):
        check_equivalence(networks.reference, broken, networks.graph, mask, images)


def test_groups_follow_the_network():
    graph = trace_dependencies(build_model(make_spec("resnet18", 1, 10, (16, 16)), GateOptions()), (1, 16, 16))
    group = graph.prunable()["layer2.0"]
    assert (group.producers, group.norms, group.consumers) == (["layer2.0.conv1"], ["layer2.0.bn1"],
                                                               ["layer2.0.conv2"])
    stream = graph.output_group["layer2.0.shortcut.bn"]  # residual stream of stage 2: one pinned group
    assert stream.gate is None and "residual add" in stream.pinned
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.0.shortcut.conv"} <= set(stream.producers)
    assert graph.blocks()["layer2.0"].branch_modules == [
        "layer2.0.conv1", "layer2.0.bn1", "layer2.0.gate", "layer2.0.conv2", "layer2.0.block_gate", "layer2.0.bn2"]

    vgg = build_model(make_spec("vgg16", 1, 10, (16, 16)), GateOptions())
    last = trace_dependencies(vgg, (1, 16, 16)).prunable()["features.12"]
    assert last.consumers == ["fc"]  # through max-pool, global pool and flatten


class GateOnResidual(nn.Module):
    """A channel gate on a residual stream: cutting it would need every producer cut alike."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.gate = Gate(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a = F.relu(self.conv_a(x))
        out = (a + self.conv_b(a)) * gate_multiplier(self.gate(x), 4)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def test_gate_on_pinned_channels_is_refused():
    with pytest.raises(GraphError, match="gate gate sits on channels that cannot shrink.*residual add"):
        trace_dependencies(GateOnResidual(), (1, 8, 8))


class GateThroughNorm(nn.Module):
    """A channel gate that enters as a norm's gate argument instead of a product."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(1, 4, 3, padding=1), GatedBatchNorm2d(4)
        self.gate = Gate(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        out = F.relu(self.bn_a(self.conv_a(x), self.gate(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def test_gate_given_to_a_norm_gates_its_output_channels():
    group = trace_dependencies(GateThroughNorm(), (1, 8, 8)).prunable()[""]
    assert group.gate == "gate"
    assert (group.producers, group.norms, group.consumers) == (["conv_a"], ["bn_a"], ["fc"])


@pytest.mark.parametrize("kept", [[0, 5], [3]])
def test_cuts_match_sliced_layers(kept):
    torch.manual_seed(0)
    index = torch.tensor(kept)
    x = torch.randn(2, 6, 5, 5)
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=True)
    assert torch.allclose(cut_conv_out(conv, index)(x), conv(x)[:, index], atol=1e-6)
    zeroed = torch.zeros_like(x)
    zeroed[:, index] = x[:, index]
    assert torch.allclose(cut_conv_in(conv, index)(x[:, index]), conv(zeroed), atol=1e-5)
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    assert torch.allclose(cut_batchnorm(bn, index)(x[:, index]), bn(x)[:, index], atol=1e-6)
    linear, features = nn.Linear(6, 3), torch.randn(4, 6)
    masked = torch.zeros_like(features)
    masked[:, index] = features[:, index]
    assert torch.allclose(cut_linear_in(linear, index)(features[:, index]), linear(masked), atol=1e-6)


def test_mask_that_does_not_fit_is_refused(resnet20_run):
    model, mask, document, _ = resnet20_run
    bad_index = Mask({**mask.kept_channels, "layer1.1": [0, 99]}, mask.closed_blocks)
    with pytest.raises(MaskMismatchError, match=r"layer1\.1 keeps 2 channel indices"):
        prune(model, document, bad_index)
    unknown = Mask({**mask.kept_channels, "layer9.0": [0]}, mask.closed_blocks)
    with pytest.raises(MaskMismatchError, match=r"layer9\.0"):
        prune(model, document, unknown)
    with pytest.raises(MaskMismatchError, match="closes blocks the network does not have"):
        prune(model, document, Mask(mask.kept_channels, [*mask.closed_blocks, "layer9.9"]))
    with pytest.raises(MaskMismatchError, match=r"block layer1\.0 is closed but also keeps channels"):
        prune(model, document, Mask({**mask.kept_channels, "layer1.0": [0]}, mask.closed_blocks))
    reopened = Mask({**mask.kept_channels, "layer1.0": [0, 1, 2, 3]}, ["layer2.0"])  # gates say closed
    with pytest.raises(MaskMismatchError, match=r"gate layer1\.0\.block_gate is frozen to 0/1 open"):
        prune(model, document, reopened)


def test_ungated_run_exports_as_is():
    model, mask, document = trained_model("resnet20", (16, 16), seed=0, gated=False)
    networks = prune(model, document, mask)
    images = torch.randn(8, 1, 16, 16)
    assert check_equivalence(model, networks.pruned, networks.graph, mask, images) == 0.0
    closing = Mask({k: v for k, v in mask.kept_channels.items() if k != "layer1.0"}, ["layer1.0"])
    with pytest.raises(MaskMismatchError, match="no gates"):
        prune(model, document, closing)


def test_pruned_model_file_round_trip(tmp_path, resnet20_run):
    _, _, document, networks = resnet20_run
    pruned = networks.pruned
    save_pruned(tmp_path / "pruned_model.pt", pruned)
    assert [p.name for p in tmp_path.iterdir()] == ["pruned_model.pt"]
    loaded = load_pruned(tmp_path / "pruned_model.pt")
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), pruned(images))
    assert loaded.spec == document["pruned_spec"]
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="broken.pt: unreadable pruned model"):
        load_pruned(tmp_path / "broken.pt")
