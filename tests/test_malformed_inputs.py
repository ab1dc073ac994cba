"""Malformed input at every door (issue 7): configs, checkpoints, mask.json, model repository contents,
run artifacts and client requests.

Each case asserts the error type, the part of the message that tells the user what is wrong (file, key,
input) and that nothing was written, or that the server answered and stayed healthy. Cases covered
elsewhere are not repeated here; each section names where they live.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import polarprune.export.triton_repo as triton_repo
from polarprune.bench.compare import main as compare_main
from polarprune.bench.shapes import main as shapes_main
from polarprune.bench.speedup import main as speedup_main
from polarprune.bench.train_overhead import main as train_overhead_main
from polarprune.common.cli import EXIT_BAD_INPUT, EXIT_CODES, EXIT_OK
from polarprune.export.__main__ import main as export_main
from polarprune.export.api import ExportOptions, write_triton_models
from polarprune.common.model_repository import RepositoryError, parse_config
from polarprune.export.triton_repo import TritonModelOptions, read_onnx_signature, write_model_version, write_model_versions
from export_fixtures import make_run, single_torch_thread, trained_model  # noqa: F401 (autouse fixture)
from polarprune.serving.__main__ import main as serving_main
from polarprune.serving.client import InputSpecError, ServingError, TritonClassifier
from polarprune.serving.run_artifacts import RunArtifactsError, RunArtifactsMissing, load_run
from polarprune.serving.errors import ServerError
from polarprune.serving.server import LocalTriton, LocalTritonConfig
from test_checkpoint import WritesAFile
from tiny_onnx import tiny_classifier
from run_helpers import require_triton
from polarprune.training.__main__ import main as training_main
from polarprune.training.arch import SpecError
from polarprune.training.checkpoint import CheckpointError, describe_model, load_checkpoint, save_checkpoint
from polarprune.training.checkpoint import trained_model as trained_model_of
from polarprune.training.config import ConfigError, load_config
from polarprune.training.data import FMNIST_SEARCH_DIRS
from polarprune.training.distributed import Cluster
from polarprune.training.mask import load_mask


needs_fmnist = pytest.mark.skipif(
    not any((d / "train-images-idx3-ubyte.gz").is_file() for d in FMNIST_SEARCH_DIRS),
    reason="Fashion-MNIST not installed (make data)")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under root, by relative path: 'exactly as it was'."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith((".polarprune-tmp-", ".export-staging-"))
            or p.name.endswith(".tmp")]


# == configs ============================================================================================
# Covered in test_config.py: unknown key, wrong types, epochs 0, target 0 and 1.5, unknown model/dataset/
# device, missing file, a YAML syntax error, --set without '='. test_training_run.py: CLI exit 2.

@pytest.mark.parametrize("text, expected", [
    ("epohcs: 3\n", ["unknown config key 'epohcs'", "did you mean 'epochs'?"]),
    ("batch_size: big\n", ["'batch_size'", "expected int"]),
    ("lr: .nan\n", ["'lr'", "must be a finite number"]),
    ("momentum: .inf\n", ["'momentum'", "must be a finite number"]),
    ("gate_init: -.inf\n", ["'gate_init'", "must be a finite number"]),
    ("target_flops_ratio: .nan\n", ["'target_flops_ratio'", "finite"]),
    ("target_flops_ratio: -0.2\n", ["'target_flops_ratio'", "must be in (0, 1]"]),
    ("epochs: 2\nepochs: 3\n", ["not valid YAML", "key 'epochs' appears twice", "line 2"]),
    ("", ["is empty", "`{}`"]),
    ("# only a comment\n", ["is empty"]),
    ("- epochs\n- 3\n", ["must hold a mapping", "not a list"]),
    ("42\n", ["must hold a mapping", "not a int"]),
    ("1: 2\n", ["config key 1", "keys must be names"]),
    (b"\xff\xfeepochs: 3\n", ["is not UTF-8 text"]),
], ids=['typo', 'wrong type', 'NaN', 'inf', '-inf', 'NaN target', 'negative target', 'duplicate key', 'empty', 'only a comment', 'a list', 'a number', 'non-string key', 'not UTF-8'])
def test_bad_config_file_names_the_file_and_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"config file {path}"), message
    for part in expected:
        assert part in message, message


def test_bad_override_names_the_set_flag_not_the_file(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("epochs: 2\n")
    with pytest.raises(ConfigError, match=r"^--set flops_weight=inf: config key 'flops_weight': must be a finite"):
        load_config(path, ["flops_weight=inf"])
    with pytest.raises(ConfigError, match=r"^--set trget_flops_ratio=0.3: .*did you mean 'target_flops_ratio'"):
        load_config(path, ["trget_flops_ratio=0.3"])


@pytest.mark.parametrize("yaml_text, expected", [
    ("target_flops_ratio: 0.001\nflops_tolerance: 0\n",
     ["resnet20 cannot go below 0.0037", "9 residual blocks closed, every other group at one unit of 16 channels"]),
    ("model: vgg16\nround_to: 64\ntarget_flops_ratio: 0.05\n",
     ["vgg16 cannot go below 0.19", "every other group at one unit of 64 channels"]),
], ids=['below resnet floor', 'below vgg floor'])
def test_target_below_the_networks_floor_is_refused_when_the_run_starts(tmp_path, capsys, yaml_text, expected):
    """The floor depends on the network's trace, so it is checked as the run starts (before any step):
    exit 2, the key named, nothing written."""
    config = tmp_path / "run.yaml"
    config.write_text("dataset: fashion_mnist\nprogress: false\n" + yaml_text)
    load_config(config)  # the file itself is fine
    out_dir = tmp_path / "runs"
    code = training_main(["--config", str(config), "--set", f"out_dir={out_dir}"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, (code, err)
    assert err.startswith("python -m training: error: config key 'target_flops_ratio': ") and "Traceback" not in err, err
    for part in expected:
        assert part in err, err
    assert not out_dir.exists()


@pytest.mark.parametrize("yaml_text, overrides, expected", [
    ("", [], "is empty"),
    ("epochs: [1, 2\n", [], "not valid YAML"),
    ("model: resnet20\n", ["lr=nan"], "'lr': must be a finite number"),
    ("model: resnet20\n", ["epohcs=2"], "did you mean 'epochs'"),
], ids=['empty file', 'YAML syntax', 'NaN via --set', 'typo via --set'])
def test_training_cli_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, yaml_text, overrides, expected):
    def train(cfg, resume=False):  # were the config accepted, fail here instead of training for minutes
        raise AssertionError(f"config accepted: {cfg}")
    monkeypatch.setattr("polarprune.training.__main__.train", train)
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    out_dir = tmp_path / "runs"
    code = training_main(["--config", str(config), "--set", f"out_dir={out_dir}",
                          *[arg for pair in overrides for arg in ("--set", pair)]])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.startswith("python -m training: error: "), (code, err)
    assert expected in err and "Traceback" not in err, err
    assert not out_dir.exists()


# Three ValueErrors that used to escape `python -m training` as tracebacks: now a config key error, exit 2.

def _train_cli(tmp_path, capsys, *overrides: str) -> tuple[int, str]:
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\nprogress: false\n")
    code = training_main(["--config", str(config), "--set", f"out_dir={tmp_path / 'runs'}",
                          *[arg for pair in overrides for arg in ("--set", pair)]])
    return code, capsys.readouterr().err


@needs_fmnist
def test_train_subset_larger_than_the_dataset_is_a_config_error(tmp_path, capsys):
    code, err = _train_cli(tmp_path, capsys, "train_subset=60000", "val_size=1000")
    assert code == EXIT_BAD_INPUT and "Traceback" not in err, (code, err)
    assert err.startswith("python -m training: error: config key 'train_subset': 60000 must be in [1, 59000]"), err
    assert "set train_subset <= 59000" in err


@needs_fmnist
def test_global_batch_that_does_not_split_across_processes_is_a_config_error(tmp_path, capsys, monkeypatch):
    class ThreeRanks(Cluster):  # rank 0 of three, without a process group: it fails before any collective
        def from_main(self, work):
            return work()
    monkeypatch.setattr("polarprune.training.loop.start_cluster", lambda device: (ThreeRanks(0, 3, 0, "gloo"), device))
    code, err = _train_cli(tmp_path, capsys, "batch_size=64", "train_subset=256", "val_size=64")
    assert code == EXIT_BAD_INPUT and "Traceback" not in err, (code, err)
    assert err.startswith("python -m training: error: config key 'batch_size': 64 (the global batch) must be a "
                          "multiple of the 3 processes"), err


def test_dynamic_gates_without_a_validation_set_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("polarprune.training.__main__.train", lambda cfg, resume=False: pytest.fail("config accepted"))
    code, err = _train_cli(tmp_path, capsys, "dynamic_gates=true", "val_size=0")
    assert code == EXIT_BAD_INPUT and "Traceback" not in err, (code, err)
    assert "config key 'val_size': dynamic gates need a validation set" in err and "set val_size > 0" in err, err


# == network.pt and mask.json through `python -m export` =================================================
# Covered in test_onnx_export.py: a truncated zip, a missing network.pt, an unknown architecture, the mask
# of another network or run, an edited mask, an index of 999, a crash while staging artifacts (run folder as
# it was). Here the model repository already holds an earlier export, and must come out byte for byte the same.

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("finished") / "r20", "resnet20", (28, 28), seed=6,
                    closed_blocks=["layer2.0"])


@pytest.fixture
def exported_before(tmp_path, finished_run):
    """A copy of the finished run, and a repository holding version 1 of r20_dense and r20_pruned."""
    run_dir = tmp_path / "runs" / "r20"
    shutil.copytree(finished_run, run_dir)
    repository = tmp_path / "model_repository"
    tiny = tiny_classifier(tmp_path / "earlier.onnx")
    for kind in ("dense", "pruned"):
        write_model_version(repository, f"r20_{kind}", tiny)
    return run_dir, repository


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _edit_state(file, **changes):
    def edit(run_dir):
        state = _state(run_dir / file)
        for key, change in changes.items():
            state[key] = change(state[key])
        torch.save(state, run_dir / file)
    return edit


def _edit_weights(run_dir, key, tensor=None):
    state = _state(run_dir / "network.pt")
    if tensor is None:
        del state["weights"][key]
    else:
        state["weights"][key] = tensor
    torch.save(state, run_dir / "network.pt")


def _edit_mask(change):
    def edit(run_dir):
        document = json.loads((run_dir / "mask.json").read_text())
        change(document)
        (run_dir / "mask.json").write_text(json.dumps(document))
    return edit


def _drop_network_key(key):
    """The network description of network.pt and mask.json alike (they must agree) lacks `key`."""
    def edit(run_dir):
        _edit_state("network.pt", network=lambda n: {k: v for k, v in n.items() if k != key})(run_dir)
        _edit_mask(lambda m: m["network"].pop(key))(run_dir)
    return edit


def _write(name, data):
    return lambda d: (d / name).write_bytes(data(d))


NETWORK_CASES = {
    "random bytes": (_write("network.pt", lambda d: np.random.default_rng(0).bytes(4096)),
                     "unreadable or corrupt network file"),
    "cut in half": (_write("network.pt", lambda d: (d / "network.pt").read_bytes()[
        :len((d / "network.pt").read_bytes()) // 2]), "unreadable or corrupt network file"),
    "empty file": (_write("network.pt", lambda d: b""), "unreadable or corrupt network file"),
    "a bare state_dict": (lambda d: torch.save(_state(d / "network.pt")["weights"], d / "network.pt"),
                          "not a polarprune network file"),
    "weights not a state dict": (_edit_state("network.pt", weights=lambda _: "weights"),
                                 "'weights' must be a state dict"),
    "NaN weights": (lambda d: _edit_weights(d, "fc.weight", torch.full((10, 64), float("nan"))),
                    "weight fc.weight holds NaN or Inf"),
    "network not a dict": (_edit_state("network.pt", network=lambda _: "resnet20"), "'network' must be a dict"),
    "network without a key": (_drop_network_key("in_channels"),
                              "network description is incomplete or malformed (KeyError('in_channels')"),
    "normalization of other channels": (_edit_state("network.pt", normalization=lambda n: {"mean": [0.1] * 3,
                                                                                          "std": [0.2] * 3}),
                                        "normalization must give a mean and a positive std for each of the 1"),
    "weights of another size": (lambda d: _edit_weights(d, "layer3.2.conv1.weight", torch.zeros(3, 3, 3, 3)),
                                "size mismatch for layer3.2.conv1.weight"),
    "a weight missing": (lambda d: _edit_weights(d, "fc.weight"), 'Missing key(s) in state_dict: "fc.weight"'),
    # Had it run, the payload would have added a file to the run folder, and the tree check would see it.
    "code in the pickle": (lambda d: torch.save({**_state(d / "network.pt"), "data": WritesAFile(d / "ran")},
                                                d / "network.pt"),
                           "refused: it holds pickled Python objects (io.open)"),
}
MASK_CASES = {
    "a float channel index": (_edit_mask(lambda m: m["kept_channels"].update({"layer1.0.conv1": [0.5, 1]})),
                              "kept_channels['layer1.0.conv1'] must be a list of channel indices"),
    "closed_blocks a string": (_edit_mask(lambda m: m.update(closed_blocks="layer2.0")),
                               "closed_blocks must be a list of block names"),
    "no pruned_flops": (_edit_mask(lambda m: m.pop("pruned_flops")), "mask is missing 'pruned_flops'"),
    "kept_channels a list": (_edit_mask(lambda m: m.update(kept_channels=[])), "kept_channels must map"),
}


@pytest.mark.parametrize("case", [*NETWORK_CASES, *MASK_CASES])
def test_export_refuses_bad_run_files_and_leaves_everything_as_it_was(exported_before, case):
    run_dir, repository = exported_before
    damage, expected = {**NETWORK_CASES, **MASK_CASES}[case]
    damage(run_dir)
    file = run_dir / ("network.pt" if case in NETWORK_CASES else "mask.json")
    run_before, repository_before = tree(run_dir), tree(repository)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export_main(["--run", str(run_dir), "--repository", str(repository)])
    message = err.getvalue()
    assert code == EXIT_BAD_INPUT and message.startswith(f"python -m export: error: {file}: "), (code, message)
    assert expected in message and "Traceback" not in message, message
    assert tree(run_dir) == run_before and tree(repository) == repository_before
    assert not temporaries(run_dir.parent.parent)


# == checkpoint.pt, as --resume and distill_from read it ================================================

@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory):
    """checkpoint.pt of a finished run: the gated network of the synthetic run, with its trained_model record."""
    model, _, document, graph = trained_model("resnet20", (28, 28), seed=6, closed_blocks=["layer2.0"])
    path = tmp_path_factory.mktemp("checkpoint") / "checkpoint.pt"
    save_checkpoint(path, {"config": {"dataset": "fashion_mnist", "model": "resnet20", "method": "polarized"},
                           "network": document["network"], "model": model.state_dict(),
                           "trained_model": describe_model(model, graph), "epoch": 4})
    return path


CHECKPOINT_CASES = {
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "unreadable or corrupt checkpoint"),
    "empty file": (lambda p: p.write_bytes(b""), "unreadable or corrupt checkpoint"),
    "a bare state_dict": (lambda p: torch.save(_state(p)["model"], p), "not a polarprune checkpoint"),
    "weights not a state dict": (lambda p: _edit_state(p.name, model=lambda _: "weights")(p.parent),
                                 "'model' must be a state dict"),
    "config not a dict": (lambda p: _edit_state(p.name, config=lambda _: ["fashion_mnist"])(p.parent),
                          "config must be a dict, not list"),
    "unknown trained model": (lambda p: _edit_state(p.name, trained_model=lambda _: {"kind": "sliced"})(p.parent),
                              "trained_model must be a record of kind gated, plain or cut"),
    "a network cut mid-run": (lambda p: _edit_state(p.name, trained_model=lambda _: {"kind": "cut"})(p.parent),
                              "cut to its mask by a run that stopped before its end; resume the run"),
    "gate record incomplete": (lambda p: _edit_state(p.name, trained_model=lambda _: {"kind": "gated",
                                                                                      "dynamic": False})(p.parent),
                               "trained_model of kind gated lacks round_to, score_clamp"),
    "negative epoch": (lambda p: _edit_state(p.name, epoch=lambda _: -1)(p.parent), "epoch must be a count >= 0"),
    "network not a dict": (lambda p: _edit_state(p.name, network=lambda _: "resnet20")(p.parent),
                           "'network' must be a dict describing"),
    "code in the pickle": (lambda p: torch.save({**_state(p), "config": WritesAFile(p.parent / "ran")}, p),
                           "refused: it holds pickled Python objects (io.open)"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_bad_checkpoint_is_refused_naming_it(tmp_path, finished_checkpoint, case):
    path = tmp_path / "checkpoint.pt"
    shutil.copy(finished_checkpoint, path)
    damage, expected = CHECKPOINT_CASES[case]
    damage(path)
    with pytest.raises(CheckpointError) as caught:
        trained_model_of(load_checkpoint(path), path)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value), caught.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # nothing ran


# == mask.json, read directly =========================================================================
# Covered in test_mask.py: invalid JSON, a missing file, a duplicate index. test_surgery.py: masks that do not fit the network they are applied to.

def _mask_case(change):
    def edit(document):
        change(document)
        return document
    return edit


def _kept(layer, value):
    return _mask_case(lambda m: m["kept_channels"].update({layer: value}))


MASK_JSON_CASES = {
    "indices not a list": (_kept("layer1.0.conv1", 5), "kept_channels['layer1.0.conv1'] must be a list"),
    "string indices": (_kept("layer1.0.conv1", ["0", "1"]), "integers >= 0"),
    "negative index": (_kept("layer1.0.conv1", [-1, 2]), "integers >= 0"),
    "boolean index": (_kept("layer1.0.conv1", [True, 2]), "integers >= 0"),
    "index out of range": (_kept("layer1.0.conv1", [0, 16]), "group layer1.0.conv1 keeps 2 channel indices that are "
                                                             "not distinct, non-empty and within [0, 16)"),
    "open block keeps nothing": (_kept("layer1.0.conv1", []), "non-empty"),
    "unknown group": (_kept("layer9.9.conv1", [0]), "names groups or blocks the network does not have: "
                                                    "['layer9.9.conv1']"),
    "unknown block": (_mask_case(lambda m: m["closed_blocks"].append("layer9.9")),
                      "names groups or blocks the network does not have: ['layer9.9']"),
    "group left out": (_mask_case(lambda m: m["kept_channels"].pop("layer1.1.conv1")),
                       "no kept channels for group layer1.1.conv1"),
    "block closed twice": (_mask_case(lambda m: m.update(closed_blocks=["layer2.0", "layer2.0"])),
                           "names a block twice"),
    "closed block keeps channels": (_mask_case(lambda m: m.update(closed_blocks=["layer2.0", "layer1.0"])),
                                    "group layer1.0.conv1 belongs to a closed block but also keeps channels"),
    "flops not a number": (_mask_case(lambda m: m.update(pruned_flops="many")), "pruned_flops must be a MAC count"),
    "no closed_blocks": (_mask_case(lambda m: m.pop("closed_blocks")), "mask is missing 'closed_blocks'"),
    "no network": (_mask_case(lambda m: m.pop("network")), "mask is missing 'network'"),
    "future version": (_mask_case(lambda m: m.update(version=3)), "mask version 3 not supported (expected 2)"),
    "version 1 (before traced groups)": (_mask_case(lambda m: m.update(version=1)),
                                         "a mask.json of version 1 (polarprune before traced channel groups); "
                                         "retrain"),
    "group width not a count": (_mask_case(lambda m: m["group_widths"].update({"layer1.0.conv1": "16"})),
                                "group_widths must map group names to channel counts"),
    "block of an unknown group": (_mask_case(lambda m: m["block_groups"]["layer1.0"].append("layer9.9.conv1")),
                                  "block_groups must map block names to lists of known groups"),
    "a list, not an object": (lambda m: [m], "not a polarprune mask"),
}


@pytest.mark.parametrize("case", MASK_JSON_CASES)
def test_malformed_mask_json_is_refused_naming_the_file(tmp_path, finished_run, case):
    edit, expected = MASK_JSON_CASES[case]
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(edit(json.loads((finished_run / "mask.json").read_text()))))
    with pytest.raises(SpecError) as caught:
        load_mask(path)
    assert str(caught.value).startswith(f"{path}: ") and expected in str(caught.value), str(caught.value)


def test_mask_json_that_is_not_text_is_refused(tmp_path):
    path = tmp_path / "mask.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(SpecError, match=r"mask\.json: not valid JSON"):
        load_mask(path)


# == model repository: writing it ========================================================================
# Covered in test_triton_repo.py: foreign files, a static batch dim, a bad model name or target, a rendered
# config that does not parse (nothing written).

@pytest.fixture
def tiny_onnx(tmp_path):
    return tiny_classifier(tmp_path / "tiny.onnx")


@pytest.mark.parametrize("text, expected", [
    ("this is { not a model config", "does not parse as Triton ModelConfig"),
    ('name: "tiny"\nmax_batch_size: "many"\n', "does not parse"),
    ('name: "other"\nbackend: "python"\ninput [ { name: "input" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
     'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]\n', "config name 'other' != model folder 'tiny'"),
    ('name: "tiny"\nbackend: "python"\n', "needs a backend/platform, an input and an output"),
], ids=['garbage', 'wrong field type', 'name of another folder', 'no input or output'])
def test_garbage_config_pbtxt_is_refused(text, expected):
    with pytest.raises(RepositoryError) as caught:
        parse_config(text, "tiny")
    assert expected in str(caught.value)


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf \xff" * 10)
    with pytest.raises(RepositoryError, match=r"model\.onnx is not an ONNX model"):
        read_onnx_signature(garbage)
    with pytest.raises(RepositoryError, match="cannot read ONNX model .*absent.onnx"):
        read_onnx_signature(tmp_path / "absent.onnx")


def test_unreadable_manifest_is_refused_before_any_write(tmp_path, tiny_onnx):
    repo = tmp_path / "repo"
    write_model_version(repo, "tiny", tiny_onnx)
    (repo / "tiny" / ".polarprune.json").write_text("{half a manifest")
    before = tree(repo)
    with pytest.raises(RepositoryError, match=r"\.polarprune\.json is unreadable"):
        write_model_version(repo, "tiny", tiny_onnx)
    assert tree(repo) == before


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("step", ["_copy_synced", "rename"])
def test_failed_write_puts_the_model_folder_back(tmp_path, tiny_onnx, monkeypatch, failure, step):
    repo = tmp_path / "repo"
    write_model_version(repo, "old", tiny_onnx)
    before = tree(repo)

    def fail(*args, **kwargs):
        raise failure
    if step == "rename":  # after config.pbtxt and the manifest were rewritten
        monkeypatch.setattr(triton_repo.os, "rename", fail)
    else:
        monkeypatch.setattr(triton_repo, step, fail)
    for model in ("old", "new"):
        with pytest.raises(type(failure)):
            write_model_version(repo, model, tiny_onnx, TritonModelOptions(max_batch_size=8))
    assert tree(repo) == before and not temporaries(repo)


def test_several_models_are_written_all_or_none(tmp_path, tiny_onnx):
    repo = tmp_path / "repo"
    write_model_version(repo, "a", tiny_onnx)
    before = tree(repo)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    with pytest.raises(RepositoryError, match="garbage.onnx is not an ONNX model"):
        write_model_versions(repo, [("a", tiny_onnx, TritonModelOptions()), ("b", tiny_onnx, TritonModelOptions()),
                                    ("c", garbage, TritonModelOptions())])
    assert tree(repo) == before and not temporaries(repo)
    assert [p.name for p in write_model_versions(repo, [("a", tiny_onnx, TritonModelOptions())])] == ["2"]


def test_export_adds_both_models_or_neither(tmp_path, tiny_onnx):
    """The repository step of `python -m export`: the pruned model failing takes the dense one back."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    shutil.copy(tiny_onnx, run_dir / "dense.onnx")
    (run_dir / "pruned.onnx").write_bytes(b"half an onnx file")
    repository = tmp_path / "model_repository"
    write_model_version(repository, "r_dense", tiny_onnx)
    before = tree(repository)
    options = ExportOptions(run=run_dir, max_batch_size=16, repository=repository)
    with pytest.raises(RepositoryError, match=r"pruned\.onnx is not an ONNX model"):
        write_triton_models(options, run_dir, {"built": False})
    assert tree(repository) == before and not temporaries(repository)


