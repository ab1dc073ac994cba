"""serving/: the real bundled Triton server on free loopback ports with a tiny dense/pruned ONNX pair.

Skips only when the nvidia-pytriton wheel (and so the tritonserver binary) is absent.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from polarprune.export.triton_repo import write_model_version
from tiny_onnx import tiny_classifier
from polarprune.serving.__main__ import main as serving_main
from polarprune.serving.client import InputSpecError, ServingError, TritonClassifier
from polarprune.serving.perf_analyzer import find_perf_analyzer
from polarprune.serving.errors import ServerError
from polarprune.serving.server import LocalTriton, LocalTritonConfig
from polarprune.serving.shm import leftover_shm_regions
from run_helpers import modules_loaded_by, require_triton

MODELS = {"dense": "tiny_dense", "pruned": "tiny_pruned"}




@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A model repository written by export/triton_repo.py plus the run folder the export stage leaves."""
    root = tmp_path_factory.mktemp("serving")
    onnx_files = {role: tiny_classifier(root / f"{role}.onnx", hidden=hidden, seed=seed)
                  for (role, hidden, seed) in (("dense", 32, 0), ("pruned", 8, 0))}
    for role, name in MODELS.items():
        write_model_version(root / "repo", name, onnx_files[role])
    images = np.random.default_rng(1).standard_normal((300, 1, 8, 8)).astype(np.float32)
    labels = ort.InferenceSession(str(onnx_files["dense"])).run(None, {"input": images})[0].argmax(1)
    run = root / "runs" / "tiny"
    run.mkdir(parents=True)
    np.savez(run / "test_samples.npz", images=images, labels=labels.astype(np.int64))
    (run / "export_report.json").write_text(json.dumps({
        "model_names": MODELS, "flops_ratio": 8 / 32, "dataset": "synthetic", "input_shape": [1, 8, 8],
        "num_classes": 10}))
    return {"root": root, "repo": root / "repo", "run": run, "onnx": onnx_files, "images": images}


@pytest.fixture(scope="module")
def server(workspace):
    require_triton()
    triton = LocalTriton(LocalTritonConfig(workspace["repo"], tuple(MODELS.values()), startup_timeout_s=60))
    triton.start()
    yield triton
    triton.stop()


