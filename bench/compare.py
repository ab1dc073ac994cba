"""Side by side on one budget: dense, polarized (ours), activation density, FlipOut and Torch-Pruning.

    python -m bench.compare [--quick] [--config configs/fmnist_resnet20.yaml] [--set key=value ...]
                            [--methods dense,polarized,...] [--runs runs/compare] [--out reports/compare]
                            [--threads 2] [--reuse]
    make compare [COMPARE_ARGS="--quick"]

Every method trains with `training.loop.train` on the same config (only `method` and the run name differ)
into <runs>/<method>/ and is exported by the export library (`export.api.run`; Triton models go to
<runs>/model_repository, the dense run serving as every run's dense model). Torch-Pruning, the library
users would pick instead, trains in bench/torch_pruning_peer.py on the same config and prunes to the
polarized run's kept MACs. The exported ONNX models are timed with onnxruntime CPU in this one process,
interleaved (`bench.timing`), at batch 1 and 64. Out: <out>/compare.json, compare.md and compare.png
(accuracy against kept FLOPs and against measured latency).

Training times come from runs made one after another in this process: on a shared machine they drift
with its load, so read them as rough; the latencies are interleaved and comparable.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
import time
from pathlib import Path

from bench import torch_pruning_peer as peer
from bench.timing import cpu_name, time_onnx
from common.atomicio import write_bytes, write_json, write_text
from common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from common.results import provenance
from export.api import ExportOptions
from export.api import run as run_export
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import TrainConfig, load_config, make_config
from training.loop import train

TRAINED = ("dense", "polarized", "activation_density", "flipout")  # methods of training.loop
METHODS = (*TRAINED, peer.NAME)
LABELS = {"dense": "dense", "polarized": "polarized (ours)", "activation_density": "activation density",
          "flipout": "FlipOut", peer.NAME: peer.LABEL}
BATCHES = (1, 64)
FULL_TIMING = {"rounds": 300, "warmup": 5, "budget_s": 20.0}  # per batch size, all four models together
QUICK_TIMING = {"rounds": 10, "warmup": 1, "budget_s": 1.0}
# --quick: a smoke run (minutes on a test machine), not a result. FlipOut's 0.75 needs a third epoch.
QUICK_CONFIG = {"epochs": 2, "batch_size": 64, "train_subset": 256, "val_size": 64, "test_subset": 200,
                "final_sparsity": 0.5, "progress": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("python -m bench.compare", __doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/fmnist_resnet20.yaml"),
                        help="the shared budget (its method key is replaced per run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every method")
    parser.add_argument("--quick", action="store_true", help="tiny budget and few timing rounds (smoke runs)")
    parser.add_argument("--methods", type=method_list, default=METHODS, metavar="A,B,...",
                        help=f"which rows (dense is always trained: it is the reference); default all of "
                             f"{','.join(METHODS)}")
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"), help="run folders go here")
    parser.add_argument("--out", type=Path, default=Path("reports/compare"), help="report folder")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for the timing")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds per batch size (default 300, 10 with --quick)")
    parser.add_argument("--samples", type=int, default=512, help="test images for export's checks")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a finished, exported run whose config is the requested one")
    return parser.parse_args(argv)


def method_list(text: str) -> tuple[str, ...]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m == "dense" or m in chosen)


def method_configs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    """Per row, its training config. The peer's is the dense one under its own name (it starts dense)."""
    base = load_config(args.config, args.overrides).to_dict()
    if args.quick:
        base.update(QUICK_CONFIG)
    return {method: make_config({**base, "method": "dense" if method == peer.NAME else method, "name": method,
                                 "out_dir": str(args.runs)})
            for method in args.methods}


REUSE_FREE_KEYS = {"name", "out_dir", "progress"}  # they do not change what is trained


def same_training(recorded: dict | None, cfg: TrainConfig) -> bool:
    """`recorded` (a run's config) trains what `cfg` would. A key added to the config after that run was
    made counts as its default, which keeps the earlier behaviour."""
    if recorded is None:
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return all(recorded.get(key, defaults.get(key)) == value
               for key, value in cfg.to_dict().items() if key not in REUSE_FREE_KEYS)


def finished_with(run_dir: Path, cfg: TrainConfig) -> bool:
    """A complete, exported run trained with this config (a run folder copied from `make train` counts)."""
    if not (run_dir / "metrics.json").is_file():
        return False
    if cfg.name == peer.NAME:  # the peer records its config in metrics.json
        return same_training(json.loads((run_dir / "metrics.json").read_text()).get("config"), cfg)
    if not (run_dir / "export_report.json").is_file():
        return False
    try:
        return same_training(load_checkpoint(run_dir / "checkpoint.pt").get("config"), cfg)
    except CheckpointError:
        return False


