"""Users' own networks through the Python API: gates from one trace, a short training, prune, ONNX.

For each architecture: every parameter (gate scores included) gets a gradient, the pruned network equals
the gated one with the same hard mask to 1e-4, onnxruntime runs its ONNX, and the ONNX graph's MACs equal
the cost model's prediction. Patterns no cut handles are pinned with the layer and the reason, or refused.
"""
from __future__ import annotations

import json

import pytest
import torch

from polarprune.export.onnx_export import count_onnx_macs, export_onnx, run_onnxruntime
from polarprune.training.api import load_pruned, polarize, save_pruned
from polarprune.training.gating import MaskError, mask_macs
from polarprune.training.graph import GraphError
from polarprune.training.mask import Mask

from user_networks import (BranchingNet, ConcatNet, GroupNormNet, MobileNetV2, SENet, ShuffleNet, VGG,
                           resnet18, resnet50)
from polarprune.training.arch import MODEL_NAMES
from polarprune.training.data import FMNIST_SEARCH_DIRS

ARCHITECTURES = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": MobileNetV2, "vgg_bn": VGG,
    "concat": ConcatNet, "squeeze_excite": SENet,
}
# What each architecture must offer the gates: (channel groups at least, residual blocks exactly).
EXPECTED = {"resnet18": (12, 8), "resnet50": (37, 16), "mobilenet_v2": (16, 5), "vgg_bn": (6, 0),
            "concat": (5, 0), "squeeze_excite": (5, 2)}


def _train(gated, steps: int = 3) -> None:
    """A few SGD steps on random data with the task loss plus the gate penalty past warm-up."""
    optimizer = torch.optim.SGD(gated.parameters(), lr=0.01, momentum=0.9)
    gated.train()
    for step in range(steps):
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(gated(images), labels) + gated.penalty(0.3 + 0.1 * step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_gate_train_prune_export(name, tmp_path):
    torch.manual_seed(0)
    network = ARCHITECTURES[name]()
    example = torch.randn(2, 3, 32, 32)
    gated = polarize(network, example, target_flops=0.5, round_to=4)
    groups, blocks = EXPECTED[name]
    assert len(gated.graph.prunable()) >= groups and len(gated.graph.blocks) == blocks

    # every parameter, gate scores included, receives a gradient
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = torch.nn.functional.cross_entropy(gated(images), labels) + gated.penalty(0.5)
    loss.backward()
    lacking = [n for n, p in gated.named_parameters() if p.requires_grad and p.grad is None]
    assert not lacking, f"no gradient for {lacking}"
    assert any("channel_gates" in n for n, _ in gated.named_parameters())

    _train(gated)
    # close a random share of every gate so the cut has work to do
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in list(gated.channel_gates.values()) + list(gated.block_gates.values()):
            gate.score.copy_(torch.randn(gate.score.shape, generator=generator) + 0.3)
    mask = gated.mask()
    assert mask_macs(gated.graph, mask) < gated.dense_macs
    pruned = gated.prune(mask)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in network.parameters())

    gated.eval()
    check = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected, got = gated(check), pruned(check)
    assert (expected - got).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))

    onnx_path = tmp_path / f"{name}.onnx"
    export_onnx(pruned, onnx_path, (3, 32, 32))
    from_ort = torch.from_numpy(run_onnxruntime(onnx_path, check.numpy()))
    assert (from_ort - got).abs().max() <= 1e-4 * max(1.0, float(got.abs().max()))
    assert count_onnx_macs(onnx_path) == round(mask_macs(gated.graph, mask))
    export_onnx(gated.plain().eval(), tmp_path / "dense.onnx", (3, 32, 32))  # every MAC counted, dense too
    assert count_onnx_macs(tmp_path / "dense.onnx") == round(gated.dense_macs)


def test_dense_macs_match_onnx(tmp_path):
    """The cost model of the dense network counts what the ONNX graph counts (the reference for ratios)."""
    network = MobileNetV2().eval()
    gated = polarize(network, torch.randn(2, 3, 32, 32))
    export_onnx(network, tmp_path / "dense.onnx", (3, 32, 32))
    assert count_onnx_macs(tmp_path / "dense.onnx") == round(gated.dense_macs)


@pytest.mark.parametrize("network", [GroupNormNet, ShuffleNet])
def test_pinned_networks_count_every_mac(network, tmp_path):
    """Pinned layers still cost: the dense MACs equal the ONNX graph's."""
    network = network().eval()
    gated = polarize(network, torch.randn(2, 3, 32, 32), round_to=4)
    export_onnx(network, tmp_path / "dense.onnx", (3, 32, 32))
    assert count_onnx_macs(tmp_path / "dense.onnx") == round(gated.dense_macs)


