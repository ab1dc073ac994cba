"""Data-parallel training: 2 CPU processes under torchrun (gloo) end as one consensus network."""
import json
import subprocess

import pytest
import torch

from polarprune.training.checkpoint import load_checkpoint, model_from_checkpoint
from polarprune.training.data import BatchIterator, DatasetInfo, ImageSet
from polarprune.training.distributed import Cluster, DistributedError, check_consensus, fingerprint
from polarprune.training.gating import GatedNetwork
from polarprune.training.graph import trace_network
from polarprune.training.mask import load_mask
from polarprune.training.networks import NetworkInfo, build_network

from run_helpers import ENV, ROOT, kill_after_first_checkpoint, training_command

# Two epochs with the freeze after the first: the run re-wraps DDP around newly frozen gates.
TINY = dict(dataset="fashion_mnist", model="resnet20", epochs=3, batch_size=64, train_subset=768,
            val_size=128, test_subset=256, eval_batch_size=128, progress=False, seed=0,
            target_flops_ratio=0.5, freeze_fraction=0.34, device="cpu")  # device cpu: gloo, on any host
ARTIFACTS = ("checkpoint.pt", "network.pt", "mask.json", "metrics.json", "log.jsonl", "progress.png", "gate_scores.png")


def run_parallel(settings: dict) -> subprocess.CompletedProcess:
    return subprocess.run(training_command(settings, nproc=2), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = run_parallel({**TINY, "out_dir": out, "name": "run"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run", json.loads((out / "run" / "metrics.json").read_text()), result


def test_both_ranks_end_with_identical_gates_and_weights(parallel_run):
    run_dir, metrics, _ = parallel_run
    parallel = metrics["distributed"]
    assert parallel["world_size"] == 2 and parallel["backend"] == "gloo"
    ranks = parallel["rank_fingerprints"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    # The fingerprints are of the network rank 0 saved: recompute them from checkpoint.pt.
    saved, _, _ = model_from_checkpoint(load_checkpoint(run_dir / "checkpoint.pt"))
    assert fingerprint(saved) == ranks[0]
    assert all(gate.is_frozen for gate in saved.gates().values())


def test_parallel_run_directory_is_complete(parallel_run):
    run_dir, metrics, result = parallel_run
    for name in ARTIFACTS:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp")), "a half-written artifact was left behind"
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == TINY["epochs"]
    document, mask = load_mask(run_dir / "mask.json")
    assert abs(metrics["flops_ratio"] - TINY["target_flops_ratio"]) <= 0.03
    assert metrics["train_energy"]["joules"] > 0 and metrics["train_energy"]["scope"].endswith("2 processes")
    assert result.stdout.count("finished:") == 2  # both ranks ran to the end; only rank 0 logged epochs
    assert result.stdout.count('"epoch": 1,') == 1


def test_killed_parallel_run_resumes_to_the_uninterrupted_network(parallel_run, tmp_path):
    _, full, _ = parallel_run
    settings = {**TINY, "out_dir": tmp_path, "name": "run"}
    kill_after_first_checkpoint(training_command(settings, nproc=2), tmp_path / "run" / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] < TINY["epochs"]
    result = subprocess.run(training_command(settings, nproc=2) + ["--resume"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # Bit-identical: same weights and gates as the run that was never interrupted.
    assert resumed["distributed"]["rank_fingerprints"] == full["distributed"]["rank_fingerprints"]
    assert (resumed["kept_channels"], resumed["removed_blocks"]) == (full["kept_channels"], full["removed_blocks"])


def test_consensus_check_names_the_rank_that_drifted():
    same = {"weights_sha256": "a", "gates_sha256": "g"}
    check_consensus([same, dict(same)])
    with pytest.raises(DistributedError, match=r"ranks \[1\] ended with different gates"):
        check_consensus([same, {**same, "gates_sha256": "h"}])
    with pytest.raises(DistributedError, match=r"ranks \[2\] ended with different weights"):
        check_consensus([same, same, {**same, "weights_sha256": "b"}])


def test_fingerprint_sees_one_changed_gate_score_and_one_changed_weight():
    info = NetworkInfo("resnet20", 1, 10, (28, 28))
    model = GatedNetwork(trace_network(build_network(info), info.example_input()))
    before = fingerprint(model)
    for gate in ("channel_gates.layer2__1__conv1", "block_gates.layer2__1"):
        with torch.no_grad():
            model.gates()[gate].score[0] += 1e-6
        after_gate = fingerprint(model)
        assert after_gate["gates_sha256"] != before["gates_sha256"], gate
        assert after_gate["weights_sha256"] == before["weights_sha256"], gate
        before = after_gate
    with torch.no_grad():
        model.network.stem.conv.weight.view(-1)[0] += 1e-6
    after_weight = fingerprint(model)
    assert after_weight["weights_sha256"] != before["weights_sha256"]
    assert after_weight["gates_sha256"] == before["gates_sha256"]


def test_rank_shards_together_are_the_one_process_batches():
    info = DatasetInfo(name="toy", in_channels=1, num_classes=10, input_size=(8, 8), mean=(0.5,), std=(0.25,),
                       crop_padding=2, horizontal_flip=True)
    data = ImageSet(torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8), torch.arange(50) % 10)
    whole = list(BatchIterator(data, info, 12, train=True, seed=3).epoch(2))
    shards = [list(BatchIterator(data, info, 12, train=True, seed=3, shard=(rank, 3)).epoch(2)) for rank in range(3)]
    assert all(len(s) == len(whole) for s in shards)
    for step, (images, labels) in enumerate(whole):
        # rank r holds examples r, r+3, r+6, ... of each global batch, crops and flips included
        for rank in range(3):
            shard_images, shard_labels = shards[rank][step]
            assert torch.equal(shard_images, images[rank::3]) and torch.equal(shard_labels, labels[rank::3])
    evaluation = [list(BatchIterator(data, info, 7, train=False, seed=3, shard=(rank, 3)).epoch(0)) for rank in range(3)]
    assert torch.equal(torch.cat([l for batches in evaluation for _, l in batches]), data.labels)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        BatchIterator(data, info, 10, train=True, seed=3, shard=(0, 3))


def test_one_process_cluster_is_a_no_op():
    cluster = Cluster()
    assert not cluster.distributed and cluster.is_main and cluster.shard == (0, 1)
    assert cluster.sum([1.0, 2.0]) == [1.0, 2.0] and cluster.gather("x") == ["x"]
    assert cluster.from_main(lambda: 7) == 7


def test_activation_density_resizes_alike_on_every_rank(tmp_path):
    """Each rank counts activations on its own shard; the resize must use the counts of all ranks, or
    the ranks cut different channels (checked: without the sum the run fails its consensus check)."""
    settings = {**TINY, "method": "activation_density", "density_every": 1, "epochs": 2, "out_dir": tmp_path,
                "name": "run"}
    result = run_parallel(settings)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ranks = metrics["distributed"]["rank_fingerprints"]
    assert ranks[0] == ranks[1]
    assert metrics["resizes"][0]["changed"] and metrics["flops_ratio"] < 1


def test_two_gpu_processes_train_with_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices for NCCL, torch sees {torch.cuda.device_count()}")
    result = run_parallel({**TINY, "epochs": 2, "device": "cuda", "out_dir": tmp_path, "name": "run"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["distributed"]["backend"] == "nccl" and metrics["device"] == "cuda:0"
    ranks = metrics["distributed"]["rank_fingerprints"]
    assert ranks[0] == ranks[1]
