"""Training cost of the gates: time per step of the gated model (polarized method) vs the dense model.

    python -m bench.train_overhead [--config configs/<run>.yaml] [--quick] [--threads 2] [--rounds N]
                                   [--batch 128] [--model NAME --model-args JSON --image-size 224] [--out PATH]

One step = forward, task loss (+ the method's gate losses), backward, optimiser steps, as in
training/loop.py, on the same random batch for both models, interleaved. Without --config: the default
config (ResNet-20, Fashion-MNIST's 1x28x28, batch 128). The goal: at most 10% more per step than dense.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from polarprune.bench.timing import interleaved, summarize
from polarprune.common.atomicio import write_json
from polarprune.common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.common.results import provenance
from polarprune.training.config import load_config
from polarprune.training.data import FolderOptions, dataset_info
from polarprune.training.loop import make_optimizers, train_step
from polarprune.training.methods import RunContext, make_method
from polarprune.training.graph import trace_network
from polarprune.training.networks import NetworkInfo, build_network

GOAL_PERCENT = 5.0  # a gated step at most 1.05x a dense one (issue 13)
FULL = {"rounds": 30, "warmup": 3, "budget_s": 120.0}
QUICK = {"rounds": 3, "warmup": 1, "budget_s": 10.0}
PROGRESS = 0.5  # past the warm-up and before the freeze: every gate loss is active


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("python -m bench.train_overhead", __doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="training config (model, dataset, batch, "
                        "gate settings); its method is replaced by 'polarized'")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke runs)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved steps per model")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--model", default=None, help="the network instead of the config's (a built-in name or "
                        "pkg.mod:Class, e.g. tests.user_networks:MobileNetV2)")
    parser.add_argument("--model-args", type=json.loads, default=None, metavar="JSON",
                        help='keyword arguments of --model, e.g. \'{"width": 64}\'')
    parser.add_argument("--image-size", type=int, default=None,
                        help="square input size instead of the data set's (with --model: e.g. 224)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report (default reports/<config name>/train_overhead.json)")
    return parser.parse_args(argv)


def step_runner(model, images, labels, cfg, method):
    """One training step exactly as training/loop.py runs it (its own train_step)."""
    sgd, gate_sgd, scheduler = make_optimizers(model, cfg, total_steps=10**9)
    model.train()
    return lambda: train_step(model, method, sgd, gate_sgd, scheduler, images, labels, PROGRESS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, ["method=polarized"])
    except PolarpruneError as error:
        return fail("python -m bench.train_overhead", error)
    settings = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        settings["rounds"] = args.rounds
    batch = args.batch or cfg.batch_size
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = dataset_info(cfg.dataset, FolderOptions.from_config(cfg.to_dict()))  # image_folder: its image_size
    model = args.model or cfg.model
    in_channels = 3 if args.model else info.in_channels  # a network of users' images (RGB)
    input_size = (args.image_size, args.image_size) if args.image_size else tuple(info.input_size)
    network_info = NetworkInfo(model, in_channels, info.num_classes, input_size,
                               args.model_args if args.model_args is not None else cfg.model_args)
    graph = trace_network(build_network(network_info), network_info.example_input())
    images = torch.randn(batch, in_channels, *input_size)
    labels = torch.randint(0, info.num_classes, (batch,))

    method = make_method(cfg, graph)
    gated = method.build_model()
    method.prepare(gated, RunContext(torch.device("cpu"), lambda: [], total_epochs=1, steps_per_epoch=1))
    dense_method = make_method(load_config(args.config, ["method=dense"]), graph)
    runners = {"dense": step_runner(dense_method.build_model(), images, labels, cfg, dense_method),
               "gated": step_runner(gated, images, labels, cfg, method)}
    times = interleaved(runners, **settings)
    dense, gated_time = summarize(times["dense"]), summarize(times["gated"])
    overhead = (gated_time["median_ms"] / dense["median_ms"] - 1) * 100
    name = args.config.stem if args.config else "default"
    report = {"config": name, "model": model, "dataset": cfg.dataset, "batch": batch,
              "input_shape": [in_channels, *input_size], "threads": args.threads,
              "mode": "quick" if args.quick else "full", **settings,
              "dense": dense, "gated": gated_time, "overhead_percent": overhead,
              "goal_percent": GOAL_PERCENT, "within_goal": overhead <= GOAL_PERCENT, "provenance": provenance()}
    print(f"{model} on {in_channels}x{input_size[0]}x{input_size[1]} input, batch {batch}, {args.threads} threads, "
          f"{dense['n']} interleaved steps each")
    print(f"dense  step: median {dense['median_ms']:.1f} ms (p95 {dense['p95_ms']:.1f})")
    print(f"gated  step: median {gated_time['median_ms']:.1f} ms (p95 {gated_time['p95_ms']:.1f})")
    print(f"overhead {overhead:+.1f}% per step (goal: at most {GOAL_PERCENT:.0f}%)")
    out = args.out or Path("reports") / name / "train_overhead.json"
    write_json(out, report)
    print(f"wrote {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
