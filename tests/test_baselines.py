"""The baseline methods: activation density (a network that shrinks while it trains) and FlipOut
(unstructured, sign-flip saliency); each trains in the shared loop and goes through export."""
import json
import os

import pytest
import torch
from torch import nn

from polarprune.export.api import ExportOptions
from polarprune.export.api import run as run_export
from export_fixtures import single_torch_thread  # noqa: F401 (autouse fixture)
from polarprune.export.surgery import load_pruned
from polarprune.training.config import ConfigError, make_config
from polarprune.training.methods.flipout import flipout_prune_epochs
from polarprune.training.flops import count_macs
from polarprune.training.gating import cut, embed, full_mask, mask_problem
from polarprune.training.graph import trace_network
from polarprune.training.loop import train
from polarprune.training.mask import Mask, load_mask, mask_document
from polarprune.training.methods import REGISTRY
from polarprune.training.methods.activation_density import (ActivationDensityMethod, DensityMeter, most_active,
                                                 resized_width)
from polarprune.training.methods.base import RunContext
from polarprune.training.methods.flipout import FlipOutMethod, add_gradient_noise, sign_flips
from polarprune.training.networks import NetworkInfo, build_network

TINY = dict(dataset="fashion_mnist", epochs=2, batch_size=64, train_subset=256, val_size=64, test_subset=200,
            eval_batch_size=200, progress=False, seed=0, threads=1, device="cpu")
CTX = RunContext(torch.device("cpu"), lambda: [], total_epochs=4, steps_per_epoch=1)
INPUT_SHAPE = (1, 16, 16)


def network_graph(model_name="resnet20"):
    info = NetworkInfo(model_name, 1, 10, INPUT_SHAPE[1:])
    return trace_network(build_network(info), info.example_input())


def group_widths(model):
    """Channel group -> width of a (possibly resized) plain network, from its own trace."""
    return {name: group.width for name, group in trace_network(model, torch.zeros(2, *INPUT_SHAPE)).prunable().items()}


def density_method(model_name="resnet20", **overrides):
    cfg = make_config({"method": "activation_density", "model": model_name, **overrides})
    return ActivationDensityMethod(cfg, network_graph(model_name))


# --- activation density ------------------------------------------------------------------------------

def test_density_counts_nonzero_post_relu_values_per_channel():
    pre_relu = torch.zeros(2, 3, 2, 2)
    pre_relu[:, 0] = 1.0                       # always fires
    pre_relu[:, 1, 0] = 2.0                    # half of the positions
    pre_relu[:, 1, 1] = -2.0
    pre_relu[:, 2] = -1.0                      # dead; exact zeros below do not count either
    pre_relu[0, 2, 0, 0] = 0.0
    meter = DensityMeter()
    meter.record("unit", pre_relu)
    assert meter.channel_density("unit").tolist() == [1.0, 0.5, 0.0]
    assert meter.density("unit") == pytest.approx(0.5)
    # Through a hook on the unit's module: training passes count, evaluation passes do not.
    meter.reset()
    post_norm = nn.Identity()
    meter.attach({"unit": post_norm})
    post_norm.eval()(torch.randn(4, 3, 2, 2))
    assert not meter.positive
    post_norm.train()(pre_relu)
    post_norm(pre_relu)
    assert meter.seen["unit"] == 2 * (2 * 2 * 2)
    assert meter.channel_density("unit").tolist() == [1.0, 0.5, 0.0]
    meter.detach()


def test_resized_width_rounds_to_groups_and_keeps_the_most_active():
    assert resized_width(64, 0.4, 16) == 32    # 25.6 -> 32
    assert resized_width(64, 0.1, 16) == 16    # never below one group
    assert resized_width(32, 0.95, 16) == 32   # never wider than now
    assert resized_width(8, 0.5, 8) == 8
    assert most_active(torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0]), 3) == [1, 2, 3]
    assert most_active(torch.tensor([0.5, 0.5, 0.5]), 2) == [0, 1]  # ties: lower index


def kill_half(model, block):
    """Odd channels of the block's inner group fire always (post-ReLU 1), even ones never (post-ReLU 0)."""
    bn = model.get_submodule(f"{block}.bn1")
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([1.0 if c % 2 else -1.0 for c in range(bn.num_features)]))
    return [c for c in range(bn.num_features) if c % 2]


