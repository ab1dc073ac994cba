"""Torch-Pruning as a peer: L1 magnitude, global, round_to=16, pruned once in the middle of the run.

    python -m bench.torch_pruning_peer [--config configs/fmnist_resnet20.yaml] [--set key=value ...]
                                       [--runs runs/compare] [--target-flops 0.487]

The library users would pick instead of polarprune (VainF/Torch-Pruning 1.6.1, a benchmark-only
dependency: requirements-bench.txt). Same network, data, seed and epoch budget as the polarized run:
dense for the first half of the epochs, one global prune to the target kept MACs, then fine-tuning
for the rest with the cosine schedule continuing where it was (fresh momentum, as after any resize).
Into <runs>/torch_pruning/: metrics.json (compare.py's row keys), log.jsonl and pruned.onnx, exported
and checked against torch by export's own ONNX exporter.

Option-A shortcuts (`PadShortcut`: subsample, then zero channels) are functions Torch-Pruning cannot
trace through (its pruner fails with an IndexError), so they are swapped for `ChannelMapShortcut`, the
same function written as an explicit channel map, which `ChannelMapPruner` edits. The network keeps its
weight-free shortcuts; a 1x1-conv shortcut would have changed the network being compared.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from polarprune.bench import BenchError
from polarprune.common.atomicio import write_json, write_text
from polarprune.common.cli import EXIT_FAILED, EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.common.energy import EnergyMeter
from polarprune.common.results import provenance
from polarprune.export.onnx_export import count_onnx_macs, export_onnx, validate_with_onnxruntime
from polarprune.training.config import TrainConfig, load_config, make_config
from polarprune.training.flops import count_macs, count_params
from polarprune.training.loop import add_energy, evaluate, make_optimizers, seed_and_load, train_step
from polarprune.training.graph import trace_network
from polarprune.training.methods import RunContext, make_method
from polarprune.training.networks import NetworkInfo, build_network
from polarprune.training.models import PadShortcut

try:
    import torch_pruning as tp
except ImportError:  # benchmark-only dependency
    tp = None

NAME = "torch_pruning"
LABEL = "Torch-Pruning (L1, global, round 16)"
INSTALL_HINT = "pip install -r requirements-bench.txt (make compare does it)"
RATIO_GRID = tuple(round(0.01 * i, 2) for i in range(1, 96))  # global pruning ratios tried, 0.01-0.95


class PeerError(BenchError):
    """The peer cannot run as asked: Torch-Pruning missing, or a config it cannot follow (exit code 2)."""


class PeerCheckError(PeerError):
    """The pruned network failed a check (exit code 1)."""
    exit_code = EXIT_FAILED


class ChannelMapShortcut(nn.Module):
    """Output channel o is input channel source[o] (subsampled by the stride), or zero where source[o] < 0.

    With source = [-1]*before + [0..in-1] + [-1]*after it is PadShortcut exactly; unlike PadShortcut a
    pruner can delete output channels and inputs from it. Exports as Concat + Gather."""

    def __init__(self, in_channels: int, stride: int, source: torch.Tensor):
        super().__init__()
        self.in_channels, self.stride = in_channels, stride
        self.register_buffer("source", source.clone().long())

    @classmethod
    def from_pad(cls, pad: PadShortcut, in_channels: int) -> ChannelMapShortcut:
        before = pad.extra // 2
        source = torch.cat([torch.full((before,), -1), torch.arange(in_channels),
                            torch.full((pad.extra - before,), -1)])
        return cls(in_channels, pad.stride, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        with_zero = torch.cat([x, torch.zeros_like(x[:, :1])], 1)  # channel `in_channels` is the zero one
        return with_zero.index_select(1, torch.where(self.source < 0, self.in_channels, self.source))


def _channel_map_pruner_base():
    return tp.pruner.BasePruningFunc if tp is not None else object


class ChannelMapPruner(_channel_map_pruner_base()):
    """Torch-Pruning's handle on ChannelMapShortcut. Inputs and outputs are pruned independently (as for a
    conv): outputs belong to the next stage's residual stream, inputs to the previous stage's."""

    def prune_out_channels(self, layer: ChannelMapShortcut, idxs) -> ChannelMapShortcut:
        keep = sorted(set(range(len(layer.source))) - set(int(i) for i in idxs))
        layer.source = layer.source[keep]
        return layer

    def prune_in_channels(self, layer: ChannelMapShortcut, idxs) -> ChannelMapShortcut:
        removed = set(int(i) for i in idxs)
        renumber = torch.full((layer.in_channels,), -1, dtype=torch.long)
        kept = [i for i in range(layer.in_channels) if i not in removed]
        renumber[kept] = torch.arange(len(kept))
        # An output whose input channel is gone carries zeros, as a conv would without that input.
        layer.source = torch.where(layer.source < 0, layer.source, renumber[layer.source.clamp(min=0)])
        layer.in_channels = len(kept)
        return layer

    def get_out_channels(self, layer: ChannelMapShortcut) -> int:
        return len(layer.source)

    def get_in_channels(self, layer: ChannelMapShortcut) -> int:
        return layer.in_channels


def replace_pad_shortcuts(model: nn.Module) -> int:
    """Swap every PadShortcut for the equivalent ChannelMapShortcut; returns how many."""
    swapped = 0
    for module in model.modules():
        shortcut = getattr(module, "shortcut", None)
        if isinstance(shortcut, PadShortcut):
            in_channels = module.conv1.in_channels if hasattr(module, "conv1") else None
            if in_channels is None:
                raise PeerError("a closed block's pad shortcut: the peer prunes a dense network only")
            module.shortcut = ChannelMapShortcut.from_pad(shortcut, in_channels)
            swapped += 1
    return swapped


def require_torch_pruning() -> None:
    if tp is None:
        raise PeerError(f"Torch-Pruning is not installed: {INSTALL_HINT}")


def l1_pruner(model: nn.Module, example: torch.Tensor, ratio: float, round_to: int | None):
    return tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
        pruning_ratio=ratio, round_to=round_to, ignored_layers=[model.fc],
        customized_pruners={ChannelMapShortcut: ChannelMapPruner()})


def prune_to_macs(model: nn.Module, example: torch.Tensor, target: float, round_to: int | None) -> tuple[float, float]:
    """Prune `model` in place once, with the global ratio whose kept MACs come closest to `target`.
    Returns (ratio, kept MACs ratio). A scan on copies, not a bisection: with round_to the kept MACs
    do not fall monotonically as the ratio grows (measured on ResNet-20: 0.524 at 0.40, 0.590 at 0.475)."""
    shape = tuple(example.shape[1:])
    dense_macs = count_macs(model, shape)

    def kept_after(ratio: float) -> float:
        trial = copy.deepcopy(model)
        l1_pruner(trial, example, ratio, round_to).step()
        return count_macs(trial, shape) / dense_macs

    tried = {ratio: kept_after(ratio) for ratio in RATIO_GRID}
    ratio = min(tried, key=lambda r: (abs(tried[r] - target), r))
    l1_pruner(model, example, ratio, round_to).step()
    return ratio, count_macs(model, shape) / dense_macs


def run_config(config: Path, overrides: list[str], runs: Path) -> TrainConfig:
    return make_config({**load_config(config, overrides).to_dict(), "method": "dense", "name": NAME,
                        "out_dir": str(runs)})


def train_peer(cfg: TrainConfig, target_flops: float | None = None) -> dict:
    """Train, prune, fine-tune and export; returns (and writes) metrics.json. `cfg.method` must be dense:
    the first half is exactly the dense run (same seed, same order of random draws)."""
    require_torch_pruning()
    if cfg.method != "dense":
        raise PeerError(f"the peer trains from a dense config (method: dense), not {cfg.method!r}")
    if cfg.epochs < 2:
        raise PeerError(f"epochs: {cfg.epochs}; the peer needs at least 2 (dense half, then fine-tuning)")
    target = cfg.target_flops_ratio if target_flops is None else target_flops
    run_dir = Path(cfg.out_dir) / cfg.name
    device = torch.device("cpu")
    data = seed_and_load(cfg, device)
    info, train_batches, val_batches, test_batches = data.info, data.train, data.val, data.test
    # The network itself (PadShortcut modules and all, for the custom pruner), built with the same random
    # draws the dense run makes; the dense method only supplies the loop's hooks (it adds nothing).
    network_info = NetworkInfo(cfg.model, info.in_channels, info.num_classes, tuple(info.input_size))
    model = build_network(network_info).to(device)
    method = make_method(cfg, trace_network(model, network_info.example_input()))
    ctx = RunContext(device, lambda: val_batches.epoch(0), cfg.epochs, len(train_batches))
    method.prepare(model, ctx)
    dense_macs, dense_params = count_macs(model, network_info.input_shape), count_params(model)
    steps, total_steps = len(train_batches), cfg.epochs * len(train_batches)
    prune_epoch = cfg.epochs // 2
    sgd, gate_sgd, scheduler = make_optimizers(model, cfg, total_steps)
    history, train_seconds, energy, pruning = [], 0.0, None, {}
    meter = EnergyMeter(scope="training steps")
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        meter.start()
        if epoch == prune_epoch:
            model.eval()
            replace_pad_shortcuts(model)
            example = torch.zeros(1, info.in_channels, *info.input_size)
            ratio, kept = prune_to_macs(model, example, target, cfg.round_to)
            pruning = {"epoch": epoch, "pruning_ratio": ratio, "flops_ratio": kept, "target_flops_ratio": target,
                       "seconds": time.perf_counter() - started}
            print(json.dumps({"pruned": pruning}), flush=True)
            sgd, gate_sgd, scheduler = make_optimizers(model, cfg, total_steps, epoch * steps)
        model.train()
        for step, (images, labels) in enumerate(train_batches.epoch(epoch)):
            train_step(model, method, sgd, gate_sgd, scheduler, images, labels, (epoch * steps + step) / total_steps)
        train_seconds += time.perf_counter() - started
        energy = add_energy(energy, meter.stop(), ctx.cluster)
        accuracy, loss = evaluate(model, test_batches.epoch(0), device)
        history.append({"epoch": epoch + 1, "test_accuracy": accuracy, "test_loss": loss,
                        "kept_flops": count_macs(model, network_info.input_shape) / dense_macs, "lr": scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - started})
        print(json.dumps(history[-1]), flush=True)
        write_text(run_dir / "log.jsonl", "".join(json.dumps(row) + "\n" for row in history))

    model.eval()
    images = torch.cat([images for images, _ in test_batches.epoch(0)])[:512]
    onnx_path = run_dir / "pruned.onnx"
    export_onnx(model, onnx_path, tuple(images.shape[1:]))
    onnx_diff, _ = validate_with_onnxruntime(onnx_path, model, images)
    pruned_macs, onnx_macs = count_macs(model, network_info.input_shape), count_onnx_macs(onnx_path)
    if onnx_macs != pruned_macs:
        raise PeerCheckError(f"{onnx_path}: the graph counts {onnx_macs} MACs, the torch network {pruned_macs}")
    flops_ratio = pruned_macs / dense_macs
    dense_epochs = prune_epoch
    metrics = {
        "dataset": cfg.dataset, "model": cfg.model, "method": NAME, "epochs": cfg.epochs,
        "test_accuracy": history[-1]["test_accuracy"], "dense_flops": dense_macs, "pruned_flops": pruned_macs,
        "flops_ratio": flops_ratio, "dense_params": dense_params, "pruned_params": count_params(model),
        "params_ratio": count_params(model) / dense_params, "train_seconds": train_seconds,
        "train_flops_ratio": (dense_epochs + (cfg.epochs - dense_epochs) * flops_ratio) / cfg.epochs,
        "train_energy": energy.to_dict() if energy is not None else None,
        # the distribution's version: the module's __version__ says 1.6.0 in the 1.6.1 wheel
        "pruning": pruning, "torch_pruning": importlib.metadata.version("torch-pruning"), "max_abs_diff_onnx": onnx_diff,
        "widths": {name: module.out_channels for name, module in model.named_modules()
                   if isinstance(module, nn.Conv2d)},
        "config": cfg.to_dict(), "provenance": provenance(),
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("python -m bench.torch_pruning_peer", __doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/fmnist_resnet20.yaml"),
                        help="the shared budget (its method key is replaced by dense)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"), help="the run folder goes here")
    parser.add_argument("--target-flops", type=float,
                        help="kept MACs to prune to (default: the config's target_flops_ratio)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = train_peer(run_config(args.config, args.overrides, args.runs), args.target_flops)
    except PolarpruneError as error:  # Torch-Pruning missing, a bad config, a failed export check
        return fail("python -m bench.torch_pruning_peer", error)
    print(f"test accuracy {metrics['test_accuracy']:.4f}, kept MACs {metrics['flops_ratio']:.3f}, "
          f"params {metrics['params_ratio']:.3f}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
