"""The served-speed tooling: the client's shared-memory path, bench/serving_overhead.py and
bench/check_timing.py on a tiny dense/pruned pair (real bundled Triton; skips where it is absent).

Nothing here asserts a speed: timed unit tests on a shared machine prove nothing. They check that the
paths give the right answers, clean up after themselves, and that the benchmarks write what they promise.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.utils.shared_memory as system_shm

from polarprune.bench import check_timing
from polarprune.bench.timing import NO_SPINNING, ort_session, summarize
from polarprune.export.triton_repo import write_model_version
from polarprune.serving.client import InputSpecError, ServingError, TritonClassifier, _SharedMemoryPair
from polarprune.serving.server import LocalTriton, LocalTritonConfig
from test_serving import require_triton
from tiny_onnx import tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"dense": "tiny_dense", "pruned": "tiny_pruned"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A repository written by the export stage's writer and the run folder export leaves (with the served
    versions recorded, as export_report.json's "triton" entry does)."""
    root = tmp_path_factory.mktemp("overhead")
    onnx_files = {role: tiny_classifier(root / f"{role}.onnx", hidden=hidden)
                  for role, hidden in (("dense", 32), ("pruned", 8))}
    versions = {role: str(write_model_version(root / "repo", MODELS[role], onnx_files[role])) for role in MODELS}
    images = np.random.default_rng(1).standard_normal((64, 1, 8, 8)).astype(np.float32)
    run = root / "runs" / "tiny"
    run.mkdir(parents=True)
    np.savez(run / "test_samples.npz", images=images, labels=np.zeros(len(images), dtype=np.int64))
    (run / "export_report.json").write_text(json.dumps({
        "model_names": MODELS, "flops_ratio": 8 / 32, "dataset": "synthetic", "input_shape": [1, 8, 8],
        "num_classes": 10, "triton": {"versions": versions}}))
    for role in MODELS:  # bench/check_timing.py reads <run>/dense.onnx and pruned.onnx
        (run / f"{role}.onnx").write_bytes(onnx_files[role].read_bytes())
    return {"root": root, "repo": root / "repo", "run": run, "onnx": onnx_files, "images": images}


@pytest.fixture(scope="module")
def server(workspace):
    require_triton()
    with LocalTriton(LocalTritonConfig(workspace["repo"], tuple(MODELS.values()), startup_timeout_s=60)) as endpoints:
        yield endpoints


def test_timed_sessions_do_not_spin(workspace):
    session = ort_session(workspace["onnx"]["dense"], threads=2)
    options = session.get_session_options()
    assert {key: options.get_session_config_entry(key) for key in NO_SPINNING} == NO_SPINNING