def test_leftovers_of_a_killed_export_are_swept(tmp_path, tiny_onnx):
    repo = tmp_path / "repo"
    write_model_version(repo, "tiny", tiny_onnx)
    dead = repo / "tiny" / ".polarprune-tmp-2-4194311-deadbeef"  # above any pid_max: that process is gone
    alive = repo / "tiny" / f".polarprune-tmp-2-{os.getpid()}-busy"  # a running export's staging folder
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    stale = repo / "tiny" / ".config.pbtxt.abc123.tmp"
    stale.write_text("half a config")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = repo / "tiny" / ".config.pbtxt.def456.tmp"
    fresh.write_text("being written right now")
    assert write_model_version(repo, "tiny", tiny_onnx).name == "2"
    assert not dead.exists() and not stale.exists()
    assert alive.exists() and fresh.exists()


# == run artifacts serving reads =======================================================================
# Covered in test_serving.py: both files missing ("run make export first").

@pytest.fixture
def artifacts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    report = {"model_names": {"dense": "d", "pruned": "p"}, "flops_ratio": 0.5, "input_shape": [1, 8, 8],
              "num_classes": 10}
    (run / "export_report.json").write_text(json.dumps(report))
    images, labels = np.zeros((4, 1, 8, 8), np.float32), np.arange(4)
    np.savez(run / "test_samples.npz", images=images, labels=labels)
    return run, report, images, labels


