"""Latency-targeted against FLOPs-targeted pruning, at equal measured latency.

    python -m bench.latency_target [--config configs/fmnist_resnet20.yaml] [--target-flops 0.5] [--quick]
                                   [--runs runs/latency_target] [--out docs/results/latency_target.json]

1. Train the config FLOPs-targeted at --target-flops (`training.loop.train`), export its dense and pruned
   network to ONNX and time them interleaved on onnxruntime (2 threads, batch 1, no spinning): their
   latency ratio r.
2. Train the same config with `cost: latency` at `target_latency_ratio: r`.
3. Time dense, FLOPs-pruned and latency-pruned interleaved in one measurement and write, per run,
   accuracy, kept FLOPs, predicted latency ratio (the latency run's table prices both masks) and measured
   latency ratio. Each training run takes minutes; --quick trains a tiny budget (smoke runs only, written
   beside the runs, never to docs/results).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from polarprune.bench import BenchError
from polarprune.bench.timing import time_onnx
from polarprune.common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.common.results import provenance, write_result
from polarprune.export.onnx_export import export_onnx
from polarprune.training.config import load_config
from polarprune.training.gating import cut, mask_cost
from polarprune.training.graph import trace_network
from polarprune.training.latency import LatencyCost, LatencyTable
from polarprune.training.loop import train
from polarprune.training.mask import load_mask
from polarprune.training.networks import NetworkInfo, build_network

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m bench.latency_target"
QUICK = ["epochs=1", "train_subset=1024", "test_subset=500", "val_size=0", "freeze_fraction=1.0"]
THREADS, BATCH = 2, 1


def parse_args(argv: list[str] | None = None):
    parser = cli_parser(PROG, __doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fmnist_resnet20.yaml")
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="tiny training budget, few timing rounds (smoke)")
    parser.add_argument("--runs", type=Path, default=None, help="folder of the two runs (default "
                        "runs/latency_target, or runs/latency_target_quick with --quick)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default docs/results/"
                        "latency_target.json; with --quick: <runs>/latency_target.json)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 2000, "
                        "200 with --quick)")
    args = parser.parse_args(argv)
    args.runs = args.runs or ROOT / "runs" / ("latency_target_quick" if args.quick else "latency_target")
    args.out = args.out or (args.runs / "latency_target.json" if args.quick
                            else ROOT / "docs" / "results" / "latency_target.json")
    args.rounds = args.rounds or (200 if args.quick else 2000)
    return args


def run(args, name: str, overrides: list[str]) -> dict:
    """Train one run into <runs>/<name> (fresh) and return its metrics."""
    extra = (QUICK if args.quick else []) + [f"out_dir={args.runs}", f"name={name}", "progress=false"]
    print(f"== training {name}: {' '.join(overrides)}", flush=True)
    return train(load_config(args.config, overrides + extra))


def time_pruned(args, names: list[str]) -> dict[str, float]:
    """Median batch-1 ms of the dense network and of each run's cut network, all interleaved."""
    document, _ = load_mask(args.runs / names[0] / "mask.json")
    info = NetworkInfo.from_dict(document["network"])
    graph = trace_network(build_network(info), info.example_input())
    folder = args.runs / "onnx"
    models = {"dense": graph.module} | {name: cut(graph, load_mask(args.runs / name / "mask.json")[1], graph.module)
                                        for name in names}
    paths = {}
    for role, model in models.items():
        paths[role] = folder / f"{role}.onnx"
        export_onnx(model, paths[role], info.input_shape)
    summaries, _ = time_onnx(paths, THREADS, (BATCH,), args.rounds, warmup=10)
    return {role: summary["median_ms"] for role, summary in summaries[BATCH].items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        flops_run = run(args, "flops", ["cost=flops", f"target_flops_ratio={args.target_flops}"])
        first = time_pruned(args, ["flops"])
        ratio = first["flops"] / first["dense"]
        print(f"== FLOPs-targeted run: measured latency ratio {ratio:.3f}", flush=True)
        latency_run = run(args, "latency", ["cost=latency", f"target_latency_ratio={ratio:.4f}"])
        times = time_pruned(args, ["flops", "latency"])
        table = LatencyTable.from_dict(json.loads((args.runs / "latency" / "latency_table.json").read_text()),
                                       "latency_table.json")
    except PolarpruneError as error:
        return fail(PROG, error)
    except (OSError, KeyError, ValueError) as error:
        return fail(PROG, BenchError(f"{type(error).__name__}: {error}"))
    document, _ = load_mask(args.runs / "latency" / "mask.json")
    info = NetworkInfo.from_dict(document["network"])
    cost = LatencyCost(trace_network(build_network(info), info.example_input()), table)
    rows = {}
    for name, metrics in (("flops", flops_run), ("latency", latency_run)):
        mask = load_mask(args.runs / name / "mask.json")[1]
        rows[name] = {"test_accuracy": metrics["test_accuracy"], "flops_ratio": metrics["flops_ratio"],
                      "predicted_latency_ratio": mask_cost(cost, mask) / cost.dense,
                      "measured_latency_ratio": times[name] / times["dense"], "pruned_ms": times[name]}
    rows["latency"]["in_run_latency"] = latency_run["latency"]
    result = {"config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
              "quick": args.quick, "target_flops_ratio": args.target_flops, "target_latency_ratio": ratio,
              "threads": THREADS, "batch": BATCH, "rounds": args.rounds, "dense_ms": times["dense"],
              "runs": rows, "note": "one shared 2-core machine: ratios from interleaved medians; absolute "
                                    "times drift with the load"}
    write_result(args.out, result, {PROG: provenance()})
    for name, row in rows.items():
        print(f"{name:>8}-targeted: accuracy {row['test_accuracy']:.4f}, kept FLOPs {row['flops_ratio']:.3f}, "
              f"latency ratio predicted {row['predicted_latency_ratio']:.3f} measured "
              f"{row['measured_latency_ratio']:.3f}")
    print(f"wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
