"""export/triton_repo.py: config validity for both targets, version numbering, ownership, model.py."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path, PurePosixPath

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from tiny_onnx import tiny_classifier
from polarprune.common.model_repository import (KNOWN_RELEASES, MANIFEST_NAME, TRITON_RELEASE, RepositoryError,
                                     model_versions, parse_config, plan_problem)
from polarprune.export.triton_repo import (TritonModelOptions, build_config, read_onnx_signature, render_config,
                                           write_model_version, write_model_versions)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    return tiny_classifier(tmp_path / "tiny.onnx")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cpu_entry_layout_and_config(tmp_path, onnx_file):
    version_dir = write_model_version(tmp_path / "repo", "tiny_dense", onnx_file)
    model_dir = tmp_path / "repo" / "tiny_dense"
    assert version_dir == model_dir / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx", "model.py"]
    assert (model_dir / MANIFEST_NAME).is_file()
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".polarprune-tmp")] == []
    # Readable by a server running as another user (e.g. inside NVIDIA's container).
    assert version_dir.stat().st_mode & 0o777 == 0o755
    assert (model_dir / "config.pbtxt").stat().st_mode & 0o444 == 0o444

    config = parse_config((model_dir / "config.pbtxt").read_text(), "tiny_dense")
    assert config.backend == "python" and config.max_batch_size == 64
    assert list(config.input[0].dims) == [1, 8, 8] and config.input[0].name == "input"
    assert list(config.output[0].dims) == [10] and config.output[0].name == "logits"
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.instance_group[0].count == 1
    assert config.parameters["intra_op_thread_count"].string_value == "0"
    assert [w.batch_size for w in config.model_warmup] == [1, 64]


def test_config_text_is_the_printed_protobuf_message(onnx_file):
    """render_config prints build_config's message: parsing the text back gives the same message."""
    signature = read_onnx_signature(onnx_file)
    for options in (TritonModelOptions(), TritonModelOptions(target="gpu"),
                    TritonModelOptions(target="gpu", engine_path="model.plan", engine_tensorrt="10.7.0")):
        assert parse_config(render_config("m", signature, options), "m") == build_config("m", signature, options)


def test_default_gpu_target_lets_the_server_build_and_cache_the_engine(tmp_path, onnx_file):
    """No prebuilt engine by default: Triton's onnxruntime backend builds one with its own TensorRT."""
    version_dir = write_model_version(tmp_path / "repo", "m", onnx_file, TritonModelOptions(target="gpu"))
    config = parse_config((version_dir.parent / "config.pbtxt").read_text(), "m")
    assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["trt_engine_cache_enable"] == "1"
    assert accelerator.parameters["trt_engine_cache_prefix"] == "m"
    assert [w.batch_size for w in config.model_warmup] == [1, 64]  # the engine is built at load time
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx"]

    plain = parse_config(render_config("m", read_onnx_signature(onnx_file),
                                       TritonModelOptions(target="gpu", gpu_tensorrt=False)))
    assert not plain.optimization.execution_accelerators.gpu_execution_accelerator


def test_every_gpu_config_names_an_engine_cache_a_plain_mkdir_creates(tmp_path, onnx_file):
    """onnxruntime's TensorRT provider creates only the last level of trt_engine_cache_path
    (std::filesystem::create_directory) and fails when its parent is missing. Emulated in a folder standing for
    the server's filesystem, which has /tmp: every GPU config's path must be made by one non-recursive mkdir
    (or exist already, as when a host folder is mounted there), and each model's engines keep their own prefix."""
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not a real engine")
    variants = [TritonModelOptions(target="gpu"), TritonModelOptions(target="gpu", gpu_precision="FP32"),
                TritonModelOptions(target="gpu", gpu_tensorrt=False),
                TritonModelOptions(target="gpu", engine_path=str(engine), engine_tensorrt="10.7.0")]
    repo = tmp_path / "repo"
    for index, options in enumerate(variants):
        for role in ("dense", "pruned"):
            write_model_version(repo, f"v{index}_{role}", onnx_file, options)
    server_root = tmp_path / "server"
    (server_root / "tmp").mkdir(parents=True)
    prefixes = {}
    for config_path in sorted(repo.glob("*/config.pbtxt")):
        config = parse_config(config_path.read_text())
        for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
            cache = PurePosixPath(accelerator.parameters["trt_engine_cache_path"])
            assert cache.is_absolute(), cache
            folder = server_root / cache.relative_to("/")
            if not folder.is_dir():
                folder.mkdir()  # parents=False: raises FileNotFoundError for a deeper path, as the provider throws
            prefixes[config.name] = accelerator.parameters["trt_engine_cache_prefix"]
    assert prefixes == {name: name for name in ("v0_dense", "v0_pruned", "v1_dense", "v1_pruned")}
    with pytest.raises(RepositoryError, match="absolute folder"):
        TritonModelOptions(target="gpu", gpu_engine_cache="trt_cache").check()