def _write_npz(**arrays):
    def write(run):
        with open(run / "test_samples.npz", "wb") as handle:
            np.savez(handle, **arrays)
    return write


GOOD_IMAGES = np.zeros((4, 1, 8, 8), np.float32)


@pytest.mark.parametrize("damage, file, expected", [
    (lambda run: (run / "export_report.json").write_text("{truncated"), "export_report.json", "is not valid JSON"),
    (lambda run: (run / "export_report.json").write_text("[]"), "export_report.json", "must hold a JSON object"),
    (lambda run: (run / "export_report.json").write_text('{"model_names": {"dense": "d"}}'), "export_report.json",
     "lacks a field serving needs"),
    (lambda run: (run / "export_report.json").write_text(json.dumps({
        "model_names": {"dense": "d", "pruned": "p"}, "flops_ratio": 3, "input_shape": [1, 8, 8],
        "num_classes": 10})), "export_report.json", "flops_ratio must be in (0, 1]"),
    (lambda run: (run / "test_samples.npz").write_bytes(b"garbage"), "test_samples.npz", "not a readable .npz"),
    (lambda run: (run / "test_samples.npz").write_bytes((run / "test_samples.npz").read_bytes()[:200]),
     "test_samples.npz", "not a readable .npz"),
    (_write_npz(images=GOOD_IMAGES), "test_samples.npz", "must hold 'images' and 'labels', has ['images']"),
    (_write_npz(images=np.array([None] * 4, object), labels=np.arange(4)), "test_samples.npz",
     "not a readable .npz"),  # never unpickled
    (_write_npz(images=GOOD_IMAGES[:0], labels=np.arange(0)), "test_samples.npz", "holds no images"),
    (_write_npz(images=GOOD_IMAGES.astype(np.float64), labels=np.arange(4)), "test_samples.npz",
     "images must be float32 (N, 1, 8, 8)"),
    (_write_npz(images=GOOD_IMAGES * np.nan, labels=np.arange(4)), "test_samples.npz", "NaN or Inf"),
    (_write_npz(images=GOOD_IMAGES, labels=np.arange(4) + 7), "test_samples.npz", "labels must be in [0, 10)"),
    (_write_npz(images=GOOD_IMAGES, labels=np.zeros(4, np.float32)), "test_samples.npz",
     "labels must be integers"),
], ids=['report not JSON', 'report a list', 'report lacks model_names.pruned', 'report flops_ratio 3', 'samples garbage', 'samples truncated', 'samples without labels', 'samples pickled objects', 'no images', 'float64 images', 'NaN images', 'labels out of range', 'float labels'])
def test_malformed_run_artifacts_name_the_file(artifacts, damage, file, expected):
    run = artifacts[0]
    load_run(run)  # the fixture itself is fine
    damage(run)
    with pytest.raises(RunArtifactsError) as caught:
        load_run(run)
    assert str(run / file) in str(caught.value) and expected in str(caught.value), str(caught.value)


