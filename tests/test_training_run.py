"""Short real runs on a Fashion-MNIST subset: the target is met, the artifacts are complete, resume works."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polarprune.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, trained_model
from polarprune.training.config import make_config
from polarprune.training.flops import count_macs
from polarprune.training.gating import GatedNetwork, cut, masked_network
from polarprune.training.graph import trace_network
from polarprune.training.loop import RunError, cosine_schedule, train
from polarprune.training.mask import load_mask
from polarprune.training.network_file import load_network
from polarprune.training.networks import NetworkInfo, build_network

from run_helpers import kill_after_first_checkpoint, training_command

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(dataset="fashion_mnist", model="resnet20", epochs=3, batch_size=64, train_subset=1536,
             val_size=256, test_subset=1000, eval_batch_size=500, progress=False, seed=0, threads=2,
             device="cpu",  # explicit: "auto" would move these runs to a GPU where one exists
             ramp_fraction=0.4, freeze_fraction=0.6)  # the mask freezes in epoch 2 of 3


def quick_config(tmp_path, **overrides):
    return make_config({**QUICK, "out_dir": str(tmp_path), "name": "run", **overrides})


@pytest.fixture(scope="module")
def polarized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    metrics = train(quick_config(out, target_flops_ratio=0.5))
    return out / "run", metrics


def test_the_weights_schedule_starts_again_at_the_step_the_method_names():
    restart = [None]
    factor = cosine_schedule(100, lambda: restart[0])
    plain = [factor(step) for step in range(101)]
    assert plain[0] == 1 and plain[50] == pytest.approx(0.5) and plain[100] == pytest.approx(0)
    restart[0] = 40  # e.g. the polarized mask froze at step 40
    assert [factor(step) for step in range(40)] == plain[:40]
    assert factor(40) == 1 and factor(70) == pytest.approx(0.5) and factor(100) == pytest.approx(0)
    assert factor(130) == pytest.approx(0)
    restart[0] = 100  # a step at or past the end starts nothing
    assert [factor(step) for step in range(101)] == plain


def test_short_run_meets_its_flops_target_and_learns(polarized_run):
    run_dir, metrics = polarized_run
    assert abs(metrics["flops_ratio"] - 0.5) <= 0.03
    assert metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert 0 < metrics["params_ratio"] < 1
    for key in ("dataset", "model", "method", "epochs", "test_accuracy", "dense_flops", "pruned_flops",
                "flops_ratio", "params_ratio", "target_flops_ratio", "kept_channels", "removed_blocks",
                "train_seconds"):
        assert key in metrics
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for name in ("checkpoint.pt", "network.pt", "mask.json", "log.jsonl", "progress.png", "gate_scores.png"):
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 3


def test_network_file_holds_the_trained_network_and_names_its_mask(polarized_run, tmp_path):
    """network.pt (export's input) with mask.json computes what the checkpoint's gated network computes;
    it holds no gates and no copy of the mask, only its digest. A finished run resumed without it (a run
    from before network.pt) writes it again."""
    run_dir, metrics = polarized_run
    trained = load_network(run_dir / "network.pt")
    _, mask = load_mask(run_dir / "mask.json")
    assert trained.mask_sha256 == mask.digest() and trained.method == "polarized"
    assert not any("gate" in key for key in trained.network.state_dict())
    state = load_checkpoint(run_dir / "checkpoint.pt")
    gated, _ = trained_model(state, run_dir / "checkpoint.pt")
    images = torch.randn(8, *trained.info.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(masked_network(trained.graph, trained.network, mask)(images), gated.eval()(images),
                              atol=1e-5)
    assert trained.data["dataset"] == "fashion_mnist" and trained.normalization["mean"] == metrics["data"]["mean"]

    shutil.copytree(run_dir, tmp_path / "run")
    (tmp_path / "run" / "network.pt").unlink()
    again = train(quick_config(tmp_path, target_flops_ratio=0.5), resume=True)
    assert again["kept_channels"] == metrics["kept_channels"]
    assert load_network(tmp_path / "run" / "network.pt").mask_sha256 == mask.digest()


def test_mask_rebuilds_the_pruned_network_from_its_network_description(polarized_run):
    run_dir, metrics = polarized_run
    document, mask = load_mask(run_dir / "mask.json")
    info = NetworkInfo.from_dict(document["network"])  # mask.json alone names the network it cuts
    graph = trace_network(build_network(info), info.example_input())
    pruned = cut(graph, mask, graph.module)
    assert count_macs(pruned, info.input_shape) == metrics["pruned_flops"] == document["pruned_flops"]
    for name, kept in mask.kept_channels.items():
        assert len(kept) % 16 == 0, (name, len(kept))  # round_to
    # The cut network has exactly the mask's widths, and the closed blocks' layers are gone.
    widths = {name: g.width for name, g in trace_network(pruned, info.example_input()).prunable().items()}
    assert widths == {name: len(kept) for name, kept in mask.kept_channels.items()}
    modules = dict(pruned.named_modules())
    assert mask.closed_blocks == metrics["removed_blocks"]
    assert not any(path in modules for block in mask.closed_blocks for path in graph.blocks[block].branch_modules)


def test_checkpoint_round_trip_reproduces_the_reported_accuracy(polarized_run):
    run_dir, metrics = polarized_run
    from polarprune.training.data import BatchIterator, load_splits
    state = load_checkpoint(run_dir / "checkpoint.pt")
    model, _, _ = model_from_checkpoint(state)
    model.eval()
    info, _, _, test = load_splits("fashion_mnist", None, None, 0, 0)
    test = test.subset(torch.arange(1000))
    correct = 0
    with torch.no_grad():
        for images, labels in BatchIterator(test, info, 500, train=False, seed=0).epoch(0):
            correct += int((model(images).argmax(1) == labels).sum())
    assert correct / 1000 == pytest.approx(metrics["test_accuracy"], abs=1e-9)


def test_resume_after_interruption_gives_the_same_run(tmp_path, polarized_run, monkeypatch):
    _, full = polarized_run
    cfg = quick_config(tmp_path, target_flops_ratio=0.5)
    run_dir = tmp_path / "run"
    import polarprune.training.loop as loop
    save = loop.save_checkpoint

    def save_then_die_after_epoch_2(path, state):  # as if killed right after the second checkpoint
        save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(loop, "save_checkpoint", save_then_die_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2
    assert not (run_dir / "metrics.json").exists()
    resumed = train(cfg, resume=True)
    assert resumed["removed_blocks"] == full["removed_blocks"]
    assert resumed["kept_channels"] == full["kept_channels"]
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"], abs=0.01)
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == 3
    # The mask froze before the interruption, so the resumed run continues the schedule restarted there.
    assert full["freeze"]["progress"] < 2 / 3 and resumed["freeze"] == full["freeze"]
    learning_rates = lambda folder: [json.loads(line)["lr"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert learning_rates(run_dir) == pytest.approx(learning_rates(polarized_run[0]), rel=1e-9)


def test_existing_run_is_not_overwritten(polarized_run):
    run_dir, _ = polarized_run
    cfg = quick_config(run_dir.parent)
    with pytest.raises(RunError, match="--resume"):
        train(cfg)


def test_dense_method_trains_with_the_same_loop(tmp_path):
    metrics = train(quick_config(tmp_path, method="dense", epochs=1))
    assert metrics["flops_ratio"] == 1.0 and metrics["removed_blocks"] == []
    assert metrics["test_accuracy"] > 0.3
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # the plain network, no gate in it
    assert not any("gates." in key for key in state["model"])
    assert not isinstance(model_from_checkpoint(state)[0], GatedNetwork)


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path, polarized_run):
    run_dir, _ = polarized_run
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert "network.layer3.2.conv1.weight" in state["model"]
    state["model"]["network.layer3.2.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(state)


def test_cli_refuses_bad_config_with_the_key_named(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "--set", "target_flops_ratio=1.7",
                             "--set", f"out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "target_flops_ratio" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_dynamic_gates_vote_a_consensus_mask(tmp_path):
    metrics = train(quick_config(tmp_path, dynamic_gates=True, epochs=2))
    assert metrics["dynamic_gates"] is True
    assert 0.5 <= metrics["consensus_agreement"] <= 1.0
    assert abs(metrics["flops_ratio"] - 0.5) <= 0.03
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    model, _, _ = model_from_checkpoint(state)
    assert all(gate.is_frozen for gate in model.gates().values())


def test_sigkilled_run_resumes_to_the_mask_of_an_uninterrupted_run(tmp_path, polarized_run):
    _, full = polarized_run
    overrides = {**QUICK, "target_flops_ratio": 0.5, "out_dir": str(tmp_path), "name": "run"}
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    kill_after_first_checkpoint(training_command(overrides), checkpoint)
    assert load_checkpoint(checkpoint)["epoch"] < QUICK["epochs"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = train(make_config(overrides), resume=True)
    assert (resumed["kept_channels"], resumed["removed_blocks"]) == (full["kept_channels"], full["removed_blocks"])
    for name in ("checkpoint.pt", "mask.json", "metrics.json", "log.jsonl", "progress.png"):
        assert (tmp_path / "run" / name).is_file(), name
    _, mask = load_mask(tmp_path / "run" / "mask.json")  # valid, and the one metrics.json reports
    assert {unit: len(kept) for unit, kept in mask.kept_channels.items()} == resumed["kept_channels"]


def test_a_finished_run_is_not_lengthened(tmp_path, polarized_run):
    """Its last checkpoint holds the network it deploys (gates frozen, put back in the dense shape) beside
    the optimiser of the network it had cut: training on from there crashed inside torch."""
    run_dir, _ = polarized_run
    shutil.copytree(run_dir, tmp_path / "run")
    with pytest.raises(RunError, match=r"epochs=4: .*is a finished run of 3 epochs.*train a new, longer run"):
        train(quick_config(tmp_path, target_flops_ratio=0.5, epochs=4), resume=True)


def test_resume_from_a_checkpoint_without_optimizer_state_is_refused(tmp_path, polarized_run):
    from polarprune.training.checkpoint import save_checkpoint
    run_dir, _ = polarized_run
    state = load_checkpoint(run_dir / "checkpoint.pt")
    del state["optimizer"], state["rng"]
    state.pop("format"), state.pop("version")
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", state)
    with pytest.raises(RunError, match="holds no optimizer or rng state, so the run cannot go on"):
        train(quick_config(tmp_path, target_flops_ratio=0.5), resume=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]