def test_plan_entry_records_the_tensorrt_that_built_it(tmp_path, onnx_file):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not a real engine; Triton only loads it on a GPU machine")
    with pytest.raises(RepositoryError, match="TensorRT major.minor.patch"):
        write_model_version(tmp_path / "repo", "m_plan", onnx_file,
                            TritonModelOptions(target="gpu", engine_path=str(engine)))
    version_dir = write_model_version(tmp_path / "repo", "m_plan", onnx_file,
                                      TritonModelOptions(target="gpu", engine_path=str(engine),
                                                         engine_tensorrt="10.7.0.post1"))
    plan = parse_config((version_dir.parent / "config.pbtxt").read_text(), "m_plan")
    assert plan.platform == "tensorrt_plan" and plan.default_model_filename == "model.plan"
    assert not plan.optimization.execution_accelerators.gpu_execution_accelerator
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.plan"]
    manifest = json.loads((version_dir.parent / MANIFEST_NAME).read_text())
    assert manifest["versions"]["1"]["options"]["engine_tensorrt"] == "10.7.0.post1"


def test_a_plan_is_refused_by_a_server_with_another_tensorrt():
    served = TRITON_RELEASE.triton
    assert plan_problem("10.7.0.post1", served) is None  # the PyPI wheel of the container's 10.7.0.23
    assert plan_problem("10.7.0", None, server_tensorrt="10.7.0.23") is None
    mismatch = plan_problem("10.8.0.43", served)
    assert "built by TensorRT 10.8.0.43" in mismatch and f"runs TensorRT {TRITON_RELEASE.tensorrt}" in mismatch
    assert "--server-tensorrt" in plan_problem("10.7.0", "2.99.0")  # unknown server: cannot vouch for it
    assert "not recorded" in plan_problem(None, served)


def test_the_gpu_requirements_pin_the_tensorrt_of_the_named_triton_release():
    pins = [line.split("#")[0].strip() for line in (ROOT / "requirements-gpu.txt").read_text().splitlines()]
    tensorrt = [pin for pin in pins if re.match(r"tensorrt\b", pin)]
    assert tensorrt == [f"tensorrt=={TRITON_RELEASE.tensorrt}"], tensorrt
    assert KNOWN_RELEASES[TRITON_RELEASE.triton] == TRITON_RELEASE


def test_versions_increment_and_old_versions_stay_untouched(tmp_path, onnx_file):
    repo = tmp_path / "repo"
    write_model_version(repo, "tiny", onnx_file)
    before = snapshot(repo / "tiny" / "1")
    other = tiny_classifier(tmp_path / "other.onnx", hidden=4, seed=3)
    assert write_model_version(repo, "tiny", other).name == "2"
    assert write_model_version(repo, "tiny", onnx_file).name == "3"
    assert model_versions(repo / "tiny") == [1, 2, 3]
    assert snapshot(repo / "tiny" / "1") == before
    assert (repo / "tiny" / "2" / "model.onnx").read_bytes() == other.read_bytes()


