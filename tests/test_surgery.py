"""Surgery on the built-in networks: groups from the trace, per-layer cuts, pruned == gated (hard mask)."""
import copy

import pytest
import torch
from torch import nn

from polarprune.export import ExportError
from polarprune.export.surgery import MaskMismatchError, SurgeryError, check_equivalence, load_pruned, prune, save_pruned
from export_fixtures import single_torch_thread, trained_model  # noqa: F401 (autouse fixture)
from polarprune.training.cuts import cut_conv_in, cut_conv_out, cut_depthwise, cut_linear_in, cut_linear_out, cut_norm
from polarprune.training.flops import count_macs
from polarprune.training.gates import Gate
from polarprune.training.graph import trace_network
from polarprune.training.mask import Mask
from polarprune.training.networks import NetworkInfo, build_network

CASES = {
    # many closed blocks in a row, including the stride-2 option-A block; one 1-channel layer
    "resnet20": dict(model_name="resnet20", input_size=(28, 28), round_to=4,
                     closed_blocks=["layer1.1", "layer1.2", "layer2.0", "layer2.1"],
                     one_channel=["layer3.0"], round_to_width=["layer3.1"]),
    # the last stage closed from its downsampling block on
    "resnet32": dict(model_name="resnet32", input_size=(16, 16), round_to=8,
                     closed_blocks=["layer3.0", "layer3.1", "layer3.2", "layer3.3"],
                     one_channel=["layer1.0"], round_to_width=["layer2.4"]),
    # a closed block with a 1x1 conv shortcut (stride 2); residual streams shrink too
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
    model, mask, document, graph = trained_model(seed=3, **options)
    networks = prune(model.plain(), graph, mask)
    images = torch.randn(16, 1, *options["input_size"], generator=torch.Generator().manual_seed(7))
    return request.param, model, mask, document, networks, images


def test_no_gates_left(case):
    _, _, _, _, networks, _ = case
    assert not any(isinstance(m, Gate) for m in networks.pruned.modules())
    assert not any(isinstance(m, Gate) for m in networks.dense.modules())
    assert not any("gate" in name for name in networks.pruned.state_dict())


def test_pruned_equals_gated(case):
    """The reference export checks against (plain weights, gates frozen to the mask) is the trained gated
    network, and the cut network computes what it computes."""
    _, model, mask, _, networks, images = case
    with torch.no_grad():
        reference, trained = networks.reference(images), model(images)
    assert reference.std(dim=0).mean() > 1e-3, "fixture too degenerate: logits do not depend on the input"
    assert torch.allclose(reference, trained, atol=1e-6), (reference - trained).abs().max()
    diff = check_equivalence(networks.reference, networks.pruned, networks.graph, mask, images)
    assert diff <= 1e-4


def test_kept_widths_and_macs(case):
    name, model, mask, document, networks, _ = case
    shape = networks.graph.input_shape
    assert count_macs(networks.pruned, shape) == document["pruned_flops"]
    assert count_macs(networks.dense, shape) == document["dense_flops"]
    plain = model.plain()
    for group, kept in mask.kept_channels.items():
        producer = networks.graph.groups[group].producers[0]
        conv = networks.pruned.get_submodule(producer)
        assert conv.out_channels == len(kept)
        assert torch.equal(conv.weight, plain.get_submodule(producer).weight[kept][:, :conv.in_channels]) \
            or conv.in_channels != plain.get_submodule(producer).in_channels  # chained VGG: inputs cut too
    for block in mask.closed_blocks:
        for path in networks.graph.blocks[block].branch_modules:
            with pytest.raises(AttributeError):
                networks.pruned.get_submodule(path)
    widths = {group: len(kept) for group, kept in mask.kept_channels.items()}
    assert 1 in widths.values() and document["round_to"] in widths.values()


def test_dense_holds_trained_weights(case):
    _, model, _, _, networks, _ = case
    trained = model.plain().state_dict()
    for key, tensor in networks.dense.state_dict().items():
        assert torch.equal(tensor, trained[key]), key


@pytest.fixture(scope="module")
def resnet20_run():
    """(model, mask, document, networks) of a small resnet20 run shared by the tests below."""
    model, mask, document, graph = trained_model("resnet20", (16, 16), seed=1, closed_blocks=["layer1.0", "layer2.0"])
    return model, mask, document, prune(model.plain(), graph, mask)


def test_divergence_names_the_first_bad_layer(resnet20_run):
    _, mask, _, networks = resnet20_run
    broken = copy.deepcopy(networks.pruned)
    with torch.no_grad():
        broken.get_submodule("layer2.2.bn1").bias.add_(1.0)
    images = torch.randn(16, 1, 16, 16)
    with pytest.raises(SurgeryError, match=r"first diverging layer: layer2\.2\.bn1"):
        check_equivalence(networks.reference, broken, networks.graph, mask, images)


def _graph(model: str):
    info = NetworkInfo(model, 1, 10, (16, 16))
    return trace_network(build_network(info), info.example_input())


def test_groups_follow_the_network():
    graph = _graph("resnet18")
    group = graph.prunable()["layer2.0.conv1"]
    assert (group.producers, group.members, group.consumers) == (["layer2.0.conv1"], ["layer2.0.bn1"],
                                                                 ["layer2.0.conv2"])
    # the residual stream of stage 2: every producer feeding its adds shrinks together, the shortcut too
    stream = graph.output_group("layer2.0.conv2")
    assert stream.prunable and stream.name == "layer2.0.shortcut.conv"  # named after its first producer
    assert {"layer2.0.conv2", "layer2.1.conv2", "layer2.0.shortcut.conv"} <= set(stream.producers)
    assert {"layer2.0.bn2", "layer2.0.shortcut.bn", "layer2.1.bn2"} <= set(stream.members)
    assert graph.blocks["layer2.0"].branch_modules == ["layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2",
                                                       "layer2.0.bn2"]
    # option-A shortcuts pad channels: their streams stay, with the reason
    resnet20 = _graph("resnet20")
    assert not resnet20.groups["stem.conv"].prunable
    assert any("pads the channel axis" in why for why in resnet20.groups["stem.conv"].pinned)
    last = _graph("vgg16").prunable()["features.12.conv"]
    assert last.consumers == ["fc"]  # through max-pool, global pool and flatten


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
    depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True)
    assert torch.allclose(cut_depthwise(depthwise, index)(x[:, index]), depthwise(x)[:, index], atol=1e-6)
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    assert torch.allclose(cut_norm(bn, index)(x[:, index]), bn(x)[:, index], atol=1e-6)
    linear, features = nn.Linear(6, 6), torch.randn(4, 6)
    masked = torch.zeros_like(features)
    masked[:, index] = features[:, index]
    assert torch.allclose(cut_linear_in(linear, index)(features[:, index]), linear(masked), atol=1e-6)
    assert torch.allclose(cut_linear_out(linear, index)(features), linear(features)[:, index], atol=1e-6)


def test_mask_that_does_not_fit_is_refused(resnet20_run):
    model, mask, _, networks = resnet20_run
    graph = networks.graph
    bad_index = Mask({**mask.kept_channels, "layer1.1.conv1": [0, 99]}, mask.closed_blocks)
    with pytest.raises(MaskMismatchError, match=r"layer1\.1\.conv1 keeps 2 channel indices"):
        prune(model.plain(), graph, bad_index)
    unknown = Mask({**mask.kept_channels, "layer9.0.conv1": [0]}, mask.closed_blocks)
    with pytest.raises(MaskMismatchError, match=r"does not have: \['layer9\.0\.conv1'\]"):
        prune(model.plain(), graph, unknown)
    with pytest.raises(MaskMismatchError, match=r"does not have: \['layer9\.9'\]"):
        prune(model.plain(), graph, Mask(mask.kept_channels, [*mask.closed_blocks, "layer9.9"]))
    with pytest.raises(MaskMismatchError, match=r"group layer1\.0\.conv1 belongs to a closed block"):
        prune(model.plain(), graph, Mask({**mask.kept_channels, "layer1.0.conv1": [0]}, mask.closed_blocks))


def test_ungated_run_exports_as_is():
    model, mask, _, graph = trained_model("resnet20", (16, 16), seed=0, gated=False)
    networks = prune(model, graph, mask)
    images = torch.randn(8, 1, 16, 16)
    assert check_equivalence(model, networks.pruned, networks.graph, mask, images) == 0.0


def test_pruned_model_file_round_trip(tmp_path, resnet20_run):
    _, _, _, networks = resnet20_run
    pruned = networks.pruned
    save_pruned(tmp_path / "pruned_model.pt2", pruned, (1, 16, 16))
    assert [p.name for p in tmp_path.iterdir()] == ["pruned_model.pt2"]
    loaded = load_pruned(tmp_path / "pruned_model.pt2")
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(images), pruned(images), atol=1e-6)
    (tmp_path / "broken.pt2").write_bytes(b"not a torch file")
    with pytest.raises(ExportError, match="broken.pt2: unreadable pruned model"):
        load_pruned(tmp_path / "broken.pt2")