def test_resize_keeps_the_active_channels_and_the_network_still_computes_the_same():
    method = density_method(round_to=8)
    torch.manual_seed(0)
    model = method.build_model()
    live = kill_half(model, "layer2.1")
    method.prepare(model, CTX)
    model.train()
    model(torch.randn(8, 1, 16, 16))
    smaller = method.resize(model, epoch=1)
    assert method.resizes[0]["density"]["layer2.1.conv1"] == pytest.approx(0.5)
    assert method.kept["layer2.1.conv1"] == live                   # density 0.5 of 32: the 16 live ones
    assert group_widths(smaller)["layer2.1.conv1"] == 16
    assert count_macs(smaller, INPUT_SHAPE) < count_macs(model, INPUT_SHAPE)
    # Cutting only the dead channels changes nothing; the kept channels carry the same activations.
    model.eval()
    only_dead = Mask({**full_mask(method.graph).kept_channels, "layer2.1.conv1": live})
    only_dead_removed = cut(method.graph, only_dead, model).eval()
    images = torch.randn(4, 1, 16, 16)
    seen = {}
    only_dead_removed.get_submodule("layer2.1.bn1").register_forward_hook(lambda m, i, out: seen.__setitem__("cut", out))
    model.get_submodule("layer2.1.bn1").register_forward_hook(lambda m, i, out: seen.__setitem__("dense", out))
    with torch.no_grad():
        assert torch.allclose(only_dead_removed(images), model(images), atol=1e-5)
    assert torch.equal(seen["cut"], seen["dense"][:, live])
    smaller.eval()(images)                                          # the resized network runs


def test_mask_indices_compose_across_two_resizes():
    method = density_method(round_to=16)
    torch.manual_seed(1)
    model = method.build_model().eval()
    original = model.get_submodule("layer3.0.conv1").weight.detach().clone()
    units = group_widths(model)
    unit = "layer3.0.conv1"  # the inner channels of block layer3.0

    def craft(unit_density):  # measured densities, as if from a training epoch; other units fire fully
        method.meter.positive = {u: torch.ones(w, dtype=torch.float64) for u, w in group_widths(model).items()}
        method.meter.seen = {u: 1 for u in units}
        method.meter.positive[unit] = unit_density

    first_pick = list(range(1, 64, 2))                                  # 32 of 64
    craft(torch.tensor([1.0 if c in first_pick else 0.0 for c in range(64)], dtype=torch.float64))
    model = method.resize(model, epoch=1)
    assert method.kept[unit] == first_pick
    second_local = list(range(16, 32))                                   # 16 of the remaining 32
    craft(torch.tensor([0.0] * 16 + [0.5] * 16, dtype=torch.float64))
    model = method.resize(model, epoch=2)
    expected = [first_pick[i] for i in second_local]
    assert method.kept[unit] == expected
    assert torch.equal(model.get_submodule("layer3.0.conv1").weight, original[expected])  # weights followed the indices
    assert all(len(kept) == w for (u, kept), w in zip(method.kept.items(), units.values()) if u != unit)
    # The dense-indexed mask describes the trained network: cutting the dense network to it gives the
    # small one's shapes and MACs, and the dense-shaped gated network export receives computes what the
    # small one does.
    mask = method.final_mask(model)
    document = mask_document(mask, mask_problem(method.graph), NetworkInfo("resnet20", 1, 10, (16, 16)).describe(),
                             round_to=16)
    from_mask = cut(method.graph, mask, method.graph.module)
    assert {k: v.shape for k, v in from_mask.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert document["pruned_flops"] == count_macs(model, INPUT_SHAPE) < document["dense_flops"]
    gated = embed(method.graph, model, mask).eval()
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(gated(images), model(images), atol=1e-5)


# --- FlipOut -----------------------------------------------------------------------------------------

def flipout_method(**overrides):
    cfg = make_config({"method": "flipout", "epochs": 4, **overrides})
    return FlipOutMethod(cfg, network_graph("resnet20"))


def test_flips_are_counted_on_a_scripted_weight_sequence():
    assert sign_flips(torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([-1.0, -2.0, 3.0, 0.0])).tolist() == [1, 0, 0, 0]
    method = flipout_method()
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    sequence = [[1.0, -1.0, 2.0, 0.5], [-1.0, -1.0, 2.0, -0.5], [1.0, 1.0, 0.0, 0.5], [1.0, 1.0, -3.0, -0.5]]
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([sequence[0]]))
    method.prepare(model, CTX)
    for weights in sequence[1:]:
        method.before_step(model)            # no gradients here: only the signs are recorded
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([weights]))
        method.after_step(model)
    # 0: + - + (2 flips); 1: - - + (1); 2: + + 0 - (through zero: not a flip); 3: + - + - (3)
    assert method.flips["0"].tolist() == [[2, 1, 0, 3]]


