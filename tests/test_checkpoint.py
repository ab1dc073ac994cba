"""checkpoint.pt is read with torch's weights-only unpickler: a file carrying code is refused, never run;
the RNG states survive the trip; checkpoints of the previous format (version 1) still load."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from training.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from training.models import build_model
from training.arch import make_spec


class WritesAFile:
    """Unpickling this creates `marker`: the kind of payload a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def resumable_state() -> dict:
    """What the training loop saves, with a real optimizer and the three RNG states."""
    model = build_model(make_spec("resnet20", 1, 10, (8, 8)))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    sgd.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.random(5)  # move numpy off its seeded state, with a cached gaussian too
    np.random.standard_normal()
    return {"config": {"dataset": "fashion_mnist"}, "spec": model.spec, "gates": None,
            "model": model.state_dict(), "optimizer": sgd.state_dict(), "epoch": 1,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "method_state": {"kept": {"layer1.0": [0, 1]}}, "history": [{"epoch": 1, "loss": 0.5}]}


def test_the_payload_is_live(tmp_path):
    """The control: plain unpickling of the same object does create the file."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(WritesAFile(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["config", "optimizer", "rng"])
def test_a_checkpoint_carrying_code_is_refused_and_the_code_does_not_run(tmp_path, where):
    marker = tmp_path / "ran"
    state = resumable_state()
    state[where] = WritesAFile(marker)
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, **state}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused: it holds pickled Python objects (io.open)"), message
    assert "could run code" in message
    assert not marker.exists()


def test_a_saved_checkpoint_is_plain_data_and_restores_every_rng(tmp_path):
    state = resumable_state()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    loaded = load_checkpoint(path)
    assert loaded["version"] == 2 and loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    expected_numbers = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    torch.set_rng_state(loaded["rng"]["torch"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected_numbers


def test_a_version_1_checkpoint_still_loads(tmp_path):
    """Version 1 pickled numpy's RNG state as an ndarray: numpy's array reconstructor is allowed for it."""
    state = resumable_state()
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **state}, path)
    loaded = load_checkpoint(path)
    numpy_state = loaded["rng"]["numpy"]
    assert numpy_state[0] == "MT19937" and np.array_equal(numpy_state[1], state["rng"]["numpy"][1])
    assert numpy_state[2:] == state["rng"]["numpy"][2:]


def test_numpy_arrays_in_a_version_2_file_are_refused(tmp_path):
    state = resumable_state()
    state["history"] = np.arange(3, dtype=np.uint32)  # what version 1 allows, in a file that claims 2
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, **state}, path)
    with pytest.raises(CheckpointError, match="only checkpoint version 1 did"):
        load_checkpoint(path)
    state["history"] = np.arange(3, dtype=np.int64)  # a dtype not even version 1 needed
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **state}, path)
    with pytest.raises(CheckpointError, match=r"refused or corrupt: the weights-only loader stops at it \(.*Int64DType"):
        load_checkpoint(path)
