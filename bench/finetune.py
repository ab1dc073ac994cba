"""From scratch or from trained weights? One-pass polarized training at the default target, both ways.

    python -m bench.finetune [--dense-run runs/fmnist_resnet20_dense] [--out docs/results/finetune.json]

Runs `configs/fmnist_resnet20.yaml` (random start) and `configs/fmnist_resnet20_finetune.yaml` (starting
from the dense reference run's weights, which `make train` writes) at the same number of epochs, on the
same data and seed, and writes accuracy, kept FLOPs and training time of both, with the dense reference
beside them. Runs that already finished in --out-dir are read, not repeated.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.results import provenance, write_result
from training.config import ConfigError, load_config
from training.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"from_scratch": ROOT / "configs" / "fmnist_resnet20.yaml",
           "fine_tune": ROOT / "configs" / "fmnist_resnet20_finetune.yaml"}
KEYS = ("test_accuracy", "flops_ratio", "params_ratio", "train_seconds", "epochs")


def run(name: str, overrides: list[str], out_dir: Path) -> dict:
    metrics_path = out_dir / name / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    cfg = load_config(CONFIGS[name], [*overrides, f"out_dir={out_dir}", f"name={name}", "progress=false"])
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--dense-run", type=Path, default=ROOT / "runs" / "fmnist_resnet20_dense",
                        help="finished dense reference run whose weights the fine-tune starts from")
    parser.add_argument("--init-weights", type=Path,
                        help="the weights the fine-tune starts from (default: the dense run's checkpoint.pt)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "finetune_bench")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "finetune.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key in both configs (e.g. epochs=1 for a smoke run)")
    args = parser.parse_args(argv)
    dense_metrics = args.dense_run / "metrics.json"
    if not dense_metrics.is_file():
        print(f"error: {dense_metrics} not found: train the dense reference first (make train)", file=sys.stderr)
        return 2
    try:
        results = {"from_scratch": run("from_scratch", args.overrides, args.out_dir),
                   "fine_tune": run("fine_tune", [*args.overrides, "init_weights="
                                                  f"{args.init_weights or args.dense_run / 'checkpoint.pt'}"], args.out_dir)}
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dense = json.loads(dense_metrics.read_text())
    report = {"dense": {k: dense.get(k) for k in KEYS},
              **{name: {k: metrics.get(k) for k in KEYS} for name, metrics in results.items()}}
    for name in CONFIGS:
        gap = report["dense"]["test_accuracy"] - report[name]["test_accuracy"]
        print(f"{name:>12}: accuracy {report[name]['test_accuracy']:.4f} ({gap * 100:+.2f} pt below dense), "
              f"kept FLOPs {report[name]['flops_ratio']:.3f}, {report[name]['train_seconds']:.0f} s")
    write_result(args.out, report, {"python -m bench.finetune": provenance()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