def train_and_export(cfg: TrainConfig, args: argparse.Namespace, target_flops: float | None = None) -> dict:
    """metrics.json of the run (trained and exported here unless --reuse found it done)."""
    run_dir = Path(cfg.out_dir) / cfg.name
    if cfg.name == peer.NAME:
        if not (args.reuse and finished_with(run_dir, cfg)):
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"== {peer.NAME}: dense half, prune to kept MACs {target_flops}, fine-tune, export", flush=True)
            peer.train_peer(cfg, target_flops)
    elif not (args.reuse and finished_with(run_dir, cfg)):
        shutil.rmtree(run_dir, ignore_errors=True)  # this folder belongs to the comparison
        print(f"== {cfg.method}: training", flush=True)
        train(cfg)
        print(f"== {cfg.method}: export", flush=True)
        # The other runs serve the trained dense run as their dense model (export's --dense-run).
        dense_run = None if cfg.method == "dense" else Path(cfg.out_dir) / "dense"
        run_export(ExportOptions(run=run_dir, repository=args.runs / "model_repository", samples=args.samples,
                                 dense_run=dense_run))
    return json.loads((run_dir / "metrics.json").read_text())


def time_models(paths: dict[str, Path], threads: int, settings: dict) -> tuple[dict, dict]:
    """Per method and batch size: median/p95/min ms of its pruned ONNX, all methods interleaved."""
    summaries, session = time_onnx(paths, threads, BATCHES, **settings)
    return {method: {str(batch): summaries[batch][method] for batch in BATCHES} for method in paths}, session


def row_for(method: str, metrics: dict, latency: dict, dense_latency: dict) -> dict:
    """One line of the comparison. Keys a method does not report take the dense-shaped meaning: every
    weight is a parameter, training runs the full network."""
    return {
        "method": method, "label": LABELS[method], "test_accuracy": metrics["test_accuracy"],
        "flops_ratio": metrics["flops_ratio"], "pruned_flops": metrics["pruned_flops"],
        "kept_params": metrics.get("nonzero_params", metrics["pruned_params"]),
        "params_ratio": metrics.get("nonzero_params", metrics["pruned_params"]) / metrics["dense_params"],
        "weight_sparsity": metrics.get("weight_sparsity"),
        "train_seconds": metrics["train_seconds"], "train_flops_ratio": metrics.get("train_flops_ratio", 1.0),
        "train_seconds_ratio_vs_dense_pace": metrics.get("train_seconds_ratio_vs_dense_pace"),
        "train_energy": metrics.get("train_energy"),
        "latency_ms": {batch: stats["median_ms"] for batch, stats in latency.items()},
        "latency": latency,
        "speedup": {batch: dense_latency[batch]["median_ms"] / stats["median_ms"] for batch, stats in latency.items()},
        "pruning": metrics.get("pruning"),
    }


