"""Trade-off curves on one budget: dense, polarized (ours), three Torch-Pruning recipes, activation density, FlipOut.

    python -m bench.compare [--quick] [--targets 0.3,0.5,0.7] [--seeds 0] [--model resnet20_proj]
                            [--config configs/fmnist_resnet20.yaml] [--set key=value ...]
                            [--methods dense,polarized,...] [--jobs 1] [--runs runs/compare]
                            [--out reports/compare] [--threads 2] [--rounds N] [--reuse]
    make compare [TARGETS=0.3,0.5,0.7] [SEEDS=0,1,2] [JOBS=2] [COMPARE_ARGS="--quick"]

Every run trains with `training.loop.train` on the same config (only `method` and its recipe, `seed`, the
kept-FLOPs target and the run name differ) into <runs>/seed<S>/<name>/ and is exported by the export
library (`export.api.run`; Triton models go to <runs>/seed<S>/model_repository, that seed's dense run
serving as every run's dense model). The network is ResNet-20 with 1x1-conv projection shortcuts
(`resnet20_proj`, `--model`): both polarized and Torch-Pruning can shrink its residual streams, and only
polarized can close whole blocks. Per seed: dense once (the reference); polarized and the Torch-Pruning
recipes at every target (<method>_t<target>); activation density and FlipOut once, with their own knobs
(they have no kept-FLOPs target). Each Torch-Pruning recipe (`training.methods.torch_pruning`) prunes to
the kept MACs the polarized run reached at the same target and seed. All exported ONNX models of one seed
are timed with onnxruntime CPU in one call, interleaved (`bench.timing`), at batch 1 and 64, after every
run has trained. Out: <out>/compare.json, compare.md and compare.png (bench/compare_report.py).

`--jobs 2` trains two seeds at once, one torch thread each (the `threads` key of every run is set to
cores / jobs, and recorded): on 2 cores that is faster than one seed at a time with 2 threads. Training
times drift with the machine's load, so read them as rough; the latencies of one seed are interleaved
and comparable.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from polarprune.bench import compare_report as report_io
from polarprune.bench.timing import cpu_name, time_onnx
from polarprune.common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.common.results import provenance
from polarprune.export.api import ExportOptions
from polarprune.export.api import run as run_export
from polarprune.training.checkpoint import CheckpointError, load_checkpoint
from polarprune.training.config import TrainConfig, changed_keys, load_config, make_config
from polarprune.training.loop import train
from polarprune.training.methods.torch_pruning import torch_pruning

# The Torch-Pruning rows: compare's name -> the recipe (`tp_recipe`) of the torch_pruning method
TORCH_PRUNING_ARMS = {"tp_taylor": "taylor_iterative", "tp_group_sl": "group_sl", "tp_l1": "l1_oneshot"}
METHODS = ("dense", "polarized", *TORCH_PRUNING_ARMS, "activation_density", "flipout")  # row order
LABELS = {"dense": "dense", "polarized": "polarized (ours)", "tp_taylor": "Torch-Pruning iterative Taylor",
          "tp_group_sl": "Torch-Pruning group-SL", "tp_l1": "Torch-Pruning one-shot L1",
          "activation_density": "activation density", "flipout": "FlipOut"}
PER_TARGET = ("polarized", *TORCH_PRUNING_ARMS)  # trained at every kept-FLOPs target; the others once per seed
DEFAULT_TARGETS = (0.3, 0.5, 0.7)
DEFAULT_MODEL = "resnet20_proj"  # the search space polarized and Torch-Pruning share
BATCHES = (1, 64)
# Per batch size, every model of a seed interleaved; the time budget grows with the number of models so
# that each gets about as many batch-64 rounds however many are compared.
FULL_TIMING = {"rounds": 300, "warmup": 5, "budget_s_per_model": 4.0}
QUICK_TIMING = {"rounds": 10, "warmup": 1, "budget_s_per_model": 0.2}
# --quick: a smoke run (minutes on a test machine), not a result. FlipOut's 0.75 needs a third epoch.
QUICK_CONFIG = {"epochs": 2, "batch_size": 64, "train_subset": 256, "val_size": 64, "test_subset": 200,
                "final_sparsity": 0.5, "progress": False}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a method at a kept-FLOPs target (None: the method has no target) and a seed."""

    method: str
    target: float | None
    seed: int

    @property
    def name(self) -> str:
        return self.method if self.target is None else f"{self.method}_t{self.target:g}"

    def folder(self, runs: Path) -> Path:
        return seed_folder(runs, self.seed) / self.name

    def identity(self, runs: Path) -> dict:
        """What a report row says about the run itself."""
        return {"method": self.method, "label": LABELS[self.method], "target": self.target, "seed": self.seed,
                "run": str(self.folder(runs))}