def test_summary_reports_the_spread():
    stats = summarize([0.001] * 18 + [0.004] * 2)
    assert stats["median_ms"] == pytest.approx(1.0) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["p95_ms"] == pytest.approx(4.0) and stats["p95_over_median"] == pytest.approx(4.0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shared_memory_path_gives_the_same_logits_and_cleans_up(server, workspace, protocol):
    images = workspace["images"]
    expected = ort.InferenceSession(str(workspace["onnx"]["pruned"])).run(None, {"input": images})[0]
    with TritonClassifier(server.url(protocol), MODELS["pruned"], protocol, shared_memory=True) as client:
        regions = dict(client._shm.names)
        assert all(Path("/dev/shm", name).exists() for name in regions.values())
        np.testing.assert_allclose(client.logits(images), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(client.logits(images[3]), expected[3:4], rtol=1e-5, atol=1e-5)
        many = np.repeat(images, 2, axis=0)  # 128 > max_batch_size: two requests through the same regions
        np.testing.assert_allclose(client.logits(many), np.repeat(expected, 2, axis=0), rtol=1e-5, atol=1e-5)
        with pytest.raises(InputSpecError, match="does not fit the shared-memory region"):
            client.infer_once(many)
    assert not any(Path("/dev/shm", name).exists() for name in regions.values())
    with TritonClassifier(server.url("http"), MODELS["pruned"], "http") as plain:
        registered = plain._client.get_system_shared_memory_status()
    assert not {entry["name"] for entry in registered} & set(regions.values())


class _HeldRegionServer:
    """Stands in for TritonClassifier._call: the server holds each region for `held` unregister calls
    ("currently in use", as Triton 2.51 answers while it has not released the last request), then lets go."""

    def __init__(self, held: int, then: ServingError | None = None):
        self.held, self.then, self.calls = held, then, []

    def _call(self, method, name, json_reply=True):
        self.calls.append(name)
        if self.held:
            self.held -= 1
            raise ServingError("m", "StatusCode.INTERNAL", f"Cannot unregister shared memory region '{name}', "
                                                           "it is currently in use.")
        if self.then is not None:
            raise self.then


def _regions_closed_through(server) -> None:
    pair = _SharedMemoryPair.__new__(_SharedMemoryPair)
    pair._client, pair.names = server, {"input": "r_in"}
    pair.handles = {"input": system_shm.create_shared_memory_region("r_in", f"/polarprune_test_{uuid.uuid4().hex}", 8)}
    pair.close()
    assert pair.handles == {}


def test_close_waits_while_the_server_still_holds_a_region():
    server = _HeldRegionServer(held=3)
    _regions_closed_through(server)
    assert server.calls == ["r_in"] * 4  # three refusals, then the unregister that went through


@pytest.mark.parametrize("failure, warns", [(ServingError("m", "connection", "refused"), False),
                                            (ServingError("m", "StatusCode.UNAVAILABLE", "gone"), False),
                                            (ServingError("m", "StatusCode.INTERNAL", "odd"), True)])
def test_close_warns_about_a_region_it_could_not_unregister(failure, warns, recwarn):
    _regions_closed_through(_HeldRegionServer(held=0, then=failure))
    flagged = [w for w in recwarn if "may stay registered" in str(w.message)]
    assert len(flagged) == int(warns)


def test_serving_overhead_quick_run_writes_its_figures(workspace, tmp_path):
    require_triton()
    out = tmp_path / "serving_overhead.json"
    done = subprocess.run([sys.executable, "-m", "bench.serving_overhead", "--run", str(workspace["run"]), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("ort_speedup_b1", "server_speedup_b1", "client_speedup_b1", "server_overhead_ms_b1",
                "peak_throughput_speedup"):
        assert np.isfinite(report[key]), key
    for batch in ("1", "16"):
        entry = report["by_batch"][batch]
        assert set(entry["client"]) == {"http", "http_shm", "grpc", "grpc_shm"}
        # every server figure comes from requests Triton counted one by one
        assert all(entry["server"][mode][role]["requests"] > 0 for mode in entry["server"] for role in MODELS)
    assert report["triton_options"]["instance_count"] >= 1 and "loadavg_start" in report["load"]
    assert "onnxruntime direct" in done.stdout and "grpc_shm" in done.stdout


def test_check_timing_flags_disagreement(workspace, tmp_path):
    assert check_timing.agreement(2.0, 2.05, 0.05)["agrees"]
    assert not check_timing.agreement(1.04, 1.94, 0.05)["agrees"]  # the make compare vs plain harness
    report = {"results": [{"engine": "onnxruntime", "batch": batch, "speedup": 100.0,
                           **{role: {"median_ms": 1.0, "min_ms": 1.0, "p95_ms": 1.0} for role in MODELS}}
                          for batch in check_timing.BATCHES]}
    (tmp_path / "speedup.json").write_text(json.dumps(report))
    out = tmp_path / "check.json"
    assert check_timing.main(["--speedup", str(tmp_path / "speedup.json"), "--run", str(workspace["run"]),
                              "--rounds", "5", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["bench"]["by_batch"]["1"]["speedup"]["agrees"] is False  # 100x is not what it measured
    assert {"command", "commit", "date", "cpu"} <= set(written)