def test_saliency_prefers_stable_weights_and_pruned_weights_stay_zero():
    method = flipout_method(final_sparsity=0.5, epochs=2)
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 1.0, 0.5, 2.0]]))
    method.prepare(model, CTX)
    method.flips["0"] = torch.tensor([[17, 0, 0, 0]], dtype=torch.int32)  # saliency 0.5, 1, 0.25, 4
    method.start_epoch(model, 1, RunContext(torch.device("cpu"), lambda: [], 2, 1))
    assert method.masks["0"].tolist() == [[False, True, False, True]]      # magnitude alone keeps 3.0
    assert model[0].weight.tolist() == [[0.0, 1.0, 0.0, 2.0]]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        sgd.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        method.before_step(model)
        assert model[0].weight.grad[0, 0] == 0 and model[0].weight.grad[0, 2] == 0
        sgd.step()
        method.after_step(model)
    assert model[0].weight[0, 0] == 0 and model[0].weight[0, 2] == 0


def test_three_halvings_reach_87_5_percent_sparsity():
    assert flipout_prune_epochs(0.875, 4, None) == [1, 2, 3]
    assert flipout_prune_epochs(0.9, 9, 2) == [2, 4, 6, 8]      # 4 halvings, the last one stops at 0.9
    with pytest.raises(ConfigError, match="epochs >= 4"):
        make_config({"method": "flipout", "final_sparsity": 0.875, "epochs": 3})
    method = flipout_method(final_sparsity=0.875)
    torch.manual_seed(0)
    model = method.build_model()
    method.prepare(model, CTX)
    reached = []
    for epoch in range(4):
        method.start_epoch(model, epoch, CTX)
        reached.append(method.summary()["weight_sparsity"])
    assert reached == pytest.approx([0.0, 0.5, 0.75, 0.875], abs=1e-5)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros == pytest.approx(0.875 * method.summary()["prunable_weights"], abs=1)


def test_gradient_noise_is_scaled_by_the_layer_rms_gradient():
    torch.manual_seed(0)
    grad = torch.full((200_000,), 2.0)
    kept = torch.ones_like(grad, dtype=torch.bool)
    kept[::2] = False
    grad[::2] = 1000.0                        # pruned entries do not count towards the RMS
    add_gradient_noise(grad, kept, scale=0.5)
    assert (grad[::2] == 0).all()
    noise = grad[1::2] - 2.0
    assert noise.mean().abs() < 0.02
    assert noise.std().item() == pytest.approx(0.5 * 2.0, rel=0.02)
    quiet = torch.full((10,), 3.0)
    add_gradient_noise(quiet, torch.ones(10, dtype=torch.bool), scale=0.0)
    assert quiet.tolist() == [3.0] * 10


# --- in the loop, and through export -------------------------------------------------------------------

def test_both_methods_are_registered():
    assert REGISTRY["activation_density"] is ActivationDensityMethod
    assert REGISTRY["flipout"] is FlipOutMethod


def train_and_export(tmp_path, name, **overrides):
    metrics = train(make_config({**TINY, "out_dir": str(tmp_path), "name": name, **overrides}))
    run_dir = tmp_path / name
    report = run_export(ExportOptions(run=run_dir, repository=tmp_path / "repository", samples=32))
    return run_dir, metrics, report