def seed_folder(runs: Path, seed: int) -> Path:
    return runs / f"seed{seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("python -m bench.compare", __doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/fmnist_resnet20.yaml"),
                        help="the shared budget (its method, seed and target are replaced per run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every run")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"the network of every run (default {DEFAULT_MODEL}: projection shortcuts, which "
                             "Torch-Pruning can prune through; resnet20 is the option-A default run's)")
    parser.add_argument("--jobs", type=int, default=1, choices=(1, 2, 3, 4),
                        help="seeds trained at once, each with cores / jobs torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny budget and few timing rounds (smoke runs)")
    parser.add_argument("--methods", type=method_list, default=METHODS, metavar="A,B,...",
                        help=f"which rows (dense is always trained: it is the reference); default all of "
                             f"{','.join(METHODS)}")
    parser.add_argument("--targets", type=target_list, default=DEFAULT_TARGETS, metavar="T,T,...",
                        help="kept-FLOPs targets of polarized and Torch-Pruning (default 0.3,0.5,0.7)")
    parser.add_argument("--seeds", type=seed_list, default=(0,), metavar="S,S,...",
                        help="seeds; each trains every run again (default 0; 0,1,2 for a spread)")
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


def number_list(text: str, kind: type, what: str) -> list:
    try:
        values = sorted({kind(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what}: give at least one value")
    return values


def target_list(text: str) -> tuple[float, ...]:
    targets = number_list(text, float, "--targets")
    if not all(0 < target <= 1 for target in targets):
        raise argparse.ArgumentTypeError(f"--targets {text}: kept-FLOPs targets must be in (0, 1]")
    return tuple(targets)


def seed_list(text: str) -> tuple[int, ...]:
    seeds = number_list(text, int, "--seeds")
    if seeds[0] < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text}: seeds must be >= 0")
    return tuple(seeds)


def planned_runs(methods: tuple[str, ...], targets: tuple[float, ...], seed: int) -> list[Run]:
    """The runs of one seed in training order: each polarized run before the peer that matches it."""
    return [Run(method, target, seed) for method in METHODS if method in methods
            for target in (targets if method in PER_TARGET else (None,))]


def base_config(args: argparse.Namespace) -> dict:
    base = {**load_config(args.config, args.overrides).to_dict(), "model": args.model}
    if args.jobs > 1:  # the seeds training side by side share the cores
        base["threads"] = max(1, (os.cpu_count() or 1) // args.jobs)
    return {**base, **QUICK_CONFIG} if args.quick else base


def run_config(base: dict, run: Run, runs: Path, prune_to: float | None = None) -> TrainConfig:
    """The run's training config. A Torch-Pruning arm is the torch_pruning method with its recipe, pruning
    to `prune_to` kept MACs (the polarized run's, else its target)."""
    values = {**base, "method": run.method, "seed": run.seed, "name": run.name, "out_dir": str(seed_folder(runs, run.seed))}
    if run.method in TORCH_PRUNING_ARMS:
        values.update(method="torch_pruning", tp_recipe=TORCH_PRUNING_ARMS[run.method])
    if run.target is not None:
        values["target_flops_ratio"] = run.target if prune_to is None else prune_to
    return make_config(values)


def finished_with(run_dir: Path, cfg: TrainConfig) -> bool:
    """A complete, exported run trained with this config (a run folder copied from `make train` counts):
    its checkpoint's config differs from `cfg` in no key but where the run is written
    (`training.config.changed_keys`, the resume check's test)."""
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "export_report.json").is_file():
        return False
    try:
        recorded = load_checkpoint(run_dir / "checkpoint.pt").get("config")
    except CheckpointError:
        return False
    return recorded is not None and not changed_keys(recorded, cfg)


def train_and_export(run: Run, cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """metrics.json of the run (trained and exported here unless --reuse found it done)."""
    run_dir = run.folder(args.runs)
    if args.reuse and finished_with(run_dir, cfg):
        print(f"== seed {run.seed}, {run.name}: reused", flush=True)
        return json.loads((run_dir / "metrics.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # this folder belongs to the comparison
    print(f"== seed {run.seed}, {run.name}: training"
          + (f" (prunes to kept MACs {cfg.target_flops_ratio:.4f})" if run.method in TORCH_PRUNING_ARMS else ""),
          flush=True)
    train(cfg)
    print(f"== seed {run.seed}, {run.name}: export", flush=True)
    # The seed's other runs serve its trained dense run as their dense model (export's --dense-run).
    dense_run = None if run.method == "dense" else Run("dense", None, run.seed).folder(args.runs)
    run_export(ExportOptions(run=run_dir, repository=seed_folder(args.runs, run.seed) / "model_repository",
                             samples=args.samples, dense_run=dense_run))
    return json.loads((run_dir / "metrics.json").read_text())


def timing_settings(args: argparse.Namespace) -> dict:
    settings = dict(QUICK_TIMING if args.quick else FULL_TIMING)
    if args.rounds is not None:  # e.g. --quick --reuse --rounds 300: re-time quick runs properly
        settings.update(rounds=args.rounds, budget_s_per_model=FULL_TIMING["budget_s_per_model"])
    return settings


def time_models(paths: dict[str, Path], threads: int, settings: dict) -> tuple[dict, dict]:
    """Per model and batch size: timing.summarize of its pruned ONNX, all models interleaved in one call."""
    summaries, session = time_onnx(paths, threads, BATCHES, rounds=settings["rounds"], warmup=settings["warmup"],
                                   budget_s=settings["budget_s_per_model"] * len(paths))
    return {name: {str(batch): summaries[batch][name] for batch in BATCHES} for name in paths}, session


def matched_macs(metrics: dict[Run, dict], run: Run) -> float | None:
    """The kept MACs a Torch-Pruning run prunes to: those the same seed's polarized run reached at its
    target (None for other methods, or without that polarized run)."""
    matched = metrics.get(Run("polarized", run.target, run.seed)) if run.method in TORCH_PRUNING_ARMS else None
    return matched["flops_ratio"] if matched else None


def train_seed(seed: int, base: dict, args: argparse.Namespace) -> dict[Run, dict]:
    """Train and export every run of one seed: metrics.json by run."""
    metrics: dict[Run, dict] = {}
    for run in planned_runs(args.methods, args.targets, seed):
        cfg = run_config(base, run, args.runs, matched_macs(metrics, run))
        metrics[run] = train_and_export(run, cfg, args)
    return metrics


def train_seeds(base: dict, args: argparse.Namespace) -> dict[int, dict[Run, dict]]:
    """Every seed's runs; `--jobs` seeds at a time, each in its own process."""
    if args.jobs == 1 or len(args.seeds) == 1:
        return {seed: train_seed(seed, base, args) for seed in args.seeds}
    spawn = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(args.seeds)), mp_context=spawn,
                                                initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {seed: pool.submit(train_seed, seed, base, args) for seed in args.seeds}
        return {seed: future.result() for seed, future in futures.items()}


def exit_with_parent(parent: int) -> None:
    """In a worker: end when the comparison that started it is gone (killed, not only interrupted), rather
    than train on unwatched into the run folders a new comparison is using."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def seed_rows(seed: int, metrics: dict[Run, dict], args: argparse.Namespace, settings: dict) -> tuple[list[dict], dict]:
    """Time every exported model of one seed together; (its rows, the session settings)."""
    print(f"== seed {seed}: timing {len(metrics)} exported models, interleaved", flush=True)
    latency, session = time_models({run.name: run.folder(args.runs) / "pruned.onnx" for run in metrics},
                                   args.threads, settings)
    dense = Run("dense", None, seed)
    rows = []
    for run in metrics:
        rows.append(report_io.row_for(run.identity(args.runs), metrics[run], latency[run.name], latency[dense.name],
                                      metrics[dense]["test_accuracy"],
                                      matched_macs(metrics, run)))
    return rows, session


BUDGET_KEYS = ("dataset", "model", "epochs", "batch_size", "train_subset", "test_subset", "round_to",
               "final_sparsity")


def run(args: argparse.Namespace) -> dict:
    if any(method in TORCH_PRUNING_ARMS for method in args.methods):
        torch_pruning()  # installed? before hours of training, not after
    base = base_config(args)
    settings = timing_settings(args)
    started = time.perf_counter()
    trained = train_seeds(base, args)
    rows, session = [], {}
    for seed in args.seeds:  # timing after all training: no run trains beside the timed models
        rows_of_seed, session = seed_rows(seed, trained[seed], args, settings)
        rows += rows_of_seed
    report = {
        "quick": args.quick,
        "budget": {**{key: base[key] for key in BUDGET_KEYS}, "targets": list(args.targets), "seeds": list(args.seeds),
                   "jobs": args.jobs, "threads": base.get("threads")},
        "cpu": cpu_name(),
        "timing": {**settings, "threads": args.threads, "batches": list(BATCHES), "onnxruntime_session": session},
        "rows": rows, "summary": report_io.seed_summary(rows),
        "wall_seconds": time.perf_counter() - started, "provenance": provenance(),
    }
    report_io.write_report(report, args.out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except PolarpruneError as error:  # a bad config, or a run that failed training's or export's checks
        return fail("python -m bench.compare", error)
    print(report_io.markdown(report))
    print(f"wrote {args.out / 'compare.json'}, compare.md, compare.png")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
