"""ONNX export and the export CLI: artifacts, onnxruntime agreement, MACs from the graph, clean failures."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from polarprune.common.cli import EXIT_BAD_INPUT, EXIT_FAILED
from polarprune.export.__main__ import main
from polarprune.export.onnx_export import (INPUT_NAME, OUTPUT_NAME, OnnxExportError, count_onnx_macs, export_onnx,
                                validate_with_onnxruntime)
from polarprune.export.surgery import load_pruned, prune
from export_fixtures import make_run, single_torch_thread, trained_model  # noqa: F401 (autouse fixture)
from polarprune.training.checkpoint import save_checkpoint
from polarprune.training.config import make_config
from polarprune.training.data import FMNIST_SEARCH_DIRS
from polarprune.training.errors import ConfigError
from run_helpers import ENV, ROOT, TRAINING_ONLY

CLOSED = ["layer1.1", "layer1.2", "layer2.0", "layer2.1"]  # several in a row, one of them downsampling

needs_fmnist = pytest.mark.skipif(
    not any((d / "t10k-images-idx3-ubyte.gz").is_file() or (d / "t10k-images-idx3-ubyte").is_file()
            for d in FMNIST_SEARCH_DIRS),
    reason="Fashion-MNIST test split not installed (make data)")


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One real export of a synthetic resnet20 run on Fashion-MNIST test images."""
    if needs_fmnist.args[0]:
        pytest.skip(needs_fmnist.kwargs["reason"])
    root = tmp_path_factory.mktemp("export")
    run_dir = make_run(root / "runs" / "fm_r20", "resnet20", (28, 28), seed=5, closed_blocks=CLOSED,
                       one_channel=["layer3.0"])
    repository = root / "model_repository"
    code, out, err = run_cli("--run", str(run_dir), "--repository", str(repository), "--samples", "256",
                             "--engine")
    assert code == 0, err
    report = json.loads((run_dir / "export_report.json").read_text())
    mask = json.loads((run_dir / "mask.json").read_text())
    return run_dir, repository, report, mask, out


def test_artifacts_and_report(exported):
    run_dir, repository, report, mask, _ = exported
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(["network.pt", "mask.json", "metrics.json", "dense.onnx", "pruned.onnx",
                            "pruned_model.pt2", "test_samples.npz", "export_report.json"])
    assert report["model_names"] == {"dense": "fm_r20_dense", "pruned": "fm_r20_pruned"}
    assert (report["dataset"], report["input_shape"], report["num_classes"]) == ("fashion_mnist", [1, 28, 28], 10)
    assert report["dense"]["flops"] == report["dense"]["onnx_macs"] == mask["dense_flops"]
    assert report["pruned"]["flops"] == report["pruned"]["onnx_macs"] == mask["pruned_flops"]
    assert report["flops_ratio"] == pytest.approx(mask["flops_ratio"])
    assert report["pruned"]["params"] < report["dense"]["params"]
    assert report["pruned"]["onnx_bytes"] == (run_dir / "pruned.onnx").stat().st_size
    assert report["removed_blocks"] == CLOSED
    assert report["kept_channels"]["layer3.0.conv1"] == {"width": 64, "kept": 1}
    assert report["kept_channels"]["layer2.0.conv1"]["kept"] == 0
    assert report["max_abs_diff_surgery"] <= 1e-4
    assert set(report["max_abs_diff_onnx"]) == {"dense", "pruned"}
    for kind, diff in report["max_abs_diff_onnx"].items():
        assert diff <= 1e-4 * max(1.0, report["max_abs_logit"][kind])
    assert report["max_abs_diff_onnx"]["pruned"] <= 1e-4  # its logits are moderate
    assert "gate" in report["dense_source"] and "accuracy" in report["dense_source"]
    normalization = report["input_normalization"]  # what a client does to an image: (x / 255 - mean) / std
    assert len(normalization["mean"]) == len(normalization["std"]) == 1
    config = (repository / "fm_r20_pruned" / "config.pbtxt").read_text()
    assert 'key: "input_mean"' in config and 'key: "input_std"' in config


def test_engine_is_reported_not_faked(exported):
    run_dir, _, report, _, out = exported
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here: engines are covered by test_tensorrt.py")
    except ImportError:
        pass
    assert report["engine"]["built"] is False and "tensorrt" in report["engine"]["reason"]
    assert len([line for line in out.splitlines() if "TensorRT" in line]) == 1
    assert not list(run_dir.glob("*.plan"))


