"""checkpoint.pt is read with torch's weights-only unpickler: a file carrying code is refused, never run;
the RNG states survive the trip; checkpoints of the formats before traced gates (versions 1, 2) are read
far enough to say so."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from polarprune.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from polarprune.training.networks import NetworkInfo, build_network


class WritesAFile:
    """Unpickling this creates `marker`: the kind of payload a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def resumable_state() -> dict:
    """What the training loop saves, with a real optimizer and the three RNG states."""
    info = NetworkInfo("resnet20", 1, 10, (8, 8))
    model = build_network(info)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    sgd.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.random(5)  # move numpy off its seeded state, with a cached gaussian too
    np.random.standard_normal()
    return {"config": {"dataset": "fashion_mnist"}, "network": info.describe(),
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
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)
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
    assert loaded["version"] == CHECKPOINT_VERSION and loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    expected_numbers = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.setstate(loaded["rng"]["python"])
    np.random.set_state(loaded["rng"]["numpy"])
    torch.set_rng_state(loaded["rng"]["torch"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected_numbers


@pytest.mark.parametrize("version", [1, 2])
def test_checkpoints_from_before_traced_gates_say_so(tmp_path, version):
    """Version 1 pickled numpy's RNG state as an ndarray (numpy's array reconstructor is allowed for it, so
    the header can be read); both older versions described built-in networks with gates inside."""
    path = tmp_path / "checkpoint.pt"
    state = resumable_state()
    if version == 2:
        state.pop("rng")  # version 2 stored numpy's state as tensors
    torch.save({"format": CHECKPOINT_FORMAT, "version": version, **state}, path)
    with pytest.raises(CheckpointError, match=f"version {version} .*before traced gates.*retrain"):
        load_checkpoint(path)


def test_numpy_arrays_in_a_current_file_are_refused(tmp_path):
    state = resumable_state()
    state["history"] = np.arange(3, dtype=np.uint32)  # what version 1 allows, in a file that claims the current
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)
    with pytest.raises(CheckpointError, match="only checkpoint version 1 did"):
        load_checkpoint(path)
    state["history"] = np.arange(3, dtype=np.int64)  # a dtype not even version 1 needed
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **state}, path)
    with pytest.raises(CheckpointError, match=r"refused or corrupt: the weights-only loader stops at it \(.*Int64DType"):
        load_checkpoint(path)