def test_gates_start_open_exactly():
    """Pretrained weights: before the first step the gated network computes exactly the network's logits."""
    torch.manual_seed(0)
    network = resnet50().eval()
    gated = polarize(network, torch.randn(2, 3, 32, 32)).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gated(images), network(images))


def test_user_model_left_alone():
    network = VGG()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    gated = polarize(network, torch.randn(2, 3, 32, 32), round_to=4)
    _train(gated, steps=1)
    gated.prune()
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_pruned_saves_and_loads_with_its_architecture(tmp_path):
    torch.manual_seed(0)
    gated = polarize(MobileNetV2(), torch.randn(2, 3, 32, 32), round_to=4, target_flops=0.6)
    _train(gated)
    pruned = gated.prune().eval()
    save_pruned(tmp_path / "pruned.pt2", pruned, torch.randn(1, 3, 32, 32))
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.pt2"]  # atomic: no temporary left behind
    loaded = load_pruned(tmp_path / "pruned.pt2")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(images), pruned(images), atol=1e-6)


def test_group_norm_pins_its_channels_with_the_reason():
    graph = polarize(GroupNormNet(), torch.randn(2, 3, 32, 32)).graph
    group = graph.groups["conv1"]
    assert not group.prunable
    assert any("GroupNorm norm" in why for why in group.pinned)
    assert graph.groups["conv2"].prunable  # the rest of the network still shrinks


def test_channel_shuffle_pins_its_channels_with_the_reason():
    graph = polarize(ShuffleNet(), torch.randn(2, 3, 32, 32)).graph
    assert not graph.groups["conv1"].prunable
    assert any("view" in why for why in graph.groups["conv1"].pinned)


def test_squeeze_excite_sigmoid_does_not_reach_a_consumer():
    """The SE scale passes a sigmoid (0 -> 0.5) but only multiplies gated channels: the group stays
    prunable; its producers include the SE expansion conv."""
    graph = polarize(SENet(), torch.randn(2, 3, 32, 32)).graph
    stream = graph.groups["stem.0"]
    assert stream.prunable and "blocks.0.se.fc2" in stream.producers


def test_untraceable_network_is_refused():
    with pytest.raises(GraphError, match="BranchingNet cannot be traced"):
        polarize(BranchingNet(), torch.randn(2, 3, 32, 32))


def test_mask_that_does_not_fit_is_refused():
    gated = polarize(VGG(), torch.randn(2, 3, 32, 32))
    with pytest.raises(MaskError, match="does not have"):
        gated.prune(Mask({"no.such.layer": [0]}, []))
    group = next(iter(gated.graph.prunable()))
    mask = gated.mask()
    mask.kept_channels[group] = [0, 0]
    with pytest.raises(MaskError, match=group):
        gated.prune(mask)


def test_impossible_settings_are_refused():
    with pytest.raises(ValueError, match="target_flops"):
        polarize(VGG(), torch.randn(2, 3, 32, 32), target_flops=0.0)
    with pytest.raises(TypeError):
        polarize(VGG(), torch.randn(2, 3, 32, 32), target_flop=0.5)


# -- the same through the CLI: a config names the network by import path ------------------------------

needs_fmnist = pytest.mark.skipif(
    not any((d / "train-images-idx3-ubyte.gz").is_file() for d in FMNIST_SEARCH_DIRS),
    reason="Fashion-MNIST not installed (make data)")

USER_RUN = dict(dataset="fashion_mnist", model="user_networks:VGG", model_args={"in_channels": 1},
                epochs=2, batch_size=64, train_subset=512, val_size=128, test_subset=256, progress=False,
                round_to=8, target_flops_ratio=0.5, device="cpu", threads=1)


@needs_fmnist
def test_user_network_by_import_path_trains_and_exports(tmp_path):
    from polarprune.export.__main__ import main as export_main
    from polarprune.training.config import make_config
    from polarprune.training.loop import train

    metrics = train(make_config({**USER_RUN, "out_dir": str(tmp_path), "name": "vgg"}))
    assert abs(metrics["flops_ratio"] - 0.5) <= 0.03 and metrics["model"] == "user_networks:VGG"
    assert export_main(["--run", str(tmp_path / "vgg"), "--repository", str(tmp_path / "repo"), "--samples", "32"]) == 0
    assert (tmp_path / "vgg" / "pruned_model.pt2").is_file() and (tmp_path / "repo" / "vgg_pruned").is_dir()
    assert all((tmp_path / "vgg" / name).is_file() for name in ("pruning.md", "pruning.json", "pruning_widths.png"))


