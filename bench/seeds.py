"""Accuracy over seeds: the default polarized run against its dense reference, mean gap and spread.

    for s in 0 1 2; do python -m training --config configs/fmnist_resnet20.yaml --set seed=$s --set name=fmnist_resnet20_seed$s
                       python -m training --config configs/fmnist_resnet20_dense.yaml --set seed=$s --set name=fmnist_resnet20_dense_seed$s; done
    python -m bench.seeds --runs runs [--out docs/results/seeds.json]

Reads the finished run folders `<run>_seed<s>` and `<run>_dense_seed<s>` and writes, per seed, test
accuracy, kept FLOPs (before and after the move into the target band) and training time of both, with
the mean accuracy gap and its standard deviation over seeds.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench import BenchError
from common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from common.results import provenance, write_result

ROOT = Path(__file__).resolve().parents[1]


def _metrics(path: Path) -> dict:
    if not path.is_file():
        raise BenchError(f"{path} not found: that run has not finished (see python -m bench.seeds --help)")
    return json.loads(path.read_text())


def collect(runs: Path, run: str, seeds: list[int]) -> dict:
    rows = []
    for seed in seeds:
        polarized = _metrics(runs / f"{run}_seed{seed}" / "metrics.json")
        dense = _metrics(runs / f"{run}_dense_seed{seed}" / "metrics.json")
        projection = polarized.get("projection") or {}
        rows.append({"seed": seed, "polarized_accuracy": polarized["test_accuracy"],
                     "dense_accuracy": dense["test_accuracy"],
                     "gap_points": 100 * (dense["test_accuracy"] - polarized["test_accuracy"]),
                     "flops_ratio": polarized["flops_ratio"],
                     "learned_flops_ratio": projection.get("learned_flops_ratio"),
                     "polarized_train_seconds": polarized["train_seconds"],
                     "dense_train_seconds": dense["train_seconds"]})
    gaps = [row["gap_points"] for row in rows]
    return {"run": run, "seeds": rows, "mean_gap_points": statistics.mean(gaps),
            "stdev_gap_points": statistics.stdev(gaps) if len(gaps) > 1 else None,
            "mean_polarized_accuracy": statistics.mean(r["polarized_accuracy"] for r in rows),
            "mean_dense_accuracy": statistics.mean(r["dense_accuracy"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("python -m bench.seeds", __doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--run", default="fmnist_resnet20")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "seeds.json")
    args = parser.parse_args(argv)
    try:
        result = collect(args.runs, args.run, [int(s) for s in args.seeds.split(",")])
    except (PolarpruneError, KeyError, ValueError) as error:
        return fail("python -m bench.seeds", error if isinstance(error, PolarpruneError) else BenchError(str(error)))
    write_result(args.out, result, {"python -m bench.seeds": provenance()})
    for row in result["seeds"]:
        print(f"seed {row['seed']}: polarized {row['polarized_accuracy']:.4f}, dense {row['dense_accuracy']:.4f}, "
              f"gap {row['gap_points']:.2f} pt, kept FLOPs {row['flops_ratio']:.3f}")
    spread = f" (sd {result['stdev_gap_points']:.2f})" if result["stdev_gap_points"] is not None else ""
    print(f"mean gap {result['mean_gap_points']:.2f} points{spread}; wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