def test_onnx_files_are_valid_and_dynamic(exported):
    run_dir, _, _, mask, _ = exported
    samples = np.load(run_dir / "test_samples.npz")
    images, labels = samples["images"], samples["labels"]
    assert images.dtype == np.float32 and images.shape == (256, 1, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (256,) and set(labels.tolist()) <= set(range(10))
    pruned = load_pruned(run_dir / "pruned_model.pt2")  # the architecture comes with the file
    kept = {group: len(channels) for group, channels in mask["kept_channels"].items()}
    widths = {path.rsplit(".", 1)[0]: tensor.shape[0] for path, tensor in pruned.state_dict().items()
              if path.endswith("conv1.weight")}
    assert all(widths[group] == count for group, count in kept.items())  # group "layer3.1.conv1" keeps conv1's outputs
    assert not any(path.startswith(tuple(mask["closed_blocks"])) for path in pruned.state_dict())
    for kind in ("dense", "pruned"):
        model = onnx.load(run_dir / f"{kind}.onnx")
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 17
        (graph_input,), (graph_output,) = model.graph.input, model.graph.output
        assert (graph_input.name, graph_output.name) == (INPUT_NAME, OUTPUT_NAME)
        assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        session = ort.InferenceSession(str(run_dir / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
        one = session.run(None, {INPUT_NAME: images[:1]})[0]
        five = session.run(None, {INPUT_NAME: images[:5]})[0]
        assert one.shape == (1, 10) and five.shape == (5, 10)
        np.testing.assert_allclose(one, five[:1], atol=1e-5)
    with torch.no_grad():
        torch_logits = pruned(torch.from_numpy(images[:64])).numpy()
    session = ort.InferenceSession(str(run_dir / "pruned.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {INPUT_NAME: images[:64]})[0] - torch_logits).max() <= 1e-4
    assert count_onnx_macs(run_dir / "pruned.onnx") == mask["pruned_flops"]


def test_triton_repository_and_serving_view(exported):
    run_dir, repository, report, _, _ = exported
    for name in report["model_names"].values():
        assert (repository / name / "config.pbtxt").is_file()
        assert (repository / name / "1" / "model.onnx").is_file()
    from polarprune.serving.run_artifacts import load_run
    artifacts = load_run(run_dir)
    assert artifacts.model_names == report["model_names"] and artifacts.input_shape == (1, 28, 28)


@pytest.mark.parametrize("model_name, options", [
    ("vgg16", dict(round_to=8, one_channel=["features.5"])),
    ("resnet18", dict(round_to=16, closed_blocks=["layer3.0"], one_channel=["layer2.1"])),
])
def test_pruned_onnx_of_other_architectures(tmp_path, model_name, options):
    model, mask, document, graph = trained_model(model_name, (16, 16), seed=4, **options)
    pruned = prune(model.plain(), graph, mask).pruned
    proto = export_onnx(pruned, tmp_path / "pruned.onnx", (1, 16, 16))
    assert count_onnx_macs(proto) == document["pruned_flops"]
    images = torch.randn(8, 1, 16, 16)
    diff, _ = validate_with_onnxruntime(tmp_path / "pruned.onnx", pruned, images)
    assert diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.onnx"]  # no temporaries left


# -- bad inputs: a clear message naming the file, exit code 1, the run folder untouched ------------------

@pytest.fixture
def small_run(tmp_path):
    run_dir = make_run(tmp_path / "runs" / "r20", "resnet20", (28, 28), seed=6, closed_blocks=["layer2.0"])
    (run_dir / "export_report.json").write_text('{"from": "an earlier export"}')
    return run_dir


def _listing(run_dir):
    return sorted((p.name, p.stat().st_size) for p in run_dir.iterdir())


def _fails(run_dir, *pattern_parts, exit_code=EXIT_BAD_INPUT):
    before = _listing(run_dir)
    repository = run_dir.parent.parent / "model_repository"
    code, out, err = run_cli("--run", str(run_dir), "--repository", str(repository))
    assert code == exit_code and err.startswith("python -m export: error: ") and "Traceback" not in err, (code, err)
    for part in pattern_parts:
        assert part in err, err
    assert _listing(run_dir) == before
    assert not repository.exists()
    return err


def test_corrupt_network_file(small_run):
    (small_run / "network.pt").write_bytes(b"PK\x03\x04 truncated zip")
    _fails(small_run, str(small_run / "network.pt"), "corrupt")


def test_missing_network_file(small_run):
    (small_run / "network.pt").unlink()
    _fails(small_run, str(small_run / "network.pt"), "no network.pt", "--resume")


def test_mask_of_another_network(small_run, tmp_path):
    other = make_run(tmp_path / "other", "resnet32", (28, 28), seed=6)
    shutil.copy(other / "mask.json", small_run / "mask.json")
    _fails(small_run, str(small_run / "mask.json"), "different network")


def test_mask_of_another_training_run(small_run, tmp_path):
    other = make_run(tmp_path / "other", "resnet20", (28, 28), seed=7, closed_blocks=["layer3.0"])
    shutil.copy(other / "mask.json", small_run / "mask.json")
    _fails(small_run, str(small_run / "mask.json"), "not the mask", "network.pt was trained to")


def test_edited_mask(small_run):
    """A mask.json that still fits the network but is not the run's: the trained network was never
    checked against it, so export refuses it rather than serve channels the training closed."""
    document = json.loads((small_run / "mask.json").read_text())
    document["kept_channels"]["layer1.0.conv1"] = document["kept_channels"]["layer1.0.conv1"][:-1]
    (small_run / "mask.json").write_text(json.dumps(document))
    _fails(small_run, str(small_run / "mask.json"), "not the mask", "edited")


def test_mask_with_bad_indices(small_run):
    document = json.loads((small_run / "mask.json").read_text())
    document["kept_channels"]["layer1.0.conv1"] = [0, 999]
    (small_run / "mask.json").write_text(json.dumps(document))
    _fails(small_run, str(small_run / "mask.json"), "layer1.0.conv1")


def test_unknown_architecture(small_run):
    state = torch.load(small_run / "network.pt", weights_only=True)
    state["network"] = {**state["network"], "model": "no_such_package.nets:Net"}
    torch.save(state, small_run / "network.pt")
    document = json.loads((small_run / "mask.json").read_text())
    (small_run / "mask.json").write_text(json.dumps({**document, "network": state["network"]}))
    _fails(small_run, str(small_run / "network.pt"), "cannot rebuild the network", "no_such_package")


@needs_fmnist
def test_failure_mid_export_leaves_run_folder_as_it_was(small_run, monkeypatch):
    import polarprune.export.api as cli

    def half_written(model, path, input_shape):
        path.write_bytes(b"half an onnx file")
        raise OnnxExportError(f"{path.name}: simulated exporter crash")

    monkeypatch.setattr(cli, "export_onnx", half_written)
    err = _fails(small_run, "simulated exporter crash", exit_code=EXIT_FAILED)  # a failed check, not bad input
    assert not [p for p in os.listdir(small_run) if p.startswith(".")]
    assert "earlier export" in (small_run / "export_report.json").read_text()
    assert "dense.onnx" in err


@needs_fmnist
def test_a_latency_run_on_a_runtime_this_machine_lacks_exports_here(small_run):
    """A run trained with cost: latency on onnxruntime-cuda (on a GPU machine) exports on this CPU machine:
    export reads network.pt and mask.json, and a fresh interpreter running it loads neither the training
    config nor its methods (which would refuse the runtime here), even with the run's checkpoint beside."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the runtime is not missing here")
    config = {"dataset": "fashion_mnist", "model": "resnet20", "method": "polarized", "cost": "latency",
              "target_latency_ratio": 0.5, "latency_runtime": "onnxruntime-cuda"}
    save_checkpoint(small_run / "checkpoint.pt", {"config": config, "network": {}, "model": {}, "epoch": 4})
    with pytest.raises(ConfigError, match="latency_runtime"):  # what rebuilding through the config meets here
        make_config(dict(config))
    repository = small_run.parent.parent / "model_repository"
    code = ("import sys; from polarprune.export.__main__ import main; "
            f"code = main(['--run', {str(small_run)!r}, '--repository', {str(repository)!r}, '--samples', '64']); "
            "print('MODULES', code, *sorted(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exit_code, *loaded = done.stdout.split("MODULES ", 1)[1].split()
    assert exit_code == "0", done.stderr[-3000:]
    assert [m for m in loaded if m.startswith(TRAINING_ONLY)] == []
    assert "polarprune.training.network_file" in loaded  # it did read the run's network
    report = json.loads((small_run / "export_report.json").read_text())
    assert report["method"] == "polarized" and report["removed_blocks"] == ["layer2.0"]
    assert (repository / "r20_pruned").is_dir()