@needs_fmnist
def test_init_weights_start_the_run_and_a_mismatch_names_the_keys(tmp_path):
    from polarprune.training.config import ConfigError, make_config
    from polarprune.training.loop import train

    torch.manual_seed(3)
    pretrained = VGG(in_channels=1)
    torch.save(pretrained.state_dict(), tmp_path / "vgg.pt")
    run = {**USER_RUN, "out_dir": str(tmp_path), "method": "dense", "epochs": 1, "lr": 1e-9, "momentum": 0.0,
           "weight_decay": 0.0, "init_weights": str(tmp_path / "vgg.pt"), "name": "dense"}
    train(make_config(run))
    from polarprune.training.checkpoint import load_checkpoint
    state = load_checkpoint(tmp_path / "dense" / "checkpoint.pt")["model"]
    conv = state["features.0.weight"]
    assert torch.allclose(conv, pretrained.state_dict()["features.0.weight"], atol=1e-6)  # lr ~ 0: kept

    torch.save(VGG(in_channels=3).state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(ConfigError, match=r"init_weights.*shape mismatches \(1\): features\.0\.weight"):
        train(make_config({**run, "init_weights": str(tmp_path / "rgb.pt"), "name": "bad"}))
    torch.save({"not_a_layer.weight": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match=r"missing keys .*unexpected keys \(1\): not_a_layer\.weight"):
        train(make_config({**run, "init_weights": str(tmp_path / "foreign.pt"), "name": "bad2"}))


def test_bad_import_paths_are_named():
    from polarprune.training.networks import NetworkError, NetworkInfo, build_network

    for model, message in [("no_such_pkg.nets:Net", "cannot import no_such_pkg.nets"),
                           ("user_networks:NoSuchNet", "has no NoSuchNet"),
                           ("resnet20x", "neither a built-in")]:
        with pytest.raises(NetworkError, match=message):
            build_network(NetworkInfo(model, 1, 10, (16, 16)))
    with pytest.raises(NetworkError, match="model_args do not fit"):
        build_network(NetworkInfo("user_networks:VGG", 1, 10, (16, 16), {"widths": 3}))


def test_what_the_api_saves_the_export_stage_takes(tmp_path):
    """save_for_export -> python -m export --run FOLDER: ONNX files, the Triton models, a report serving reads."""
    from polarprune.export.__main__ import main as export_main
    from polarprune.serving.run_artifacts import load_run
    from polarprune.training.api import save_for_export

    torch.manual_seed(0)
    network = MobileNetV2()
    gated = polarize(network, torch.randn(2, 3, 32, 32), round_to=4, target_flops=0.6)
    _train(gated)
    pruned = gated.prune().eval()
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    normalization = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    folder = save_for_export(tmp_path / "mynet", pruned, gated.plain().eval(), images, labels,
                             report=gated.summary(), normalization=normalization)
    assert export_main(["--run", str(folder), "--repository", str(tmp_path / "repo"), "--samples", "16"]) == 0
    for name in ("dense.onnx", "pruned.onnx", "export_report.json", "test_samples.npz"):
        assert (folder / name).is_file(), name
    report = json.loads((folder / "export_report.json").read_text())
    assert report["removed_blocks"] == gated.final_mask().closed_blocks and (folder / "pruning.md").is_file()
    assert report["input_normalization"] == normalization
    assert report["engine"] == {"built": False, "reason": "not requested (--engine, on a GPU machine)"}
    served = load_run(folder)
    assert served.model_names == {"dense": "mynet_dense", "pruned": "mynet_pruned"}
    assert served.flops_ratio == pytest.approx(gated.flops_ratio(gated.final_mask()), abs=1e-9)
    assert (tmp_path / "repo" / "mynet_pruned" / "1" / "model.onnx").is_file()
    config = (tmp_path / "repo" / "mynet_pruned" / "config.pbtxt").read_text()
    assert 'key: "input_mean"' in config and "[0.5, 0.5, 0.5]" in config


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_the_built_in_zoo_goes_through_the_same_path(model_name):
    """Every built-in network: gates from its trace, a random mask, pruned == gated, fewer MACs."""
    from polarprune.training.networks import NetworkInfo, build_network

    torch.manual_seed(0)
    info = NetworkInfo(model_name, 3, 10, (16, 16))
    gated = polarize(build_network(info), info.example_input(), round_to=4)
    with torch.no_grad():
        for gate in list(gated.channel_gates.values()) + list(gated.block_gates.values()):
            gate.score.copy_(torch.randn(gate.score.shape) + 0.5)
    mask = gated.mask()
    pruned = gated.prune(mask).eval()
    gated.eval()
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gated(images), pruned(images), atol=1e-4)
    assert mask_macs(gated.graph, mask) < gated.dense_macs
