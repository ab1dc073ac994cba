"""The benchmark helpers on known numbers, and quick smoke runs of the benchmark scripts on tiny models."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polarprune.bench.fixture import FixturePair, required_speedup
from polarprune.bench.networks import close_blocks, dense_network, uneven_inner_widths, write_onnx
from polarprune.bench.speedup import main as speedup_main
from polarprune.bench.timing import compare, efficiency, interleaved, percentile, speedup, summarize
from polarprune.bench.train_overhead import main as train_overhead_main
from polarprune.export.surgery import PRUNED_FILE, save_pruned
from polarprune.training.gating import cut, full_mask, mask_problem
from polarprune.training.mask import Mask, mask_document, save_mask
from polarprune.training.networks import NetworkInfo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a thread pool, and on a busy machine a pool of two stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- timing helpers ------------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile(range(1, 101), 95) == pytest.approx(95.05)
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_reports_milliseconds():
    summary = summarize([0.001, 0.002, 0.003, 0.010])
    assert summary["n"] == 4
    assert summary["median_ms"] == pytest.approx(2.5)
    assert summary["min_ms"] == pytest.approx(1.0)
    assert summary["mean_ms"] == pytest.approx(4.0)
    assert summary["p95_ms"] == pytest.approx(8.95)


def test_interleaving_reverses_the_order_every_round():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("dense", "pruned")}
    times = interleaved(runners, rounds=4, warmup=1)
    assert calls == ["dense", "pruned"] + ["dense", "pruned", "pruned", "dense"] * 2
    assert {name: len(t) for name, t in times.items()} == {"dense": 4, "pruned": 4}


def test_interleaving_times_each_call_and_stops_on_its_budget():
    ticks = iter(range(1000))
    clock = lambda: float(next(ticks))  # every clock read advances one second
    times = interleaved({"a": lambda: None, "b": lambda: None}, rounds=100, warmup=0, budget_s=0.0,
                        min_rounds=3, clock=clock)
    assert times == {"a": [1.0] * 3, "b": [1.0] * 3}


def test_speedup_and_efficiency_on_known_numbers():
    assert speedup(10.0, 5.0) == 2.0
    assert efficiency(2.0, dense_flops=100, pruned_flops=50) == 1.0
    assert efficiency(1.5, dense_flops=100, pruned_flops=50) == 0.75
    result = compare({"dense": [0.010] * 3, "pruned": [0.005] * 3}, batch=64, dense_flops=100, pruned_flops=40)
    assert result["speedup"] == pytest.approx(2.0)
    assert result["efficiency"] == pytest.approx(0.8)
    assert result["images_per_s"] == pytest.approx({"dense": 6400.0, "pruned": 12800.0})


def test_required_speedup_is_a_share_of_the_ideal_one():
    pair = FixturePair(Path("d"), Path("p"), dense_flops=100.0, pruned_flops=50.0, closed_blocks=())
    assert required_speedup(pair, 0.5) == 1.5
    assert required_speedup(pair, 1.0) == 2.0


# ---- synthetic networks --------------------------------------------------------------------------
def test_pruning_shapes_land_near_half_the_macs():
    dense = dense_network("resnet20", (1, 16, 16))
    full = dense.macs(full_mask(dense.graph))
    blocks = close_blocks(dense, 0.5)
    assert 0.45 <= dense.macs(blocks) / full <= 0.55
    shape_changing = {b["name"] for b in dense.spec["blocks"] if b["shortcut"] != "identity"}
    assert blocks.closed_blocks and not shape_changing & set(blocks.closed_blocks)
    free = uneven_inner_widths(dense, 0.5, step=1)
    assert abs(dense.macs(free) / full - 0.5) <= 0.03
    widths = dense.inner_widths(free)
    assert sum(w % 8 != 0 for w in widths) > len(widths) / 2  # off the 8-blocks
    rounded = uneven_inner_widths(dense, 0.5, step=16)
    assert all(w % 16 == 0 for w in dense.inner_widths(rounded))


# ---- script smoke runs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder as the export stage leaves it, for ResNet-20 at 1x8x8: mask.json, pruned_model.pt2 and
    both ONNX files."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    dense = dense_network("resnet20", (1, 8, 8))
    closed = ["layer1.1", "layer3.2"]
    gone = {g for b in closed for g in dense.graph.groups_inside(b)}
    kept = {name: list(range(max(1, group.width // 2))) for name, group in dense.graph.prunable().items()
            if name not in gone}
    mask = Mask(kept, closed)
    network = NetworkInfo("resnet20", 1, 10, (8, 8)).describe()
    save_mask(run_dir / "mask.json", mask_document(mask, mask_problem(dense.graph), network, 1))
    write_onnx(dense, full_mask(dense.graph), run_dir / "dense.onnx")
    write_onnx(dense, mask, run_dir / "pruned.onnx")
    save_pruned(run_dir / PRUNED_FILE, cut(dense.graph, mask, dense.graph.module), (1, 8, 8))
    return run_dir


def run_script(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m bench.<module>`, as the Makefile runs it (no sys.path edits in the scripts)."""
    return subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_speedup_quick_writes_a_complete_report(tiny_run, tmp_path):
    out = tmp_path / "speedup.json"
    done = run_script("speedup", "--run", str(tiny_run), "--quick", "--threads", "1", "--rounds", "5",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "efficiency" in done.stdout
    report = json.loads(out.read_text())
    assert 0 < report["flops"]["ratio"] < 1
    assert {(r["engine"], r["batch"]) for r in report["results"]} == {
        (engine, batch) for engine in ("onnxruntime", "torch") for batch in (1, 64)}
    for result in report["results"]:
        assert result["dense"]["n"] >= 5 and result["pruned"]["median_ms"] > 0
        assert result["speedup"] > 0 and result["efficiency"] > 0 and math.isfinite(result["efficiency"])
    assert report["settings"]["onnxruntime_session"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert report["settings"]["onnxruntime_session"]["intra_op_num_threads"] == 1
    assert "skipped" in report["served"]


def test_speedup_names_the_missing_export(tmp_path, tiny_run, capsys):
    run_dir = tmp_path / "unexported"
    run_dir.mkdir()
    (run_dir / "mask.json").write_text((tiny_run / "mask.json").read_text())
    assert speedup_main(["--run", str(run_dir), "--quick"]) == 2
    assert "make export" in capsys.readouterr().err


def test_train_overhead_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "train_overhead.json"
    # In this process: a second torch start-up would double the test's time.
    assert train_overhead_main(["--quick", "--threads", "1", "--batch", "8", "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "resnet20" and report["input_shape"] == [1, 28, 28] and report["batch"] == 8
    assert report["dense"]["n"] == 2 and report["gated"]["n"] == 2
    assert report["dense"]["median_ms"] > 0 and report["gated"]["median_ms"] > 0
    assert math.isfinite(report["overhead_percent"]) and report["goal_percent"] == 5.0


def _finished_run(folder, accuracy, **config):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"test_accuracy": accuracy, "flops_ratio": 0.49, "train_seconds": 10.0, "epochs": 4,
         "projection": {"learned_flops_ratio": 0.53}, "config": {"epochs": 4, **config}}))


def test_seeds_summary_from_finished_runs(tmp_path):
    """bench.seeds on run folders laid out as the seed runs leave them: per-seed gaps, mean and spread."""
    from polarprune.bench.seeds import main as seeds_main

    runs = tmp_path / "runs"
    for seed, (polarized, dense) in enumerate([(0.86, 0.875), (0.87, 0.872), (0.85, 0.87)]):
        _finished_run(runs / f"fmnist_resnet20_seed{seed}", polarized)
        _finished_run(runs / f"fmnist_resnet20_dense_seed{seed}", dense)
    out = tmp_path / "seeds.json"
    assert seeds_main(["--runs", str(runs), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (arm,) = result["arms"]
    assert [round(r["gap_points"], 6) for r in arm["seeds"]] == [1.5, 0.2, 2.0]
    assert arm["mean_gap_points"] == pytest.approx(1.2333333)
    assert arm["stdev_gap_points"] == pytest.approx(0.9291573)  # sample standard deviation of the gaps
    assert arm["compute_epochs"] == [4]
    assert "python -m bench.seeds" in result["sources"]
    assert seeds_main(["--runs", str(runs), "--seeds", "0,7", "--out", str(out)]) == 2  # seed 7 never ran


def test_seeds_arms_count_the_dense_run_a_fine_tune_started_from(tmp_path):
    from polarprune.bench.seeds import main as seeds_main

    for seed in (0, 1):
        _finished_run(tmp_path / f"dense{seed}", 0.87)
        _finished_run(tmp_path / f"scratch{seed}", 0.86)
        _finished_run(tmp_path / f"ft{seed}", 0.88, init_weights=str(tmp_path / f"dense{seed}" / "checkpoint.pt"))
    out = tmp_path / "levers.json"
    assert seeds_main(["--dense", str(tmp_path / "dense{seed}"), "--seeds", "0,1", "--out", str(out),
                       "--arm", f"scratch={tmp_path}/scratch{{seed}}", "--arm", f"fine-tune={tmp_path}/ft{{seed}}"]) == 0
    scratch, fine_tune = json.loads(out.read_text())["arms"]
    assert (scratch["label"], scratch["compute_epochs"], round(scratch["mean_gap_points"], 6)) == ("scratch", [4], 1.0)
    assert (fine_tune["label"], fine_tune["compute_epochs"], round(fine_tune["mean_gap_points"], 6)) == \
        ("fine-tune", [8], -1.0)
    assert fine_tune["stdev_gap_points"] == 0.0
    assert seeds_main(["--dense", str(tmp_path / "dense{seed}"), "--seeds", "0,1", "--out", str(out),
                       "--arm", f"one seed@1={tmp_path}/ft{{seed}}"]) == 0
    (arm,) = json.loads(out.read_text())["arms"]
    assert [row["seed"] for row in arm["seeds"]] == [1] and arm["stdev_gap_points"] is None
    assert seeds_main(["--arm", "no pattern", "--out", str(out)]) == 2
    assert seeds_main(["--dense", str(tmp_path / "dense{seed}"), "--seeds", "0,1", "--out", str(out),
                       "--arm", f"seed 5@5={tmp_path}/ft{{seed}}"]) == 2  # no dense run of seed 5


def test_seeds_record_each_runs_last_epoch_training_accuracy_and_render_validation_per_seed(tmp_path):
    """The last line of log.jsonl gives the fit a run ended with; the validation table puts every seed's
    validation accuracy side by side, "-" for a seed an arm did not run."""
    from polarprune.bench.seeds import main as seeds_main
    from scripts.render_readme import seeds_validation_table

    for seed, val in ((0, 0.871), (1, 0.882)):
        _finished_run(tmp_path / f"dense{seed}", 0.87)
        _finished_run(tmp_path / f"ft{seed}", 0.88)
        metrics = json.loads((tmp_path / f"ft{seed}" / "metrics.json").read_text())
        (tmp_path / f"ft{seed}" / "metrics.json").write_text(json.dumps({**metrics, "val_accuracy": val}))
    dense0 = json.loads((tmp_path / "dense0" / "metrics.json").read_text())
    (tmp_path / "dense0" / "metrics.json").write_text(json.dumps({**dense0, "val_accuracy": 0.86}))
    (tmp_path / "ft0" / "log.jsonl").write_text(
        json.dumps({"epoch": 1, "train_accuracy": 0.8}) + "\n" + json.dumps({"epoch": 2, "train_accuracy": 0.9}) + "\n")
    out = tmp_path / "levers.json"
    assert seeds_main(["--dense", str(tmp_path / "dense{seed}"), "--seeds", "0,1", "--out", str(out),
                       "--arm", f"fine-tune={tmp_path}/ft{{seed}}", "--arm", f"one seed@1={tmp_path}/ft{{seed}}"]) == 0
    document = json.loads(out.read_text())
    assert [row["train_accuracy"] for row in document["arms"][0]["seeds"]] == [0.9, None]  # seed 1 has no log
    header, _, both, one = seeds_validation_table(document)[:4]
    assert header.startswith("| training | val, seed 0 | val, seed 1 | val (mean) | training accuracy")
    assert both == "| fine-tune | 0.8710 | 0.8820 | 0.8765 | 0.900 |"
    assert one == "| one seed | - | 0.8820 | 0.8820 | - |"
    assert seeds_validation_table(document)[4] == "| the dense reference | 0.8600 | - | 0.8600 | - |"


def test_seeds_count_the_epochs_of_every_run_an_arm_stands_on(tmp_path):
    """Compute is counted from the runs themselves, not from the --dense reference: a fine-tune of a 4-epoch
    dense run compared with an 8-epoch one paid 8 epochs, and the learned network it found, trained from
    scratch for 8, paid 16. A source that is not on disk leaves the count unknown, not guessed."""
    from polarprune.bench.seeds import compute_epochs

    _finished_run(tmp_path / "dense4", 0.87)
    _finished_run(tmp_path / "ft", 0.88, init_weights=str(tmp_path / "dense4" / "checkpoint.pt"))
    ft = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert compute_epochs(ft, ft["config"]) == 8
    scratch = {"epochs": 8, "config": {"model": "polarprune.bench.scratch:learned_network",
                                       "model_args": {"run": str(tmp_path / "ft")}}}
    assert compute_epochs(scratch, scratch["config"]) == 16
    own_network = {"epochs": 8, "config": {"model": "mypackage.nets:make", "model_args": {"run": str(tmp_path / "ft")}}}
    assert compute_epochs(own_network, own_network["config"]) == 8  # only bench.scratch's argument names a run
    gone = {"epochs": 4, "config": {"init_weights": str(tmp_path / "deleted" / "checkpoint.pt")}}
    assert compute_epochs(gone, gone["config"]) is None


def test_seeds_count_a_network_of_its_own_against_the_dense_runs_macs(tmp_path):
    """A learned network trained from scratch reports its MACs against itself (flops_ratio 1.0); bench.seeds
    counts them against the dense run's network, and compares no mask of it with another's."""
    from polarprune.bench.seeds import main as seeds_main

    for seed in (0, 1):
        _finished_run(tmp_path / f"dense{seed}", 0.87)
        _finished_run(tmp_path / f"scratch{seed}", 0.86)
        for folder, flops in ((f"dense{seed}", (1000, 1000, 1.0)), (f"scratch{seed}", (400, 400, 1.0))):
            metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
            metrics.update(zip(("dense_flops", "pruned_flops", "flops_ratio"), flops))
            (tmp_path / folder / "metrics.json").write_text(json.dumps(metrics))
        (tmp_path / f"scratch{seed}" / "mask.json").write_text("not read: the network is not the dense one")
    out = tmp_path / "levers.json"
    assert seeds_main(["--dense", str(tmp_path / "dense{seed}"), "--seeds", "0,1", "--out", str(out),
                       "--arm", f"scratch={tmp_path}/scratch{{seed}}"]) == 0
    (arm,) = json.loads(out.read_text())["arms"]
    assert [row["flops_ratio"] for row in arm["seeds"]] == [0.4, 0.4] and arm["mean_flops_ratio"] == 0.4
    assert arm["mask_overlap"] is None


def test_the_learned_network_from_scratch_has_the_masks_widths_and_a_fresh_draw(tmp_path):
    """bench.scratch: the run's pruned network, its MACs those of the mask, its layers initialised anew at
    their cut width (Kaiming fan-out, as the built-in initialises itself), not the dense draw cut down."""
    from export_fixtures import make_run
    from polarprune.bench.scratch import learned_network
    from polarprune.training.graph import trace_network

    run = make_run(tmp_path / "run", "resnet20", (16, 16), seed=1, closed_blocks=["layer2.0"], round_to=4)
    document = json.loads((run / "mask.json").read_text())
    network = learned_network(str(run))
    problem = mask_problem(trace_network(network, torch.zeros(2, 1, 16, 16)))
    assert round(problem.cost(problem.full())) == document["pruned_flops"] != document["dense_flops"]
    assert not any(name.startswith("layer2.0.") for name, _ in network.named_modules())
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    # A group cut to half its width or less: the dense draw cut down would be >= 1.41x too narrow there.
    assert any(2 * len(kept) <= document["group_widths"][group] for group, kept in document["kept_channels"].items())
    for conv in convs:  # fan-out Kaiming: std = sqrt(2 / (out_channels * 9))
        expected = math.sqrt(2 / (conv.out_channels * 9))
        assert abs(conv.weight.std().item() / expected - 1) < 0.15, (conv, conv.weight.std().item(), expected)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.running_mean.any() for m in norms)


def test_block_shock_zero_is_the_cut_network_and_mean_is_measured(tmp_path):
    """bench.block_shock's "zero" is what the cut network with that block closed scores on the same images;
    "mean" replaces the branch by a constant, so it differs; a block the network lacks is refused."""
    from polarprune.bench.block_shock import main as shock_main
    from polarprune.training.data import load_splits
    from polarprune.training.data.images import normalize

    dense = dense_network("resnet20", (1, 28, 28))
    network = dense.graph.module
    for module in network.modules():  # BN statistics that are not the identity, so the branches carry offsets
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.bias.data.uniform_(-0.5, 0.5)
    run = tmp_path / "dense"
    run.mkdir()
    torch.save({"model": network.state_dict()}, run / "checkpoint.pt")
    info = NetworkInfo("resnet20", 1, 10, (28, 28))
    save_mask(run / "mask.json", mask_document(full_mask(dense.graph), mask_problem(dense.graph), info.describe(), 16))
    config = {"dataset": "fashion_mnist", "data_dir": None, "train_subset": 300, "val_size": 200, "seed": 0}
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.1, "epochs": 1, "config": config}))
    out = tmp_path / "shock.json"
    assert shock_main(["--run", str(run), "--close", "layer1.1,layer3.2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["blocks"] for row in result["single"]][:2] == [["layer1.0"], ["layer1.1"]]
    assert len(result["single"]) == 9 and result["val_images"] == 200

    data, _, val, _ = load_splits("fashion_mnist", None, 300, 200, 0)
    images = normalize(val.images, data)
    closed = ["layer1.1", "layer3.2"]
    gone = {g for b in closed for g in dense.graph.groups_inside(b)}
    mask = Mask({name: list(range(group.width)) for name, group in dense.graph.prunable().items() if name not in gone},
                closed)
    pruned = cut(dense.graph, mask, network).eval()
    with torch.no_grad():
        cut_accuracy = int((pruned(images).argmax(1) == val.labels).sum()) / len(val.labels)
    (together,) = result["sets"]
    assert together["zero"] == pytest.approx(cut_accuracy, abs=1e-9)
    assert together["mean"] != together["zero"] or result["intact_val_accuracy"] == together["zero"]
    assert shock_main(["--run", str(run), "--close", "layer9.9", "--out", str(out)]) == 2
