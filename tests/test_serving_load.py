"""serving/loadtest.py and reloads: the real bundled Triton server with tiny ONNX classifiers.

Skips only when the nvidia-pytriton wheel (and so the tritonserver binary) is absent. No absolute times
are asserted: only counts, memory growth, bounded termination and the direction of an energy ratio.
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import pytest

from polarprune.export.triton_repo import write_model_version
from tiny_onnx import tiny_classifier
from polarprune.serving.__main__ import main as serving_main
from polarprune.serving.client import TritonClassifier
from polarprune.serving.loadtest import BackgroundLoad, probe_energy, run_load_test
from polarprune.serving.probes import ProbeSettings, _drive
from polarprune.serving.report import render_energy, render_load_test, summarize_energy, summarize_load_test
from polarprune.serving.server import LocalTriton, LocalTritonConfig
from run_helpers import require_triton

# "heavy" does ~50x the arithmetic of "light" per inference (hidden 65536 vs 8 in a 64 -> h -> 10 MLP).
PAIR = {"dense": "heavy", "pruned": "light"}
SWAP, FRAGILE = "swap", "fragile"      # reloaded under load; their v1 is the light network
SETTINGS = ProbeSettings.quick(protocols=("http",), load_concurrencies=(1, 8, 32, 64), load_seconds=0.5,
                               request_timeout_s=10.0, energy_concurrency=2, energy_seconds=0.5,
                               energy_repeats=3)


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_load")
    onnx = {"light": tiny_classifier(root / "light.onnx", hidden=8, seed=0),
            "heavy": tiny_classifier(root / "heavy.onnx", hidden=65536, seed=0),
            "v2": tiny_classifier(root / "v2.onnx", hidden=8, seed=1)}  # same shape, other weights
    for name, source in (("light", "light"), ("heavy", "heavy"), (SWAP, "light"), (FRAGILE, "light")):
        write_model_version(root / "repo", name, onnx[source])
    images = np.random.default_rng(1).standard_normal((16, 1, 8, 8)).astype(np.float32)
    return {"repo": root / "repo", "onnx": onnx, "images": images}


@pytest.fixture(scope="module")
def server(workspace):
    require_triton()
    models = (*PAIR.values(), SWAP, FRAGILE)
    triton = LocalTriton(LocalTritonConfig(workspace["repo"], models, startup_timeout_s=60))
    triton.start()
    yield triton
    triton.stop()


def test_load_test_up_to_64_clients_has_no_failures_and_steady_memory(server, workspace):
    load = run_load_test(server.endpoints, PAIR, workspace["images"], SETTINGS, server.pid, log=quiet)
    assert load["failures"] == 0, load["levels"]
    assert [(l["role"], l["concurrency"]) for l in load["levels"]] == [
        ("dense", 1), ("pruned", 1), ("pruned", 8), ("dense", 8),
        ("dense", 32), ("pruned", 32), ("pruned", 64), ("dense", 64)]
    for level in load["levels"]:
        assert level["requests"] > 0 and level["requests_per_s"] > 0
        assert level["stuck_clients"] == 0 and level["errors"] == []
        assert 0 < level["latency"]["p50_ms"] <= level["latency"]["p99_ms"]
        # Bounded: a level ends by itself, at the latest one request deadline after its window.
        assert level["seconds"] < SETTINGS.load_seconds + SETTINGS.request_timeout_s + 5
    memory = load["memory"]
    assert memory["start_mb"] > 50 and memory["samples"] >= 8
    assert {"tritonserver", "heavy v1 stub", "light v1 stub"} <= set(memory["by_process_end_mb"])
    # Rising to 64 connections may cost a few MB of buffers once (the fmnist pair: +2..13 MB out of
    # ~205), never tens of MB; at one fixed load it must stay flat.
    assert memory["growth_mb"] < 40 and memory["growth_pct"] < 15, memory
    assert abs(memory["last_level_growth_mb"]) < 20, memory
    markdown = "\n".join(render_load_test(summarize_load_test(load)))
    assert "**0 failed**" in markdown and "| pruned | 64 |" in markdown and "Steady memory" in markdown


def test_failed_requests_are_counted_with_their_reason(server):
    wrong_shape = np.zeros((1, 1, 8, 9), np.float32)   # the server rejects every request
    measured = _drive(server.endpoints.http_url, "http", "light", wrong_shape, 4, 0.3, timeout_s=5.0)
    assert measured["requests"] == 0 and measured["failures"] >= 4
    assert 1 <= len(measured["errors"]) <= 5 and "unexpected shape" in measured["errors"][0]


def test_reload_under_load_switches_versions_without_failed_requests(server, workspace):
    endpoints = server.endpoints
    batch = workspace["images"][:1]
    loads = [BackgroundLoad(endpoints.url(p), p, SWAP, batch, concurrency=8, max_seconds=60)
             for p in ("http", "grpc")]
    for load in loads:
        load.start()
    try:
        time.sleep(0.5)  # version 1 serves under load
        write_model_version(workspace["repo"], SWAP, workspace["onnx"]["v2"])
        result = server.reload(SWAP)
        assert (result.versions_before, result.versions_after, result.served_version) == (("1",), ("2",), "2")
        time.sleep(0.5)  # version 2 serves under load
    finally:
        results = [load.stop() for load in loads]
    for protocol, measured in zip(("http", "grpc"), results):
        assert measured["failures"] == 0, (protocol, measured["errors"])
        assert measured["versions"].get("1", 0) > 0 and measured["versions"].get("2", 0) > 0, measured
    # Version 2's own weights answer now.
    expected = ort.InferenceSession(str(workspace["onnx"]["v2"])).run(None, {"input": batch})[0]
    with TritonClassifier(endpoints.http_url, SWAP) as client:
        np.testing.assert_allclose(client.logits(batch), expected, rtol=1e-5, atol=1e-5)


def test_reload_of_a_broken_version_fails_clearly_and_keeps_serving_the_old_one(server, workspace, capsys):
    url = server.endpoints.http_url
    assert serving_main(["reload", "--url", url, "--model", FRAGILE]) == 0  # nothing new: a no-op
    assert "fragile: serving version 1" in capsys.readouterr().out
    broken = write_model_version(workspace["repo"], FRAGILE, workspace["onnx"]["v2"])
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with BackgroundLoad(url, "http", FRAGILE, workspace["images"][:1], concurrency=4, max_seconds=60) as load:
        time.sleep(0.3)
        assert serving_main(["reload", "--url", url, "--model", FRAGILE]) == 1
        time.sleep(0.3)
    error = capsys.readouterr().err
    assert "reload of 'fragile' failed" in error and "version 2" in error, error
    assert "still serving version(s) ['1']" in error
    assert load.result["failures"] == 0 and set(load.result["versions"]) == {"1"}, load.result


def test_energy_per_1000_inferences_is_positive_labelled_and_grows_with_compute(server, workspace):
    energy = probe_energy(server.endpoints, PAIR, workspace["images"], SETTINGS, server.pid, log=quiet)
    for role in ("dense", "pruned"):
        assert energy[role]["joules_per_1000_inferences"] > 0 and energy[role]["failures"] == 0
        assert energy[role]["inferences"] > 0 and len(energy[role]["windows"]) == SETTINGS.energy_repeats
    if energy["estimated"]:  # no readable RAPL/NVML counters (e.g. this CI machine)
        assert energy["source"] == "estimate" and energy["sources"] == {"cpu": "estimate"}
        assert any("W per busy core" in note for note in energy["assumptions"])
    assert energy["scope"] == "tritonserver process tree"
    # ~50x the arithmetic must cost more server CPU per inference; wide margin for a noisy machine.
    assert energy["pruned_over_dense"] < 0.9, energy
    markdown = "\n".join(render_energy(summarize_energy(energy)))
    assert ("(ESTIMATE)" in markdown) == energy["estimated"] and "| dense |" in markdown


def test_remote_server_reports_memory_and_energy_unavailable(server, workspace):
    settings = ProbeSettings.quick(protocols=("grpc",), load_concurrencies=(2,), load_seconds=0.2)
    load = run_load_test(server.endpoints, PAIR, workspace["images"], settings, None, log=quiet)
    assert load["failures"] == 0 and load["requests"] > 0 and load["protocol"] == "grpc"
    assert "not visible" in load["memory"]["unavailable"]
    assert all(level["rss_start_mb"] is None for level in load["levels"])
    energy = probe_energy(server.endpoints, PAIR, workspace["images"], settings, None, log=quiet)
    assert set(energy) == {"unavailable"} and "--url" in energy["unavailable"]
    assert "Unavailable: the server's CPU time" in "\n".join(render_energy(summarize_energy(energy)))