def test_serving_cli_exits_2_on_malformed_run_artifacts(artifacts, capsys):
    run = artifacts[0]
    (run / "export_report.json").write_text("{truncated")
    code = serving_main(["--run", str(run), "--quick", "--no-perf-analyzer"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.startswith(f"python -m serving: error: {run / 'export_report.json'}"), err
    assert "Traceback" not in err


def test_serving_cli_exits_2_when_the_repository_lacks_the_models(artifacts, tmp_path, capsys):
    run = artifacts[0]
    (tmp_path / "empty_repository").mkdir()
    code = serving_main(["--run", str(run), "--repository", str(tmp_path / "empty_repository"), "--quick",
                         "--no-perf-analyzer"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.startswith("python -m serving: error: model(s) ['d', 'p'] not found"), err
    assert "run make export first" in err and "Traceback" not in err


def test_half_an_export_is_missing_not_malformed(artifacts):
    run = artifacts[0]
    (run / "test_samples.npz").unlink()
    with pytest.raises(RunArtifactsMissing, match=r"missing \S*test_samples\.npz: run make export first"):
        load_run(run)


# == the bundled Triton server ==========================================================================
# Covered in test_serving.py: client-side wrong shape / FP64 / NaN, the same sent anyway through
# TritonClassifier.infer_once, one raw gRPC FP64 request; a port already in use.

def test_server_names_every_model_that_fails_to_load(tmp_path, tiny_onnx):
    require_triton()
    repo = tmp_path / "repo"
    broken = ["no_version", "no_model_file", "dims_disagree"]
    for name in [*broken, "fine"]:
        write_model_version(repo, name, tiny_onnx, TritonModelOptions(warmup=False))
    shutil.rmtree(repo / "no_version" / "1")
    (repo / "no_model_file" / "1" / "model.onnx").unlink()
    config = repo / "dims_disagree" / "config.pbtxt"
    disagreeing = parse_config(config.read_text())
    disagreeing.input[0].dims[-1] = 9  # [1, 8, 8] -> [1, 8, 9]
    config.write_text(text_format.MessageToString(disagreeing))
    triton = LocalTriton(LocalTritonConfig(repo, (*broken, "fine"), startup_timeout_s=60))
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        triton.start()
    assert time.monotonic() - started < 30  # failed loads are reported as soon as loading ends, no hang
    message = str(caught.value)
    assert "failed to load" in message
    reported = {line.split(":")[0].strip() for line in message.splitlines() if line.startswith("  ")}
    assert set(broken) <= reported and "fine" not in reported, message
    # Triton's reason where its index has none (asked for with one load attempt) ...
    assert "at least one version must be available" in message
    # ... and ours from model.py, naming the file and the mismatch.
    assert "no_model_file/1/model.onnx is missing" in message
    assert "declares input 'input' with dims [1, 8, 9]" in message and "dims [1, 8, 8]" in message
    assert triton.process is None  # stopped, not left running


def test_config_that_triton_cannot_parse_is_named_before_starting(tmp_path, tiny_onnx):
    repo = tmp_path / "repo"
    write_model_version(repo, "garbage_config", tiny_onnx, TritonModelOptions(warmup=False))
    (repo / "garbage_config" / "config.pbtxt").write_text("this is { not a model config")
    triton = LocalTriton(LocalTritonConfig(repo, ("garbage_config",)))
    with pytest.raises(ServerError, match=r"garbage_config/config.pbtxt: not a valid model config \(1:1"):
        triton.start()
    assert triton.process is None


def test_repository_without_the_model_fails_before_starting(tmp_path):
    (tmp_path / "repo" / "empty_model").mkdir(parents=True)
    with pytest.raises(ServerError, match=r"\['empty_model'\] not found"):
        LocalTriton(LocalTritonConfig(tmp_path / "repo", ("empty_model",))).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for every request case: the tiny classifier as 'tiny' (max_batch_size 64)."""
    require_triton()
    root = tmp_path_factory.mktemp("malformed_server")
    onnx_path = tiny_classifier(root / "tiny.onnx")
    write_model_version(root / "repo", "tiny", onnx_path)
    triton = LocalTriton(LocalTritonConfig(root / "repo", ("tiny",), startup_timeout_s=60))
    triton.start()
    yield triton, ort.InferenceSession(str(onnx_path))
    triton.stop()


IMAGES = np.random.default_rng(3).standard_normal((150, 1, 8, 8)).astype(np.float32)


def _assert_healthy(triton, session):
    """Alive, ready, and still right: a good request after the bad ones gets onnxruntime's answer."""
    assert triton.process is not None and triton.process.poll() is None
    client = httpclient.InferenceServerClient(triton.endpoints.http_url, network_timeout=10)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        tensor = httpclient.InferInput("input", [3, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(IMAGES[:3], binary_data=True)
        logits = client.infer("tiny", [tensor]).as_numpy("logits")
    finally:
        client.close()
    expected = session.run(None, {"input": IMAGES[:3]})[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def _nan_at(index: int, count: int = 3, value=np.nan) -> np.ndarray:
    batch = IMAGES[:count].copy()
    batch[index, 0, 4, 4] = value
    return batch


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("images, expected", [
    (_nan_at(1), "contains NaN or Inf (image(s) 1 of 3)"),
    (_nan_at(2, value=np.inf), "contains NaN or Inf (image(s) 2 of 3)"),
    (_nan_at(0, value=-np.inf)[0], "contains NaN or Inf (image(s) 0 of 1)"),  # one (C, H, W) image
    (IMAGES[:0], "input shape must be [N, 1, 8, 8] with N >= 1, got [0, 1, 8, 8]"),
    (IMAGES[:2].reshape(2, 64), "input shape must be [N, 1, 8, 8]"),
    (IMAGES[:2].astype(np.int32), "input must be FP32 (float32), got int32"),
    (IMAGES[:2].tolist(), "expected a numpy array [N, 1, 8, 8] of float32, got list"),
], ids=['NaN', 'inf', '-inf in one image', 'empty batch', 'flattened', 'int32', 'a list'])
def test_client_refuses_before_sending(server, protocol, images, expected):
    triton, _ = server
    with TritonClassifier(triton.endpoints.url(protocol), "tiny", protocol, timeout_s=10) as client:
        sent = []
        client.infer_once = lambda batch: sent.append(batch)
        with pytest.raises(InputSpecError) as caught:
            client.logits(images)
    assert str(caught.value).startswith("tiny: ") and expected in str(caught.value), str(caught.value)
    assert sent == []


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_oversize_batch_is_split_by_logits_but_refused_in_one_request(server, protocol):
    triton, session = server
    with TritonClassifier(triton.endpoints.url(protocol), "tiny", protocol, timeout_s=10) as client:
        sizes, send = [], client.infer_once
        client.infer_once = lambda batch: sizes.append(len(batch)) or send(batch)
        logits = client.logits(IMAGES)  # 150 images, max_batch_size 64
        assert sizes == [64, 64, 22]
        np.testing.assert_allclose(logits, session.run(None, {"input": IMAGES})[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(ServingError, match="batch-size must be <= 64"):
            send(IMAGES[:65])
    _assert_healthy(triton, session)


def _raw_request(protocol, url, inputs, outputs=None):
    """Send one request with tritonclient alone (no TritonClassifier checks); the exception it gets."""
    module = httpclient if protocol == "http" else grpcclient
    tensors = []
    for name, datatype, array in inputs:
        tensor = module.InferInput(name, list(array.shape), datatype)
        if protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=True)
        else:
            tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    requested = [module.InferRequestedOutput(name) for name in outputs] if outputs else None
    if protocol == "http":
        client = httpclient.InferenceServerClient(url, network_timeout=10)
        call = lambda: client.infer("tiny", tensors, outputs=requested)  # noqa: E731
    else:
        client = grpcclient.InferenceServerClient(url)
        call = lambda: client.infer("tiny", tensors, outputs=requested, client_timeout=10)  # noqa: E731
    try:
        with pytest.raises(InferenceServerException) as caught:
            call()
    finally:
        client.close()
    return caught.value


F32 = IMAGES[:2]
RAW_CASES = {
    # Refused by Triton itself, from the config, before the model sees it.
    "wrong shape": ([("input", "FP32", np.zeros((2, 1, 8, 9), np.float32))],
                    "unexpected shape for input 'input' for model 'tiny'. Expected [-1,1,8,8], got [2,1,8,9]"),
    "no batch dim": ([("input", "FP32", F32[0])], "Expected [-1,1,8,8], got [1,8,8]"),
    "FP16": ([("input", "FP16", F32.astype(np.float16))], "data-type is 'FP16', but model 'tiny' expects 'FP32'"),
    "INT32": ([("input", "INT32", F32.astype(np.int32))], "data-type is 'INT32', but model 'tiny' expects 'FP32'"),
    "BYTES": ([("input", "BYTES", np.array([[[[b"x"] * 8] * 8]] * 2, dtype=np.object_))],
              "data-type is 'BYTES'"),
    "wrong input name": ([("image", "FP32", F32)], "unexpected inference input 'image' for model 'tiny'"),
    "no input": ([], "expected 1 inputs but got 0 inputs for model 'tiny'"),
    "two inputs": ([("input", "FP32", F32), ("extra", "FP32", F32)], "expected 1 inputs but got 2 inputs"),
    "empty batch": ([("input", "FP32", IMAGES[:0])], "input byte size mismatch for input 'input'"),
    "oversize batch": ([("input", "FP32", IMAGES[:65])], "batch-size must be <= 64 for 'tiny'"),
    # Refused by model.py: a classifier's argmax over NaN would be a silent wrong answer.
    "NaN": ([("input", "FP32", _nan_at(1, 2))], "input 'input' contains NaN or Inf (image(s) 1 of 2)"),
    "Inf": ([("input", "FP32", _nan_at(0, 2, np.inf))], "input 'input' contains NaN or Inf (image(s) 0 of 2)"),
}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", RAW_CASES)
def test_raw_malformed_request_gets_a_client_error_and_the_server_stays_healthy(server, protocol, case):
    triton, session = server
    inputs, expected = RAW_CASES[case]
    error = _raw_request(protocol, triton.endpoints.url(protocol), inputs)
    assert expected in error.message(), error.message()
    assert str(error.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), (error.status(), error.message())
    _assert_healthy(triton, session)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_request_for_an_output_the_model_lacks_is_refused(server, protocol):
    triton, session = server
    error = _raw_request(protocol, triton.endpoints.url(protocol), [("input", "FP32", F32)], outputs=["probs"])
    assert "probs" in error.message(), error.message()
    _assert_healthy(triton, session)


@pytest.mark.parametrize("body, expected", [
    (b"{not json", "failed to parse the request JSON"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                             "data": [0.0] * 3}]}).encode(), "Shape does not match"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP99",
                             "data": [0.0] * 64}]}).encode(), "invalid datatype"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                             "data": ["x"] * 64}]}).encode(), "non-number"),
    (json.dumps({"inputs": "all of them"}).encode(), "Unable to parse 'inputs'"),
], ids=['not JSON', 'too little data', 'unknown datatype', 'strings as data', 'inputs not a list'])
def test_raw_http_bodies_that_are_not_requests(server, body, expected):
    triton, session = server
    request = urllib.request.Request(f"http://{triton.endpoints.http_url}/v2/models/tiny/infer", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code in (400, 500)
    assert expected in json.loads(caught.value.read())["error"]
    _assert_healthy(triton, session)


# == every command line ====================================================================================

CLIS = {"python -m training": (training_main, []), "python -m export": (export_main, []),
        "python -m serving": (serving_main, []), "python -m serving reload": (serving_main, ["reload"]),
        "python -m serving soak": (serving_main, ["soak"]), "python -m serving faults": (serving_main, ["faults"]),
        "python -m bench.compare": (compare_main, []), "python -m bench.shapes": (shapes_main, []),
        "python -m bench.speedup": (speedup_main, []), "python -m bench.train_overhead": (train_overhead_main, [])}


@pytest.mark.parametrize("prog", CLIS)
def test_every_cli_help_lists_the_exit_codes(prog, capsys):
    main, prefix = CLIS[prog]
    with pytest.raises(SystemExit) as exited:
        main([*prefix, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == EXIT_OK and out.startswith(f"usage: {prog} ") and EXIT_CODES in out, out


@pytest.mark.parametrize("prog", ["python -m export", "python -m serving", "python -m bench.speedup"])
def test_usage_errors_exit_2(prog, capsys):
    main, prefix = CLIS[prog]
    with pytest.raises(SystemExit) as exited:
        main([*prefix, "--run", "runs/x", "--no-such-flag"])
    assert exited.value.code == EXIT_BAD_INPUT
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