def markdown(report: dict) -> str:
    budget = report["budget"]
    lines = [
        "# Pruning methods side by side",
        "",
        f"{budget['dataset']}, {budget['model']}, {budget['epochs']} epochs, train_subset {budget['train_subset']}, "
        f"seed {budget['seed']}{' (--quick: a smoke run, not a result)' if report['quick'] else ''}. "
        f"Latency: onnxruntime CPU ({report['timing']['threads']} threads, {report['cpu']}), exported pruned "
        "ONNX, median over interleaved rounds; speed-up against dense in brackets; batch-64 spread (min / p95) "
        "in the last column.",
        "",
        "| method | test acc | kept FLOPs | kept params | train s | train J | train FLOPs | batch 1 ms | batch 64 ms "
        "| batch 64 min / p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lat, gain = row["latency_ms"], row["speedup"]
        params = f"{row['kept_params'] / 1e3:.1f}k ({row['params_ratio']:.2f})"
        joules = f"{row['train_energy']['joules']:.0f}" if row["train_energy"] else "n/a"
        lines.append(f"| {row['label']} | {row['test_accuracy']:.4f} | {row['flops_ratio']:.3f} | {params} | "
                     f"{row['train_seconds']:.0f} | {joules} | {row['train_flops_ratio']:.3f} | "
                     f"{lat['1']:.3f} ({gain['1']:.2f}x) | {lat['64']:.2f} ({gain['64']:.2f}x) | "
                     f"{row['latency']['64']['min_ms']:.2f} / {row['latency']['64']['p95_ms']:.2f} |")
    lines += [
        "",
        "- kept FLOPs: conv + linear MACs of the exported network / dense. kept params: parameters of the exported "
        "network; for FlipOut the non-zero ones (its network keeps the dense shape, so its FLOPs stay 1).",
        "- train FLOPs: forward MACs x examples x 3 summed over training, relative to dense. Only activation density "
        "trains a smaller network as it goes; the others train a dense-shaped one (gates and masks multiply zeros).",
        "- train J: energy of the training steps (metrics.json `train_energy`: RAPL/NVML where readable, "
        "else an estimate from CPU time; its assumptions are in compare.json).",
        "- train s: the loop's training time. The runs ran one after another in one process, so machine load "
        "moves them; latencies are interleaved and comparable.",
    ]
    for row in report["rows"]:
        if row["train_seconds_ratio_vs_dense_pace"] is not None:
            lines.append(f"- {row['label']}: its training took {row['train_seconds_ratio_vs_dense_pace']:.2f}x the "
                         "time its own dense epochs (before the first resize) would have taken, measured in one run.")
    for row in (r for r in report["rows"] if r.get("pruning")):
        step = row["pruning"]
        lines.append(f"- {row['label']}: dense for {step['epoch']} of {report['budget']['epochs']} epochs, then one "
                     f"global L1 prune (ratio {step['pruning_ratio']:.2f}, channel counts multiples of 16) to kept "
                     f"MACs {step['flops_ratio']:.3f} against a target of {step['target_flops_ratio']:.3f} (finding "
                     f"that ratio took {step['seconds']:.0f} s of its train s), then fine-tuned with the "
                     "learning-rate schedule continuing.")
    for row in (r for r in report["rows"] if r["weight_sparsity"] is not None):
        lines.append(f"- {row['label']}: {row['weight_sparsity']:.1%} of conv/linear weights are zero, in dense "
                     "kernels: onnxruntime does every MAC, so no speed-up is expected or claimed.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_flops, by_latency) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"wspace": 0.3})
    for row in report["rows"]:
        for axis, x in ((by_flops, row["flops_ratio"]), (by_latency, row["latency_ms"]["1"])):
            axis.scatter(x, row["test_accuracy"], s=50)
            axis.annotate(row["label"], (x, row["test_accuracy"]), textcoords="offset points", xytext=(6, 4),
                          fontsize=8)
    by_flops.set(xlabel="kept FLOPs (exported / dense)", ylabel="test accuracy", title="accuracy vs FLOPs")
    by_latency.set(xlabel="onnxruntime CPU latency, batch 1 (ms, median)", ylabel="test accuracy",
                   title="accuracy vs measured latency")
    for axis in (by_flops, by_latency):
        axis.grid(alpha=0.3)
        axis.margins(x=0.15, y=0.1)  # room for the labels
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def run(args: argparse.Namespace) -> dict:
    if peer.NAME in args.methods:
        peer.require_torch_pruning()  # before hours of training, not after
    configs = method_configs(args)
    started = time.perf_counter()
    metrics = {}
    for method, cfg in configs.items():
        # The peer prunes to the kept MACs the polarized run reached (its target when that row is not run).
        target = metrics["polarized"]["flops_ratio"] if "polarized" in metrics else None
        metrics[method] = train_and_export(cfg, args, target)
    settings = dict(QUICK_TIMING if args.quick else FULL_TIMING)
    if args.rounds is not None:  # e.g. --quick --reuse --rounds 300: re-time quick runs properly
        settings.update(rounds=args.rounds, budget_s=FULL_TIMING["budget_s"])
    print("== timing the exported models, interleaved", flush=True)
    methods = list(configs)
    latency, session = time_models({m: args.runs / m / "pruned.onnx" for m in methods}, args.threads, settings)
    budget = {k: configs["dense"].to_dict()[k] for k in ("dataset", "model", "epochs", "batch_size",
                                                         "train_subset", "test_subset", "seed", "round_to",
                                                         "target_flops_ratio", "final_sparsity")}
    report = {
        "quick": args.quick, "budget": budget, "cpu": cpu_name(),
        "timing": {**settings, "threads": args.threads, "batches": list(BATCHES), "onnxruntime_session": session},
        "rows": [row_for(m, metrics[m], latency[m], latency["dense"]) for m in methods],
        "runs": {m: str(args.runs / m) for m in methods},
        "wall_seconds": time.perf_counter() - started,
        "provenance": provenance(),
    }
    write_json(args.out / "compare.json", report)
    write_text(args.out / "compare.md", markdown(report))
    plot(report, args.out / "compare.png")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except PolarpruneError as error:  # a bad config, or a run that failed training's or export's checks
        return fail("python -m bench.compare", error)
    print(markdown(report))
    print(f"wrote {args.out / 'compare.json'}, compare.md, compare.png")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