@pytest.mark.parametrize("model_name", ["resnet20", "vgg16"])
def test_activation_density_shrinks_while_training_and_exports(tmp_path, model_name):
    # vgg16 at lr 0.1 on 256 images does not learn; what matters here is the shrinking and the export.
    examples = 256 if model_name == "resnet20" else 128  # vgg16 is 9x the MACs
    run_dir, metrics, report = train_and_export(tmp_path, model_name, model=model_name,
                                                method="activation_density", round_to=8, train_subset=examples,
                                                lr=0.1 if model_name == "resnet20" else 0.01)
    history = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert history[0]["kept_flops"] == 1.0 and history[1]["kept_flops"] < 1.0  # resized after epoch 1
    assert metrics["flops_ratio"] == pytest.approx(history[1]["kept_flops"])
    assert metrics["train_flops_ratio"] == pytest.approx((1 + metrics["flops_ratio"]) / 2)
    assert metrics["train_flops"] == 3 * examples * (metrics["dense_flops"] + metrics["pruned_flops"])
    assert len(metrics["epoch_train_seconds"]) == 2 and "train_seconds_ratio_vs_dense_pace" in metrics
    document, mask = load_mask(run_dir / "mask.json")
    assert not mask.closed_blocks
    assert all(len(kept) % 8 == 0 for kept in mask.kept_channels.values())
    assert report["flops_ratio"] == pytest.approx(metrics["flops_ratio"])
    assert report["max_abs_diff_surgery"] <= 1e-4
    # pruned_model.pt2 carries its architecture: the dense network cut to mask.json, weights included.
    info = NetworkInfo.from_dict(document["network"])
    graph = trace_network(build_network(info), info.example_input())
    expected = cut(graph, mask, graph.module).state_dict()
    pruned = load_pruned(run_dir / "pruned_model.pt2")
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    assert pruned(torch.zeros(3, *info.input_shape)).shape == (3, 10)


def test_flipout_trains_to_its_sparsity_and_exports_a_dense_shape(tmp_path):
    run_dir, metrics, report = train_and_export(tmp_path, "flipout", model="resnet20", method="flipout",
                                                final_sparsity=0.5)
    assert metrics["weight_sparsity"] == pytest.approx(0.5, abs=1e-5)
    assert metrics["flops_ratio"] == 1.0 and report["flops_ratio"] == 1.0   # no structural cut, no claim
    removed = metrics["prunable_weights"] // 2
    assert metrics["nonzero_params"] == pytest.approx(metrics["dense_params"] - removed, abs=1)
    state = load_pruned(run_dir / "pruned_model.pt2").state_dict()
    weights = [t for k, t in state.items() if k.endswith("weight") and t.dim() > 1]
    zeros = sum(int((t == 0).sum()) for t in weights)
    assert zeros == pytest.approx(metrics["prunable_weights"] * 0.5, abs=1)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("POLARPRUNE_SLOW_TESTS"),
                    reason="about a minute (five trainings and exports): set POLARPRUNE_SLOW_TESTS=1")
def test_compare_quick_writes_its_report(tmp_path):
    from polarprune.bench.compare import main
    # The Torch-Pruning rows have their own tests (tests/test_torch_pruning_method.py).
    runs = tmp_path / "runs"
    assert main(["--quick", "--runs", str(runs), "--out", str(tmp_path / "out"), "--samples", "32",
                 "--set", "device=cpu", "--methods", "dense,polarized,activation_density,flipout",
                 "--targets", "0.3,0.5"]) == 0
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [(row["method"], row["target"], row["seed"]) for row in report["rows"]] == [
        ("dense", None, 0), ("polarized", 0.3, 0), ("polarized", 0.5, 0), ("activation_density", None, 0),
        ("flipout", None, 0)]
    assert report["rows"][1]["run"] == str(runs / "seed0" / "polarized_t0.3")
    assert report["rows"][1]["flops_ratio"] < report["rows"][2]["flops_ratio"] < 1
    assert (runs / "seed0" / "model_repository" / "polarized_t0.5_pruned").is_dir()
    assert [entry["seeds"] for entry in report["summary"]] == [[0]] * 5
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0
    assert "| FlipOut | - | 0 |" in (tmp_path / "out" / "compare.md").read_text()
