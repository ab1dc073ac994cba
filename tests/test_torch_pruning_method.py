"""The Torch-Pruning peer (training/methods/torch_pruning.py): its config checks, its choice of channels
(deployable widths, the kept-MACs target), each recipe's hooks (the group regulariser, the summed Taylor
gradients), resume, and tiny runs of every recipe through the loop and export."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from polarprune.export.api import ExportOptions
from polarprune.export.api import run as run_export
from polarprune.training.arch import make_spec
from polarprune.training.config import ConfigError, make_config
from polarprune.training.flops import count_macs
from polarprune.training.graph import trace_network
from polarprune.training.loop import train
from polarprune.training.mask import load_mask
from polarprune.training.methods import REGISTRY, make_method
from polarprune.training.methods.base import RunContext
from polarprune.training.methods.torch_pruning import RATIO_GRID, TorchPruningMethod
from polarprune.training.models import ConvShortcut, build_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch_pruning") is None,
    reason="Torch-Pruning is the peer's benchmark-only package: pip install -r requirements-bench.txt "
           "(make test and make compare install it)")

SHAPE = (1, 28, 28)
TINY = dict(dataset="fashion_mnist", model="resnet20_proj", method="torch_pruning", epochs=2, batch_size=64,
            train_subset=256, val_size=64, test_subset=200, eval_batch_size=200, progress=False, seed=0,
            threads=1, device="cpu")


def method_for(recipe: str = "l1_oneshot", **overrides) -> tuple[TorchPruningMethod, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(make_spec("resnet20_proj", 1, 10, SHAPE[1:]))
    cfg = make_config({"model": "resnet20_proj", "method": "torch_pruning", "tp_recipe": recipe, **overrides})
    method = make_method(cfg, trace_network(model, torch.zeros(1, *SHAPE)))
    return method, model


def test_the_projection_resnet_has_a_conv_shortcut_where_the_shape_changes():
    model = build_model(make_spec("resnet20_proj", 1, 10, SHAPE[1:]))
    projections = [name for name, module in model.named_modules() if isinstance(module, ConvShortcut)]
    assert projections == ["layer2.0.shortcut", "layer3.0.shortcut"]
    graph = trace_network(model, torch.zeros(1, *SHAPE))
    assert {"stem.conv", "layer2.0.shortcut.conv", "layer3.0.shortcut.conv"} <= set(graph.prunable())  # streams


@pytest.mark.parametrize("key, value, message", [
    ("tp_recipe", "hessian", "must be one of l1_oneshot, taylor_iterative, group_sl"),
    ("tp_prune_at", 1.0, "must be in (0, 1)"),
    ("tp_steps", 0, "at least 1"),
    ("tp_reg", -1e-4, ">= 0"),
])
def test_bad_settings_name_their_key(key, value, message):
    with pytest.raises(ConfigError, match=f"{key}.*{message.replace('(', '.').replace(')', '.')}"):
        make_config({"method": "torch_pruning", key: value})


def test_choosing_the_peer_without_the_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_pruning" else real(name, *a))
    with pytest.raises(ConfigError, match="requirements-bench.txt"):
        make_config({"method": "torch_pruning"})
    make_config({"method": "polarized", "tp_recipe": "group_sl"})  # its keys alone need nothing installed


def test_a_choice_keeps_deployable_widths_and_the_most_important_channels():
    method, model = method_for("l1_oneshot")
    local = method.choose(model, 0.6)
    assert local, "a 0.6 global ratio removes channels"
    for unit, kept in local.items():
        assert len(kept) % 16 == 0 and 16 <= len(kept) <= method.dense_widths[unit]
    # An internal group is one conv's outputs (+ its norm, + the next conv's inputs): with them zeroed, the
    # L1 importance of those channels is 0 and they go first.
    block = model.get_submodule("layer3.1")
    with torch.no_grad():
        for module in (block.conv1, block.bn1):
            module.weight[:32] = 0
        block.conv2.weight[:, :32] = 0
    kept = method.choose(model, 0.6)["layer3.1.conv1"]
    assert not set(kept) & set(range(32))


def test_a_cut_reaches_the_target_macs_and_counts_them_as_the_network_has_them():
    method, model = method_for("l1_oneshot")
    dense_macs = count_macs(model, SHAPE)
    local, record = method.cut_to(model, 0.6)
    reachable = [method.kept_macs_ratio(method.composed(method.choose(model, ratio))) for ratio in RATIO_GRID]
    assert abs(record["flops_ratio"] - 0.6) == min(abs(kept - 0.6) for kept in reachable)  # the closest there is
    assert abs(record["flops_ratio"] - 0.6) <= 0.05 and record["target_flops_ratio"] == 0.6
    small = method.shrink(model, local)
    assert count_macs(small, SHAPE) / dense_macs == pytest.approx(record["flops_ratio"])
    assert small(torch.zeros(2, *SHAPE)).shape == (2, 10)


def test_the_schedule_spreads_iterative_cuts_over_the_first_half():
    iterative, _ = method_for("taylor_iterative", tp_steps=4, target_flops_ratio=0.6)
    planned = iterative.schedule()
    assert [p for p, _ in planned] == [0.125, 0.25, 0.375, 0.5]
    assert [t for _, t in planned] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    oneshot, _ = method_for("group_sl", target_flops_ratio=0.6, tp_prune_at=0.4)
    assert oneshot.schedule() == [(0.4, 0.6)]


def backward(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(torch.randn(8, *SHAPE)), torch.randint(0, 10, (8,))).backward()


def test_group_sl_adds_its_regulariser_to_the_gradients_until_the_cut():
    method, model = method_for("group_sl", tp_reg=1e-2)
    method.prepare(model, RunContext(torch.device("cpu"), lambda: [], total_epochs=2, steps_per_epoch=10))
    backward(model, 0)
    plain = model.get_submodule("layer1.0.conv1").weight.grad.clone()
    method.before_step(model)
    assert not torch.allclose(model.get_submodule("layer1.0.conv1").weight.grad, plain)
    method.between_steps(model, 0.5, RunContext(torch.device("cpu"), lambda: [], 2, 10))  # the cut
    assert method.regularizer is None and len(method.cuts) == 1


def test_taylor_sums_the_gradients_of_the_batches_before_a_cut():
    method, model = method_for("taylor_iterative", tp_steps=1, tp_grad_batches=2)
    ctx = RunContext(torch.device("cpu"), lambda: [], total_epochs=1, steps_per_epoch=10)  # the cut at step 5
    method.prepare(model, ctx)
    weight, grads = model.get_submodule("layer1.0.conv1").weight, []
    for step in range(5):
        backward(model, step)
        grads.append(weight.grad.clone())
        method.before_step(model)
        if step < 4:
            assert method.between_steps(model, (step + 1) / 10, ctx) is model
    assert torch.allclose(method.grad_sum["layer1.0.conv1.weight"], grads[3] + grads[4])  # only the last two
    smaller = method.between_steps(model, 0.5, ctx)
    assert smaller is not model and method.grad_sum == {} and len(method.cuts) == 1


def test_a_resumed_run_rebuilds_the_cut_network():
    method, model = method_for("l1_oneshot", target_flops_ratio=0.6)
    local, record = method.cut_to(model, 0.6)
    small = method.shrink(model, local)
    method.cuts.append(record)
    again, _ = method_for("l1_oneshot", target_flops_ratio=0.6)
    again.load_state_dict(json.loads(json.dumps(method.state_dict())))  # as a checkpoint stores it
    rebuilt = again.restore_model()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    assert again.macs_ratio == pytest.approx(record["flops_ratio"]) and again.next_cut() is None


@pytest.mark.parametrize("recipe", ["l1_oneshot", "taylor_iterative", "group_sl"])
def test_each_recipe_trains_to_the_target_and_exports(tmp_path, recipe):
    assert REGISTRY["torch_pruning"] is TorchPruningMethod
    metrics = train(make_config({**TINY, "tp_recipe": recipe, "target_flops_ratio": 0.6, "out_dir": str(tmp_path),
                                 "name": recipe}))
    cuts = metrics["torch_pruning"]["cuts"]
    assert metrics["torch_pruning"]["recipe"] == recipe and len(cuts) == (4 if recipe == "taylor_iterative" else 1)
    assert [cut["progress"] for cut in cuts][-1] == pytest.approx(0.5)
    # Within 0.05: the widths Torch-Pruning's ranking can reach come in steps (0.56 then 0.65 on this network)
    assert abs(metrics["flops_ratio"] - 0.6) <= 0.05 and metrics["flops_ratio"] == pytest.approx(cuts[-1]["flops_ratio"])
    _, mask = load_mask(tmp_path / recipe / "mask.json")
    assert not mask.closed_blocks and all(len(kept) % 16 == 0 for kept in mask.kept_channels.values())
    if recipe == "l1_oneshot":  # one export is enough: the cut is the one every method's export makes
        report = run_export(ExportOptions(run=tmp_path / recipe, repository=tmp_path / "repository", samples=32))
        assert report["flops_ratio"] == pytest.approx(metrics["flops_ratio"])
        assert report["max_abs_diff_surgery"] <= 1e-4