def test_http_and_grpc_answers_match_onnxruntime(server, workspace):
    images = workspace["images"][:20]
    for role, name in MODELS.items():
        session = ort.InferenceSession(str(workspace["onnx"][role]))
        expected = session.run(None, {"input": images})[0]
        for protocol in ("http", "grpc"):
            with TritonClassifier(server.endpoints.url(protocol), name, protocol) as client:
                assert client.spec.input_dims == (1, 8, 8) and client.spec.max_batch_size == 64
                np.testing.assert_allclose(client.logits(images), expected, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(client.logits(images[0]), expected[:1], rtol=1e-5, atol=1e-5)
                many = np.repeat(images, 4, axis=0)  # 80 > max_batch_size: split into two requests
                assert (client.classify(many) == np.repeat(expected.argmax(1), 4)).all()


def test_bad_requests_get_clear_errors_and_server_stays_healthy(server, workspace):
    good = workspace["images"][:2]
    wrong_shape = np.zeros((2, 1, 8, 9), np.float32)
    wrong_dtype = good.astype(np.float64)
    for protocol in ("http", "grpc"):
        with TritonClassifier(server.endpoints.url(protocol), MODELS["pruned"], protocol) as client:
            # Caught before sending.
            with pytest.raises(InputSpecError, match=r"shape must be \[N, 1, 8, 8\]"):
                client.logits(wrong_shape)
            with pytest.raises(InputSpecError, match="must be FP32"):
                client.logits(wrong_dtype)
            with pytest.raises(InputSpecError, match="NaN"):
                client.logits(np.full((1, 1, 8, 8), np.nan, np.float32))
            # Sent anyway (bypassing the checks): Triton's own message is relayed.
            with pytest.raises(ServingError, match="unexpected shape"):
                client.infer_once(wrong_shape)
            with pytest.raises(ServingError, match="FP64"):
                client.infer_once(wrong_dtype)
            with pytest.raises(ServingError, match="NaN or Inf"):  # model.py's TritonError
                client.infer_once(np.full((1, 1, 8, 8), np.nan, np.float32))
            assert client.logits(good).shape == (2, 10)

    # A raw tritonclient request with a wrong dtype, as a user without our client would send it.
    raw = grpcclient.InferenceServerClient(server.endpoints.grpc_url)
    tensor = grpcclient.InferInput("input", [2, 1, 8, 8], "FP64")
    tensor.set_data_from_numpy(wrong_dtype)
    with pytest.raises(InferenceServerException, match="expects 'FP32'"):
        raw.infer(MODELS["dense"], [tensor])
    raw.close()
    health = httpclient.InferenceServerClient(server.endpoints.http_url)
    assert health.is_server_ready() and all(health.is_model_ready(m) for m in MODELS.values())
    health.close()


def test_quick_probes_write_serving_report(server, workspace, tmp_path, capsys):
    report_dir = tmp_path / "reports"
    code = serving_main(["--repository", str(workspace["repo"]), "--run", str(workspace["run"]),
                         "--report-dir", str(report_dir), "--url", server.endpoints.http_url,
                         "--grpc-url", server.endpoints.grpc_url, "--quick", "--no-perf-analyzer"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((report_dir / "serving.json").read_text())
    for role in ("dense", "pruned"):
        entry = summary[role]
        assert entry["p50_ms"] > 0 and entry["p50_ms"] <= entry["p95_ms"] <= entry["p99_ms"]
        assert set(entry["throughput"]) == {"1", "4"} and all(v > 0 for v in entry["throughput"].values())
        assert entry["latency"]["http"]["n"] > 0 and entry["latency"]["grpc"]["n"] > 0
    assert summary["dense"]["accuracy"] == 1.0  # labels are the dense model's own predictions
    assert 0 <= summary["pruned"]["accuracy"] <= 1 and 0 <= summary["top1_agreement"] <= 1
    assert summary["speedup_p50"] > 0 and summary["speedup_throughput"] > 0
    assert summary["flops_ratio"] == 0.25
    assert all(summary["correctness"][role]["ok"] for role in ("dense", "pruned"))
    assert all(r["avg_execution_batch"] >= 1 for r in summary["throughput_sweep"])
    assert "skipped" in summary["perf_analyzer"]
    for name in ("serving.md", "serving_raw.json", "latency.png", "throughput.png"):
        assert (report_dir / name).stat().st_size > 0
    assert "| p50 latency, http, batch 1 (ms) |" in printed


def test_missing_export_outputs_say_run_make_export(tmp_path, capsys):
    assert serving_main(["--run", str(tmp_path / "runs" / "nothing"), "--quick"]) == 2
    assert "run make export first" in capsys.readouterr().err


def gpu_run(root: Path) -> tuple[Path, Path]:
    """A GPU repository (onnxruntime_onnx models, as export --target gpu writes) and its run folder."""
    from polarprune.export.triton_repo import TritonModelOptions

    onnx_file = tiny_classifier(root / "tiny.onnx")
    for name in MODELS.values():
        write_model_version(root / "repo", name, onnx_file, TritonModelOptions(target="gpu"))
    run = root / "runs" / "tiny"
    run.mkdir(parents=True)
    np.savez(run / "test_samples.npz", images=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    (run / "export_report.json").write_text(json.dumps({
        "model_names": MODELS, "flops_ratio": 0.25, "input_shape": [1, 8, 8], "num_classes": 10}))
    return root / "repo", run


def test_gpu_repository_without_url_is_refused_in_one_line_naming_the_container(tmp_path, capsys):
    """The bundled server has only the python backend: it is not started for onnxruntime_onnx models."""
    from polarprune.common.model_repository import ENGINE_CACHE_DIR, TRITON_RELEASE

    repo, run = gpu_run(tmp_path)
    assert serving_main(["--repository", str(repo), "--run", str(run), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m serving: error: tiny_dense (onnxruntime_onnx), ")
    assert f"docker run --rm --gpus=all" in err and TRITON_RELEASE.image in err and "--url localhost:8000" in err
    assert f"-v {repo.resolve()}:/models:ro" in err and f":{ENGINE_CACHE_DIR} " in err


def test_requested_port_in_use_fails_clearly(workspace):
    require_triton()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = LocalTritonConfig(workspace["repo"], tuple(MODELS.values()), http_port=port)
        with pytest.raises(ServerError, match=f"port {port} .* already in use"):
            LocalTriton(config).start()


def test_model_that_fails_to_load_is_reported_with_tritons_reason(workspace, tmp_path):
    require_triton()
    repo = tmp_path / "repo"
    version = write_model_version(repo, "broken", workspace["onnx"]["dense"])
    # An ONNX file that parses (a damaged one is named before the server starts: tests/corrupt_inputs.py)
    # but that onnxruntime cannot run: only Triton's load finds that out.
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["input"], ["logits"])], "broken",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])])
    (version / "model.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                         .SerializeToString())
    triton = LocalTriton(LocalTritonConfig(repo, ("broken",), startup_timeout_s=60))
    with pytest.raises(ServerError, match="broken.*UNAVAILABLE"):
        triton.start()
    assert triton.process is None and leftover_shm_regions(triton.shm_prefix) == []


def test_perf_analyzer_is_detected_or_skipped_with_a_note():
    analyzer, note = find_perf_analyzer()
    if analyzer is None:
        assert "perf_analyzer" in note and "\n" not in note
    else:
        assert "Perf Analyzer" in note
        analyzer.close()


def test_shutdown_leaves_no_process_and_no_shared_memory(server):
    pid, prefix = server.process.pid, server.shm_prefix
    assert leftover_shm_regions(prefix), "the python backend should hold shm regions while serving"
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the stubs lived in the server's process group
    assert leftover_shm_regions(prefix) == []


def test_serving_imports_no_torch_training_export_or_bench():
    """Serving works from the model repository and run folder alone: a fresh interpreter importing every
    serving module loads none of torch, onnx, training, export or bench (timing comes from common)."""
    loaded = modules_loaded_by("polarprune.serving.__main__", "polarprune.serving.plans", "polarprune.serving.probes",
                               "polarprune.serving.server", "polarprune.serving.loadtest")
    assert "polarprune.serving.probes" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("torch", "onnx") or m.split(".")[:2] in (
        ["polarprune", "training"], ["polarprune", "export"], ["polarprune", "bench"])) == []