def served_version_problems(model_dir: Path) -> list[str]:
    """Why the version model_dir's config serves is not a complete version matching that config."""
    config = parse_config((model_dir / "config.pbtxt").read_text(), model_dir.name)
    versions = list(config.version_policy.specific.versions)
    if len(versions) != 1:
        return [f"the config names versions {versions}, not one"]
    version_dir = model_dir / str(versions[0])
    missing = [name for name in ("model.onnx", "model.py") if not (version_dir / name).is_file()]
    if missing:
        return [f"version {versions[0]} lacks {missing}"]
    dims = read_onnx_signature(version_dir / "model.onnx").input_dims
    return [] if tuple(config.input[0].dims) == dims else [f"config dims {list(config.input[0].dims)} != {dims}"]


def test_a_write_killed_at_any_step_leaves_each_config_serving_a_complete_matching_version(tmp_path, onnx_file):
    """SIGKILL-like deaths (os._exit) before each file-system step of a two-model write: whatever step it
    reaches, each config names one complete version whose input matches the config, and the next write
    succeeds. The new models take 6x6 inputs, the old ones 8x8, so a config ahead of its version shows."""
    new_onnx = tiny_classifier(tmp_path / "new.onnx", side=6)
    models = ("m_dense", "m_pruned")
    completed_at = None
    for step in range(1, 40):
        repo = tmp_path / f"repo{step}"
        for model in models:
            write_model_version(repo, model, onnx_file)
        pid = os.fork()
        if pid == 0:  # the child dies right before its step-th rename, replace or copy
            calls = [0]

            def dying(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os._exit(9)
                    return real(*args, **kwargs)
                return call
            os.rename, os.replace, shutil.copyfile = dying(os.rename), dying(os.replace), dying(shutil.copyfile)
            try:
                write_model_versions(repo, [(model, new_onnx, TritonModelOptions()) for model in models])
            finally:
                os._exit(0 if calls[0] < step else 1)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code in (0, 9), code
        for model in models:
            assert served_version_problems(repo / model) == [], (step, model)
        if code == 0:
            completed_at = step
            break
        for model in models:  # the next export cleans up and serves its own version
            write_model_version(repo, model, new_onnx)
            assert served_version_problems(repo / model) == []
            assert not [p for p in (repo / model).iterdir() if p.name.startswith(".polarprune-tmp")]
    assert completed_at is not None and completed_at > 8, completed_at  # copies, manifests, folders, configs
    for model in models:
        config = parse_config((repo / model / "config.pbtxt").read_text(), model)
        assert list(config.version_policy.specific.versions) == [2] and list(config.input[0].dims) == [1, 6, 6]


def test_foreign_files_are_refused_and_nothing_is_written(tmp_path, onnx_file):
    repo = tmp_path / "repo"
    (repo / "handmade" / "1").mkdir(parents=True)
    (repo / "handmade" / "config.pbtxt").write_text('name: "handmade"\n')
    before = snapshot(repo)
    with pytest.raises(RepositoryError, match="did not write"):
        write_model_version(repo, "handmade", onnx_file)
    assert snapshot(repo) == before

    write_model_version(repo, "ours", onnx_file)
    (repo / "ours" / "notes.txt").write_text("someone else's file")
    before = snapshot(repo)
    with pytest.raises(RepositoryError, match="notes.txt"):
        write_model_version(repo, "ours", onnx_file)
    assert snapshot(repo) == before


def test_invalid_inputs_fail_before_any_write(tmp_path, onnx_file, monkeypatch):
    repo = tmp_path / "repo"
    with pytest.raises(RepositoryError, match="dynamic batch"):
        write_model_version(repo, "static", tiny_classifier(tmp_path / "static.onnx", batch_dim=1))
    with pytest.raises(RepositoryError, match="invalid model name"):
        write_model_version(repo, "bad name", onnx_file)
    with pytest.raises(RepositoryError, match="unknown target"):
        write_model_version(repo, "t", onnx_file, TritonModelOptions(target="tpu"))
    monkeypatch.setattr("polarprune.export.triton_repo.render_config", lambda *a: 'name: "t"\nmax_batch_size: "many"\n')
    with pytest.raises(RepositoryError, match="does not parse"):
        write_model_version(repo, "t", onnx_file)
    assert not repo.exists()


def _fake_backend_utils() -> types.ModuleType:
    """Just enough of triton_python_backend_utils to drive model.py without a server."""
    utils = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class TritonError:
        def __init__(self, message):
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors or [], error

    utils.Tensor, utils.TritonError, utils.InferenceResponse = Tensor, TritonError, InferenceResponse
    utils.get_input_tensor_by_name = lambda request, name: request.get(name)
    return utils


def test_python_model_batches_requests_and_rejects_bad_ones(tmp_path, onnx_file, monkeypatch):
    version_dir = write_model_version(tmp_path / "repo", "tiny", onnx_file)
    utils = _fake_backend_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    spec = importlib.util.spec_from_file_location("polarprune_model_under_test", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    config = parse_config((version_dir.parent / "config.pbtxt").read_text())
    model = module.TritonPythonModel()
    model.initialize({  # what Triton passes: the config as JSON with proto field names
        "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
        "model_repository": str(version_dir.parent), "model_version": "1"})
    calls = []
    original_run = model.session.run
    model.session.run = lambda *a, **k: calls.append(1) or original_run(*a, **k)

    rng = np.random.default_rng(0)
    good_a = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    good_b = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    nan = np.full((1, 1, 8, 8), np.nan, np.float32)
    wrong_dtype = good_b.astype(np.float64)
    wrong_shape = np.zeros((1, 1, 8, 9), np.float32)
    requests = [{"input": utils.Tensor("input", a)} for a in (good_a, nan, good_b, wrong_dtype, wrong_shape)]
    requests.append({})  # no input at all
    responses = model.execute(requests)

    assert len(calls) == 1, "all valid requests of one execute() must share ONE session.run"
    expected = ort.InferenceSession(str(onnx_file)).run(None, {"input": np.concatenate([good_a, good_b])})[0]
    np.testing.assert_allclose(responses[0].output_tensors[0].as_numpy(), expected[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(responses[2].output_tensors[0].as_numpy(), expected[3:], rtol=1e-5, atol=1e-5)
    assert "NaN" in responses[1].error.message
    assert "FP32" in responses[3].error.message
    assert "shape" in responses[4].error.message
    assert "missing input" in responses[5].error.message


def test_serving_refuses_a_plan_before_the_server_is_asked_to_load_it(tmp_path, onnx_file):
    from polarprune.serving.container import gpu_models
    from polarprune.serving.plans import plan_refusals
    from polarprune.serving.probes import served_precision

    repo = tmp_path / "repo"
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not a real engine")
    write_model_version(repo, "plan", onnx_file, TritonModelOptions(target="gpu", engine_path=str(engine),
                                                                   engine_tensorrt="10.8.0.43"))
    write_model_version(repo, "onnx", onnx_file, TritonModelOptions(target="gpu"))
    write_model_version(repo, "cpu", onnx_file)
    models = ("plan", "onnx", "cpu")
    refused = plan_refusals(repo, models, TRITON_RELEASE.triton, None)
    assert list(refused) == ["plan"] and "built by TensorRT 10.8.0.43" in refused["plan"]
    assert plan_refusals(repo, models, "2.99.0", "10.8.0") == {}
    # The bundled CPU server is not asked at all: both GPU platforms need NVIDIA's container.
    assert gpu_models(repo, models) == {"plan": "tensorrt_plan", "onnx": "onnxruntime_onnx"}

    # The served-output bound follows what each model computes in (common/tolerance.py).
    assert served_precision(repo / "cpu", None)[:2] == ("cpu", "fp32")
    assert served_precision(repo / "onnx", None)[:2] == ("gpu", "fp16")
    assert served_precision(repo / "plan", "fp32")[:2] == ("gpu", "fp32")
    with pytest.raises(ValueError, match="no engine precision"):
        served_precision(repo / "plan", None)
