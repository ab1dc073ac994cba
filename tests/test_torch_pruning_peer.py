"""The Torch-Pruning peer of `make compare` (bench/torch_pruning_peer.py): its shortcut stand-in is exact,
its pruner edits the channel map correctly, and a tiny run prunes, fine-tunes and exports."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from polarprune.bench.torch_pruning_peer import ChannelMapPruner, ChannelMapShortcut, replace_pad_shortcuts
from polarprune.training.arch import make_spec
from polarprune.training.models import PadShortcut, build_model

needs_torch_pruning = pytest.mark.skipif(
    importlib.util.find_spec("torch_pruning") is None,
    reason="torch_pruning is a benchmark-only dependency: pip install -r requirements-bench.txt (make compare does)")


def test_channel_map_shortcut_is_the_pad_shortcut():
    torch.manual_seed(0)
    model = build_model(make_spec("resnet20", 1, 10, (28, 28))).eval()
    images = torch.randn(4, 1, 28, 28)
    expected = model(images)
    assert replace_pad_shortcuts(model) == 2  # layer2.0 and layer3.0
    assert not any(isinstance(m, PadShortcut) for m in model.modules())
    assert torch.equal(model(images), expected)


@needs_torch_pruning
def test_channel_map_pruner_drops_outputs_and_zeroes_lost_inputs():
    shortcut = ChannelMapShortcut.from_pad(PadShortcut(4, 8, 1), 4)  # source [-1, -1, 0, 1, 2, 3, -1, -1]
    x = torch.arange(1.0, 5.0).reshape(1, 4, 1, 1)
    pruner = ChannelMapPruner()
    pruner.prune_out_channels(shortcut, [0, 7])            # two zero channels go
    pruner.prune_in_channels(shortcut, [1])                # input 1 goes: its output now carries zeros
    assert pruner.get_out_channels(shortcut) == 6 and pruner.get_in_channels(shortcut) == 3
    kept_inputs = x[:, [0, 2, 3]]
    assert shortcut(kept_inputs).flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 4.0, 0.0]


@needs_torch_pruning
def test_tiny_peer_run_prunes_to_the_target_and_exports(tmp_path):
    from polarprune.bench.torch_pruning_peer import run_config, train_peer

    cfg = run_config("configs/fmnist_resnet20.yaml",
                     ["epochs=2", "batch_size=64", "train_subset=256", "val_size=64", "test_subset=200",
                      "progress=false"], tmp_path)
    metrics = train_peer(cfg, target_flops=0.5)
    run_dir = tmp_path / "torch_pruning"
    assert json.loads((run_dir / "metrics.json").read_text())["config"] == cfg.to_dict()
    assert (run_dir / "pruned.onnx").stat().st_size > 0
    assert metrics["pruning"]["epoch"] == 1                       # dense for half the epochs
    assert abs(metrics["flops_ratio"] - 0.5) < 0.1 and metrics["params_ratio"] < 1.0
    # round_to=16: every pruned width stays on onnxruntime's 16-channel blocks
    assert all(width % 16 == 0 for width in metrics["widths"].values()), metrics["widths"]
    assert metrics["max_abs_diff_onnx"] < 1e-3
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
