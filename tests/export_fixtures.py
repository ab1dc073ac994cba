"""Synthetic finished runs for export tests.

`make_run` lays out a run folder the way a finished training run does (network.pt, mask.json,
metrics.json), from a gated model with random kept channels, chosen closed
blocks and randomised BatchNorm statistics and affine terms, so equivalence checks are not trivial.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from polarprune.training.data.registry import DATASETS, dataset_info
from polarprune.training.gating import GatedNetwork, full_mask, mask_problem
from polarprune.training.graph import NetworkGraph, trace_network
from polarprune.training.mask import Mask, mask_document, save_mask
from polarprune.training.network_file import NETWORK_FILE, save_network
from polarprune.training.networks import NetworkInfo, build_network


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """Import into a test module to run its tensors on one thread: these networks are tiny, and on a
    busy 2-core machine two spinning intra-op threads per process cost 3-5x in wall time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _of_unit(group: str, units) -> bool:
    """A group belongs to a unit named in a test: the group itself, or a module under that path
    ("layer3.0" holds the group "layer3.0.conv1", "features.5" the group "features.5.conv")."""
    return any(group == unit or group.startswith(f"{unit}.") for unit in units)


def random_mask(graph: NetworkGraph, generator: torch.Generator, round_to: int = 4, closed_blocks=(),
                one_channel=(), round_to_width=()) -> Mask:
    """Random kept channels: groups of `one_channel` units keep 1, of `round_to_width` units exactly
    round_to, others a random multiple of round_to (some keep everything); `closed_blocks` close."""
    gone = {g for block in closed_blocks for g in graph.groups_inside(block)}
    kept: dict[str, list[int]] = {}
    for name, group in graph.prunable().items():
        if name in gone:
            continue
        width = group.width
        if _of_unit(name, one_channel):
            count = 1
        elif _of_unit(name, round_to_width):
            count = min(round_to, width)
        else:
            steps = max(1, width // round_to)
            count = min(width, round_to * int(torch.randint(1, steps + 1, (1,), generator=generator)))
        kept[name] = sorted(torch.randperm(width, generator=generator)[:count].tolist())
    return Mask(kept, sorted(closed_blocks))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator, input_shape: tuple[int, ...]) -> None:
    """Random BN affine terms, then running statistics measured on random inputs (so activations neither
    die nor explode), then jittered: every BN entry differs from its default and matters."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batchnorms:
            bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.2 + 0.1)
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        model(torch.randn(16, *input_shape, generator=generator))
        model.eval()
        for bn in batchnorms:
            bn.momentum = 0.1
            bn.running_mean.add_(torch.randn(bn.num_features, generator=generator) * 0.05)
            bn.running_var.mul_(torch.rand(bn.num_features, generator=generator) * 0.2 + 0.9)


def network_info(model_name: str = "resnet20", input_size=(16, 16), in_channels: int = 1,
                 num_classes: int = 10) -> NetworkInfo:
    return NetworkInfo(model_name, in_channels, num_classes, tuple(input_size))


def trained_model(model_name: str = "resnet20", input_size=(16, 16), in_channels: int = 1,
                  num_classes: int = 10, seed: int = 0, gated: bool = True, dynamic: bool = False,
                  **mask_options) -> tuple[nn.Module, Mask, dict, NetworkGraph]:
    """(model with gates frozen to its mask, or the plain network; the mask; its mask.json document; the
    network's trace); no files written."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    info = network_info(model_name, input_size, in_channels, num_classes)
    graph = trace_network(build_network(info), info.example_input())
    if gated:
        model = GatedNetwork(graph, 2.0, dynamic, round_to=1)  # a gate per channel: any mask fits it
        mask = random_mask(graph, generator, **mask_options)
        model.freeze(mask)
    else:
        model, mask = graph.module, full_mask(graph)
    randomize_batchnorm(model, generator, info.input_shape)
    document = mask_document(mask, mask_problem(graph), info.describe(), mask_options.get("round_to", 4))
    return model.eval(), mask, document, graph


def make_run(run_dir: str | Path, model_name: str = "resnet20", input_size=(16, 16), in_channels: int = 1,
             num_classes: int = 10, seed: int = 0, gated: bool = True, dynamic: bool = False,
             dataset: str = "fashion_mnist", **mask_options) -> Path:
    """Write network.pt, mask.json and metrics.json of a finished synthetic run; returns run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, mask, document, graph = trained_model(model_name, input_size, in_channels, num_classes, seed, gated,
                                                 dynamic, **mask_options)
    method = "polarized" if gated else "dense"
    known = dataset_info(dataset) if dataset in DATASETS else None
    normalization = ({"mean": list(known.mean), "std": list(known.std)}
                     if known is not None and known.in_channels == in_channels
                     else {"mean": [0.5] * in_channels, "std": [0.5] * in_channels})
    plain = model.plain() if gated else model
    save_network(run_dir / NETWORK_FILE, plain, network_info(model_name, input_size, in_channels, num_classes), mask,
                 method, {"dataset": dataset, "data_dir": None, "seed": seed}, normalization, {})
    save_mask(run_dir / "mask.json", document)
    metrics = {"dataset": dataset, "model": model_name, "method": method, "test_accuracy": 0.1,
               **{k: document[k] for k in ("dense_flops", "pruned_flops", "flops_ratio")}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir
