"""make compare (bench/compare.py, bench/compare_report.py) without training: its arguments, run folders,
the summary over seeds, compare.md and compare.png. The trained smoke run is in tests/test_baselines.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from polarprune.bench import compare
from polarprune.bench import compare_report as report_io


def test_default_arguments_are_three_targets_and_one_seed():
    args = compare.parse_args([])
    assert args.targets == (0.3, 0.5, 0.7) and args.seeds == (0,)
    args = compare.parse_args(["--targets", "0.7, 0.3,0.3", "--seeds", "2,0,1"])
    assert args.targets == (0.3, 0.7) and args.seeds == (0, 1, 2)  # sorted, each once


@pytest.mark.parametrize("flag, value, message", [("--targets", "0.3,1.5", "must be in (0, 1]"),
                                                  ("--targets", "half", "not a comma-separated list"),
                                                  ("--seeds", "-1", "must be >= 0"),
                                                  ("--seeds", ",", "at least one value")])
def test_bad_targets_and_seeds_are_usage_errors(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exited:
        compare.parse_args([flag, value])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_runs_per_seed_and_their_folders():
    runs = compare.planned_runs(compare.METHODS, (0.3, 0.5), seed=1)
    assert [r.name for r in runs] == ["dense", "polarized_t0.3", "polarized_t0.5", "tp_taylor_t0.3", "tp_taylor_t0.5",
                                      "tp_group_sl_t0.3", "tp_group_sl_t0.5", "tp_l1_t0.3", "tp_l1_t0.5",
                                      "activation_density", "flipout"]
    assert runs[1].folder(Path("runs/compare")) == Path("runs/compare/seed1/polarized_t0.3")
    only = compare.planned_runs(("dense", "flipout"), (0.3,), seed=0)
    assert [(r.method, r.target) for r in only] == [("dense", None), ("flipout", None)]


def test_every_run_trains_the_shared_search_space_and_jobs_split_the_cores(tmp_path, monkeypatch):
    assert compare.base_config(compare.parse_args(["--quick"]))["model"] == "resnet20_proj"
    assert compare.base_config(compare.parse_args(["--quick", "--model", "resnet20"]))["model"] == "resnet20"
    assert compare.base_config(compare.parse_args(["--quick"]))["threads"] is None  # one job: torch's default
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 2)
    assert compare.base_config(compare.parse_args(["--quick", "--jobs", "2"]))["threads"] == 1


def test_a_torch_pruning_arm_is_its_recipe_pruning_to_the_polarized_kept_macs(tmp_path):
    base = compare.base_config(compare.parse_args(["--quick"]))
    arm = compare.run_config(base, compare.Run("tp_group_sl", 0.3, 2), tmp_path, prune_to=0.312)
    assert (arm.method, arm.tp_recipe, arm.seed, arm.target_flops_ratio, arm.name) == \
        ("torch_pruning", "group_sl", 2, 0.312, "tp_group_sl_t0.3")
    assert arm.out_dir == str(tmp_path / "seed2")
    alone = compare.run_config(base, compare.Run("tp_l1", 0.3, 2), tmp_path)  # no polarized row: the target
    assert (alone.tp_recipe, alone.target_flops_ratio) == ("l1_oneshot", 0.3)
    flipout = compare.run_config(base, compare.Run("flipout", None, 0), tmp_path)
    assert flipout.target_flops_ratio == base["target_flops_ratio"] and flipout.seed == 0


def test_reuse_needs_the_same_config_including_the_kept_macs_to_prune_to(tmp_path, monkeypatch):
    base = compare.base_config(compare.parse_args(["--quick"]))
    cfg = compare.run_config(base, compare.Run("tp_l1", 0.5, 0), tmp_path, prune_to=0.487)
    run_dir = tmp_path / "seed0" / cfg.name
    run_dir.mkdir(parents=True)
    for name in ("metrics.json", "export_report.json"):
        (run_dir / name).write_text("{}")
    monkeypatch.setattr(compare, "load_checkpoint", lambda path: {"config": cfg.to_dict()})  # what it recorded
    assert compare.finished_with(run_dir, cfg)
    other = compare.run_config(base, compare.Run("tp_l1", 0.5, 0), tmp_path, prune_to=0.51)
    assert not compare.finished_with(run_dir, other)  # the polarized run reached another figure
    (run_dir / "export_report.json").unlink()
    assert not compare.finished_with(run_dir, cfg)  # trained but never exported


def latency(median: float) -> dict:
    return {batch: {"median_ms": median * scale, "p95_ms": 1.5 * median * scale, "min_ms": 0.5 * median * scale}
            for batch, scale in (("1", 1), ("64", 64))}


def row(method: str, target: float | None, seed: int, accuracy: float, dense_accuracy: float, ms: float,
        flops: float = 0.5, matched: float | None = None) -> dict:
    identity = {"method": method, "label": method, "target": target, "seed": seed, "run": f"seed{seed}/{method}"}
    metrics = {"test_accuracy": accuracy, "flops_ratio": flops, "pruned_flops": 100, "pruned_params": 50,
               "dense_params": 100, "train_seconds": 10.0 + seed}
    return report_io.row_for(identity, metrics, latency(ms), latency(1.0), dense_accuracy, matched)


# Binary fractions: the means and standard deviations below are exact in floating point.
ROWS = [row("dense", None, 0, 0.25, 0.25, 1.0, 1.0), row("polarized", 0.5, 0, 0.125, 0.25, 0.5),
        row("dense", None, 1, 0.5, 0.5, 1.0, 1.0), row("polarized", 0.5, 1, 0.25, 0.5, 0.25),
        row("dense", None, 2, 0.75, 0.75, 1.0, 1.0), row("polarized", 0.5, 2, 0.375, 0.75, 0.5)]


def test_summary_over_seeds_is_mean_and_sample_standard_deviation():
    dense, polarized = report_io.seed_summary(ROWS)
    assert (dense["method"], dense["target"], dense["seeds"]) == ("dense", None, [0, 1, 2])
    assert dense["test_accuracy"] == {"mean": 0.5, "std": 0.25}
    assert dense["gap_points"] == {"mean": 0.0, "std": 0.0}
    assert (polarized["target"], polarized["seeds"]) == (0.5, [0, 1, 2])
    assert polarized["test_accuracy"] == {"mean": 0.25, "std": 0.125}
    assert polarized["gap_points"] == {"mean": 25.0, "std": 12.5}  # 12.5, 25 and 37.5 points below dense
    assert polarized["flops_ratio"] == {"mean": 0.5, "std": 0.0}
    assert polarized["speedup"]["1"]["mean"] == pytest.approx((2 + 4 + 2) / 3)
    assert polarized["latency_ms"]["64"]["mean"] == pytest.approx(64 * 1.25 / 3)
    assert polarized["train_seconds"] == {"mean": 11.0, "std": 1.0}


def test_one_seed_claims_no_spread():
    (_, polarized) = report_io.seed_summary(ROWS[:2])
    assert polarized["test_accuracy"] == {"mean": 0.125, "std": None}


def test_pareto_front_keeps_only_points_nothing_beats():
    points = [(1.0, 0.9), (0.5, 0.85), (0.6, 0.8), (0.3, 0.7), (0.3, 0.6), (0.7, 0.85)]
    assert report_io.pareto_front(points) == [(0.3, 0.7), (0.5, 0.85), (1.0, 0.9)]


def report(rows: list[dict]) -> dict:
    seeds = sorted({r["seed"] for r in rows})
    return {"quick": True, "cpu": "Test CPU", "timing": {"threads": 2},
            "budget": {"dataset": "fashion_mnist", "model": "resnet20", "epochs": 2, "train_subset": 256,
                       "final_sparsity": 0.5, "targets": [0.5], "seeds": seeds},
            "rows": rows, "summary": report_io.seed_summary(rows)}


def test_markdown_adds_the_summary_only_for_several_seeds():
    several = report_io.markdown(report(ROWS))
    assert "## Over 3 seeds" in several
    assert "| polarized | 0.5 | 3 | 0.2500 ± 0.1250 | 25.00 ± 12.50 | 0.500 |" in several
    assert "| polarized | 0.5 | 1 | 0.2500 | 25.00 | 0.500 |" in several  # a row of the every-run table
    single = report_io.markdown(report(ROWS[:2]))
    assert "## Over" not in single and not any("±" in line for line in single.splitlines() if line.startswith("|"))
    assert "| polarized | 0.5 | 0 | 0.1250 | 12.50 | 0.500 | - | 0.1k (0.50) | 10 | n/a | 1.000 " \
           "| 0.500 (2.00x) | 0.250 / 0.750 | 32.00 (2.00x) | 16.00 / 48.00 |" in single
    assert "not per target" in single  # activation density and FlipOut have their own knobs


def test_report_files_are_written(tmp_path):
    report_io.write_report(report(ROWS), tmp_path)
    assert json.loads((tmp_path / "compare.json").read_text())["summary"][1]["gap_points"]["mean"] == 25.0
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Over 3 seeds" in (tmp_path / "compare.md").read_text()


def peer_rows(accuracies: list[float], flops: float = 0.5) -> list[dict]:
    return [row("tp_l1", 0.5, seed, accuracy, 0.75, 0.5, flops, matched=0.5) for seed, accuracy in enumerate(accuracies)]


def test_a_peer_row_is_at_equal_macs_only_within_the_tolerance():
    assert peer_rows([0.1], flops=0.5 - 0.75 * report_io.EQUAL_MACS)[0]["equal_macs"] is True
    assert peer_rows([0.1], flops=0.5 + 1.5 * report_io.EQUAL_MACS)[0]["equal_macs"] is False
    assert ROWS[1]["equal_macs"] is None  # polarized matches nobody


@pytest.mark.parametrize("peer, verdict", [
    ([0.0, 0.0625, 0.125], "win"),        # polarized (0.125, 0.25, 0.375) leads by 18.75 ± 6.25, its sd 12.5
    ([0.375, 0.5, 0.625], "loss"),        # 25 points behind on every seed
    ([0.0625, 0.1875, 0.3125], "tie"),    # 6.25 ahead on every seed, but inside either side's 12.5-point spread
    ([0.125, 0.125, 0.5], "tie"),         # mean lead 0, and the per-seed differences swing by 12.5 points
    ([0.0625, 0.25, 0.375], "tie"),       # leads 2.1 points on average, inside either side's 12.5-point spread
])
def test_polarized_wins_or_loses_only_beyond_the_spread(peer, verdict):
    summary = report_io.seed_summary(ROWS + peer_rows(peer))
    entry = next(e for e in summary if e["method"] == "tp_l1")
    assert entry["equal_macs"] is True and entry["polarized_vs"]["verdict"] == verdict
    assert entry["polarized_vs"]["seeds"] == [0, 1, 2]
    assert "polarized_vs" not in summary[1]  # polarized is not compared with itself


def test_one_seed_is_never_a_win_and_rows_off_the_macs_say_so():
    summary = report_io.seed_summary(ROWS[:2] + peer_rows([0.0], flops=0.6))
    entry = next(e for e in summary if e["method"] == "tp_l1")
    assert entry["polarized_vs"]["verdict"] == "tie" and entry["equal_macs"] is False
    table = "\n".join(report_io.summary_table(summary))
    assert "0.600 (not equal)" in table and "12.50: not at equal MACs" in table


PARENT = """
import concurrent.futures, multiprocessing, os, sys, time
from polarprune.bench.compare import exit_with_parent

def pid_then_sleep():
    return os.getpid()

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=exit_with_parent,
                                                  initargs=(os.getpid(),))
    print(pool.submit(pid_then_sleep).result(), flush=True)
    time.sleep(60)
"""


def test_a_seed_worker_ends_when_the_comparison_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    root = str(Path(compare.__file__).resolve().parents[1])  # the checkout: polarprune imports from there
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)  # no cleanup runs: the worker must notice by itself
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived the killed comparison by 10 s")
