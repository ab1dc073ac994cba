"""Accuracy over seeds: ways of training the polarized run (arms) against the dense reference of each seed.

    for s in 0 1 2; do python -m training --config configs/fmnist_resnet20.yaml --set seed=$s --set name=fmnist_resnet20_seed$s
                       python -m training --config configs/fmnist_resnet20_dense.yaml --set seed=$s --set name=fmnist_resnet20_dense_seed$s; done
    python -m bench.seeds --runs runs [--out docs/results/seeds.json]
    python -m bench.seeds --dense 'runs/dense_s{seed}' --arm 'from scratch=runs/base_s{seed}' \\
                          --arm 'from the dense weights=runs/ft_s{seed}' --arm 'distillation@0=runs/kd_s{seed}'
                          [--seeds 0,1,2]

Reads finished run folders (`{seed}` in a pattern is the seed) and writes, per arm and seed, test accuracy,
validation accuracy, the last epoch's training accuracy, the gap to that seed's dense run, kept FLOPs (before
and after the move into the target band), training time, and the epochs of compute (an arm also paid for
the run whose weights it starts from, and for the run whose learned network it trains from scratch);
per arm the mean gap and its standard deviation over seeds. Without --arm: the default run's layout
(`<runs>/<run>_seed<s>` against `<runs>/<run>_dense_seed<s>`).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from polarprune.bench import BenchError
from polarprune.bench.scratch import learned_network
from polarprune.common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.common.results import provenance, write_result
from polarprune.training.checkpoint import load_checkpoint
from polarprune.training.mask import load_mask

ROOT = Path(__file__).resolve().parents[1]


def finished_run(pattern: str, seed: int) -> tuple[Path, dict]:
    """The run folder of `pattern` at `seed`, and its metrics.json."""
    folder = Path(pattern.format(seed=seed))
    path = folder / "metrics.json"
    if not path.is_file():
        raise BenchError(f"{path} not found: that run has not finished (see python -m bench.seeds --help)")
    return folder, json.loads(path.read_text())


def run_config(folder: Path, metrics: dict) -> dict:
    """What the run trained: metrics.json's config, or (runs made before it held one) the checkpoint's."""
    if "config" in metrics:
        return metrics["config"]
    return load_checkpoint(folder / "checkpoint.pt")["config"]


# The model path of bench.scratch's network (a finished run's mask, trained from scratch), as a config names
# it with or without the package prefix.
LEARNED_NETWORK = f"{learned_network.__module__.removeprefix('polarprune.')}:{learned_network.__name__}"


def compute_epochs(metrics: dict, config: dict) -> int | None:
    """The run's epochs plus those of every run it stands on: the run whose weights it starts from
    (`init_weights`) and the run whose mask it trains from scratch (bench.scratch). None when one of those
    runs is not on disk to count."""
    total = metrics["epochs"]
    sources = [config.get("init_weights")]
    if str(config.get("model", "")).endswith(LEARNED_NETWORK):
        sources.append((config.get("model_args") or {}).get("run"))
    for source in filter(None, sources):
        folder = Path(source) if Path(source).is_dir() else Path(source).parent
        path = folder / "metrics.json"
        if not path.is_file():
            return None
        upstream = json.loads(path.read_text())
        epochs = compute_epochs(upstream, run_config(folder, upstream))
        if epochs is None:
            return None
        total += epochs
    return total


def last_train_accuracy(folder: Path) -> float | None:
    """Training accuracy over the run's last epoch (its log.jsonl's last line; None without one): how well
    the run fits its training data, where test accuracy says how well it generalises."""
    path = folder / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]).get("train_accuracy") if lines else None


def arm_row(seed: int, folder: Path, metrics: dict, dense: dict) -> dict:
    config = run_config(folder, metrics)
    projection = metrics.get("projection") or {}
    return {"seed": seed, "accuracy": metrics["test_accuracy"], "dense_accuracy": dense["test_accuracy"],
            "gap_points": 100 * (dense["test_accuracy"] - metrics["test_accuracy"]),
            "val_accuracy": metrics.get("val_accuracy"), "train_accuracy": last_train_accuracy(folder),
            "flops_ratio": kept_macs(metrics, dense), "learned_flops_ratio": projection.get("learned_flops_ratio"),
            "flipped_flops_share": projection.get("flipped_flops_share"),
            "closed_flops_share": projection.get("closed_flops_share"),
            "freeze": metrics.get("freeze"), "target_flops_ratio": metrics.get("target_flops_ratio"),
            "threads": config.get("threads"), "cpu": ((metrics.get("provenance") or {}).get("machine") or {}).get("cpu"),
            "train_seconds": metrics["train_seconds"], "epochs": metrics["epochs"],
            "compute_epochs": compute_epochs(metrics, config),
            "init_weights": config.get("init_weights"), "distill_from": config.get("distill_from"),
            "label_smoothing": config.get("label_smoothing", 0.0),
            "run": (metrics.get("provenance") or {}).get("command"),
            "commit": (metrics.get("provenance") or {}).get("commit")}


def same_network(metrics: dict, dense: dict) -> bool:
    """Whether the run gated the dense run's network (a network of its own, e.g. a learned one trained from
    scratch, is measured against itself in its metrics.json)."""
    return metrics.get("dense_flops", dense.get("dense_flops")) == dense.get("dense_flops")


def kept_macs(metrics: dict, dense: dict) -> float:
    """The run's deployed MACs over the dense run's (its own flops_ratio where that is the same thing)."""
    if same_network(metrics, dense) or "pruned_flops" not in metrics:
        return metrics["flops_ratio"]
    return metrics["pruned_flops"] / dense["dense_flops"]


def kept_units(folder: Path) -> set[str] | None:
    """What a run's mask.json keeps, as a set: every kept channel ("group:index") and every open block."""
    path = folder / "mask.json"
    if not path.is_file():
        return None
    document, mask = load_mask(path)
    channels = {f"{group}:{index}" for group, kept in mask.kept_channels.items() for index in kept}
    return channels | {f"block:{name}" for name in document["block_groups"] if name not in mask.closed_blocks}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_jaccard(masks: list[set | None]) -> float | None:
    """Mean Jaccard index of kept units over every pair of masks (None: fewer than two masks)."""
    known = [m for m in masks if m is not None]
    pairs = [jaccard(a, b) for i, a in enumerate(known) for b in known[i + 1:]]
    return statistics.fmean(pairs) if pairs else None


def collect(dense_pattern: str, arms: dict[str, tuple[str, list[int] | None]], seeds: list[int]) -> dict:
    """`arms`: label -> (folder pattern, its seeds or None for all of `seeds`)."""
    dense_runs = {seed: finished_run(dense_pattern, seed) for seed in seeds}
    dense = {seed: metrics for seed, (_, metrics) in dense_runs.items()}
    out = []
    for label, (pattern, arm_seeds) in arms.items():
        unknown = sorted(set(arm_seeds or seeds) - set(seeds))
        if unknown:
            raise BenchError(f"--arm {label!r}: seeds {unknown} are not among --seeds {seeds} (no dense run to compare)")
        runs = {seed: finished_run(pattern, seed) for seed in arm_seeds or seeds}
        rows = [arm_row(seed, folder, metrics, dense[seed]) for seed, (folder, metrics) in runs.items()]
        masks = [kept_units(folder) if same_network(metrics, dense[seed]) else None  # units of other networks
                 for seed, (folder, metrics) in runs.items()]                     # share names, not meaning
        gaps = [row["gap_points"] for row in rows]
        out.append({"label": label, "pattern": pattern, "seeds": rows,
                    "mean_accuracy": statistics.fmean(r["accuracy"] for r in rows),
                    "mean_gap_points": statistics.fmean(gaps),
                    "stdev_gap_points": statistics.stdev(gaps) if len(gaps) > 1 else None,
                    "mean_flops_ratio": statistics.fmean(r["flops_ratio"] for r in rows),
                    "mean_train_seconds": statistics.fmean(r["train_seconds"] for r in rows),
                    "mask_overlap": mean_jaccard(masks),
                    "compute_epochs": sorted({r["compute_epochs"] for r in rows},
                                             key=lambda epochs: -1 if epochs is None else epochs)})
    return {"dense": {"pattern": dense_pattern,
                      "seeds": [{"seed": s, "accuracy": m["test_accuracy"], "val_accuracy": m.get("val_accuracy"),
                                 "train_accuracy": last_train_accuracy(dense_runs[s][0]),
                                 "train_seconds": m["train_seconds"],
                                 "epochs": m["epochs"], "run": (m.get("provenance") or {}).get("command"),
                                 "commit": (m.get("provenance") or {}).get("commit")}
                                for s, m in dense.items()],
                      "mean_accuracy": statistics.fmean(m["test_accuracy"] for m in dense.values())},
            "arms": out}


def overlap(text: str) -> dict:
    """LABEL=RUN_A,RUN_B: the Jaccard index of the two runs' kept units."""
    label, sep, folders = text.partition("=")
    runs = folders.split(",")
    if not sep or len(runs) != 2:
        raise BenchError(f"--overlap expects LABEL=RUN_A,RUN_B, got {text!r}")
    masks = [kept_units(Path(run)) for run in runs]
    missing = [run for run, mask in zip(runs, masks) if mask is None]
    if missing:
        raise BenchError(f"--overlap {label!r}: no mask.json in {', '.join(missing)}")
    return {"label": label.strip(), "runs": runs, "jaccard": jaccard(*masks)}


def parse_arm(text: str) -> tuple[str, tuple[str, list[int] | None]]:
    """LABEL=PATTERN (every seed of --seeds) or LABEL@0,1=PATTERN (those seeds only)."""
    head, sep, pattern = text.partition("=")
    label, at, seeds = head.partition("@")
    if not sep or not label.strip() or "{seed}" not in pattern:
        raise BenchError(f"--arm expects LABEL=PATTERN or LABEL@SEEDS=PATTERN with {{seed}} in the pattern, "
                         f"got {text!r}")
    try:
        chosen = [int(seed) for seed in seeds.split(",")] if at else None
    except ValueError:
        raise BenchError(f"--arm {text!r}: the seeds after @ must be integers, e.g. 'distillation@0=runs/d_s{{seed}}'")
    return label.strip(), (pattern, chosen)


def main(argv: list[str] | None = None) -> int:
    parser = cli_parser("python -m bench.seeds", __doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder of the default layout")
    parser.add_argument("--run", default="fmnist_resnet20", help="run name of the default layout")
    parser.add_argument("--dense", help="dense run folder pattern, e.g. 'runs/dense_s{seed}'")
    parser.add_argument("--arm", action="append", default=[], metavar="LABEL[@SEEDS]=PATTERN",
                        help="one way of training the polarized run (on SEEDS only, e.g. 'x@0=...'); repeat")
    parser.add_argument("--overlap", action="append", default=[], metavar="LABEL=RUN_A,RUN_B",
                        help="mask overlap (Jaccard of kept channels and blocks) of two run folders; repeat")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "seeds.json")
    args = parser.parse_args(argv)
    try:
        arms = dict(map(parse_arm, args.arm)) or {"from scratch (the default run)":
                                                  (str(args.runs / f"{args.run}_seed{{seed}}"), None)}
        dense = args.dense or str(args.runs / f"{args.run}_dense_seed{{seed}}")
        result = collect(dense, arms, [int(s) for s in args.seeds.split(",")])
        result["overlaps"] = [overlap(text) for text in args.overlap]
    except (PolarpruneError, KeyError, ValueError) as error:
        return fail("python -m bench.seeds", error if isinstance(error, PolarpruneError) else BenchError(str(error)))
    write_result(args.out, result, {"python -m bench.seeds": provenance()})
    print(f"dense: mean accuracy {result['dense']['mean_accuracy']:.4f}")
    for arm in result["arms"]:
        spread = f" (sd {arm['stdev_gap_points']:.2f})" if arm["stdev_gap_points"] is not None else ""
        gaps = ", ".join(f"{row['gap_points']:.2f}" for row in arm["seeds"])
        print(f"{arm['label']}: mean accuracy {arm['mean_accuracy']:.4f}, gap {arm['mean_gap_points']:.2f} "
              f"points{spread} (per seed {gaps}), kept FLOPs {arm['mean_flops_ratio']:.3f}")
    print(f"wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
