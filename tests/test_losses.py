"""The task loss: label smoothing, distillation from a teacher run, and refusing a teacher of other data."""
import pytest
import torch
import torch.nn.functional as F

from polarprune.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from polarprune.training.config import ConfigError, make_config
from polarprune.training.data import FMNIST_SEARCH_DIRS
from polarprune.training.loop import train
from polarprune.training.losses import TaskLoss

needs_fmnist = pytest.mark.skipif(not any((d / "train-images-idx3-ubyte.gz").is_file() for d in FMNIST_SEARCH_DIRS),
                                  reason="Fashion-MNIST not installed (make data)")
TINY = dict(dataset="fashion_mnist", model="resnet20", epochs=1, batch_size=64, train_subset=256, val_size=64,
            test_subset=128, progress=False, device="cpu", threads=1)


def test_distillation_pulls_towards_the_teacher_and_vanishes_when_they_agree():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    images, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = TaskLoss(teacher=teacher, weight=1.0, temperature=2.0)
    assert float(loss(teacher(images).detach(), images, labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(torch.zeros(8, 3), images, labels)) > 0.0
    plain = TaskLoss(label_smoothing=0.1)
    logits = torch.randn(8, 3)
    assert torch.equal(plain(logits, images, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))


@needs_fmnist
def test_a_run_distils_from_a_dense_run_of_the_same_data(tmp_path):
    train(make_config({**TINY, "method": "dense", "out_dir": str(tmp_path), "name": "teacher"}))
    metrics = train(make_config({**TINY, "out_dir": str(tmp_path), "name": "student", "label_smoothing": 0.1,
                                 "distill_from": str(tmp_path / "teacher")}))
    assert 0 < metrics["test_accuracy"] <= 1
    state = load_checkpoint(tmp_path / "teacher" / "checkpoint.pt")
    state["network"]["input_size"] = [32, 32]  # a teacher of other images
    (tmp_path / "other").mkdir()
    save_checkpoint(tmp_path / "other" / "checkpoint.pt", state)
    with pytest.raises(ConfigError, match="distill_from.*other inputs or classes"):
        train(make_config({**TINY, "out_dir": str(tmp_path), "name": "wrong", "distill_from": str(tmp_path / "other")}))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(make_config({**TINY, "out_dir": str(tmp_path), "name": "none", "distill_from": str(tmp_path / "nowhere")}))
