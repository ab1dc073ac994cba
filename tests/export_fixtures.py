"""Synthetic finished runs for export tests.

`make_run` lays out a run folder the way a finished training run does (checkpoint.pt with gates frozen
to the mask, mask.json, metrics.json), from a gated model with random kept channels, chosen closed
blocks and randomised BatchNorm statistics and affine terms, so equivalence checks are not trivial.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from training.arch import make_spec, prunable_layers, residual_blocks
from training.checkpoint import save_checkpoint
from training.flops import layer_costs
from training.mask import Mask, mask_document, save_mask
from training.models import GateOptions, SpecNet, build_model


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """Import into a test module to run its tensors on one thread: these networks are tiny, and on a
    busy 2-core machine two spinning intra-op threads per process cost 3-5x in wall time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_mask(spec: dict, generator: torch.Generator, round_to: int = 4, closed_blocks=(),
                one_channel=(), round_to_width=()) -> Mask:
    """Random kept channels: `one_channel` units keep 1, `round_to_width` units keep exactly round_to,
    others a random multiple of round_to (some keep everything)."""
    kept: dict[str, list[int]] = {}
    for unit, width in prunable_layers(spec).items():
        if unit in closed_blocks:
            continue
        if unit in one_channel:
            count = 1
        elif unit in round_to_width:
            count = min(round_to, width)
        else:
            steps = max(1, width // round_to)
            count = min(width, round_to * int(torch.randint(1, steps + 1, (1,), generator=generator)))
        kept[unit] = sorted(torch.randperm(width, generator=generator)[:count].tolist())
    return Mask(kept, sorted(closed_blocks))


def randomize_batchnorm(model: SpecNet, generator: torch.Generator) -> None:
    """Random BN affine terms, then running statistics measured on random inputs (so activations neither
    die nor explode), then jittered: every BN entry differs from its default and matters."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batchnorms:
            bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.2 + 0.1)
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        model(torch.randn(16, model.spec["in_channels"], *model.spec["input_size"], generator=generator))
        model.eval()
        for bn in batchnorms:
            bn.momentum = 0.1
            bn.running_mean.add_(torch.randn(bn.num_features, generator=generator) * 0.05)
            bn.running_var.mul_(torch.rand(bn.num_features, generator=generator) * 0.2 + 0.9)


def freeze_gates(model: SpecNet, mask: Mask) -> None:
    """Gates as a finished run leaves them: channel gates 1 on kept channels, block gates 0 when closed."""
    gates = model.gates()
    for unit in prunable_layers(model.spec):
        if unit in mask.kept_channels:
            values = torch.zeros(gates[f"{unit}.gate"].width)
            values[mask.kept_channels[unit]] = 1.0
            gates[f"{unit}.gate"].freeze(values)
    for unit in residual_blocks(model.spec):
        gates[f"{unit}.block_gate"].freeze(torch.tensor([0.0 if unit in mask.closed_blocks else 1.0]))


def trained_model(model_name: str = "resnet20", input_size=(16, 16), in_channels: int = 1,
                  num_classes: int = 10, seed: int = 0, gated: bool = True, dynamic: bool = False,
                  **mask_options) -> tuple[SpecNet, Mask, dict]:
    """(model with frozen gates, its mask, its mask.json document); no files written."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spec = make_spec(model_name, in_channels, num_classes, tuple(input_size))
    model = build_model(spec, GateOptions(dynamic=dynamic) if gated else None)
    if gated:
        mask = random_mask(spec, generator, **mask_options)
        freeze_gates(model, mask)
        costs = layer_costs(model)
    else:
        mask = Mask({unit: list(range(w)) for unit, w in prunable_layers(spec).items()}, [])
        costs = layer_costs(build_model(spec, GateOptions()))
    randomize_batchnorm(model, generator)
    document = mask_document(model_name, spec, mask, costs, mask_options.get("round_to", 4))
    return model.eval(), mask, document


def make_run(run_dir: str | Path, model_name: str = "resnet20", input_size=(16, 16), in_channels: int = 1,
             num_classes: int = 10, seed: int = 0, gated: bool = True, dynamic: bool = False,
             dataset: str = "fashion_mnist", **mask_options) -> Path:
    """Write checkpoint.pt, mask.json and metrics.json of a finished synthetic run; returns run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, _, document = trained_model(model_name, input_size, in_channels, num_classes, seed, gated,
                                       dynamic, **mask_options)
    method = "polar" if gated else "dense"
    config = {"dataset": dataset, "data_dir": None, "model": model_name, "method": method, "seed": seed}
    save_checkpoint(run_dir / "checkpoint.pt", {
        "config": config, "spec": model.spec,
        "gates": {"init_score": 2.0, "dynamic": dynamic} if gated else None,
        "model": model.state_dict(), "epoch": 1})
    save_mask(run_dir / "mask.json", document)
    metrics = {"dataset": dataset, "model": model_name, "method": method, "test_accuracy": 0.1,
               **{k: document[k] for k in ("dense_flops", "pruned_flops", "flops_ratio")}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir
