"""`python -m serving soak` (serving/soak.py): a 30-second soak of a tiny dense/pruned pair on the bundled
Triton server, and the leak judgement on its own.

No absolute time is asserted: counts, that every interval served both models over both protocols, the
memory series of the server and of each stub, that the verdict agrees with the figures, and the files.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from polarprune.export.triton_repo import write_model_version
from polarprune.serving.__main__ import main as serving_main
from polarprune.serving.server_memory import MemoryWatch
from polarprune.serving.soak import SoakSettings, leak_check, summarize
from tiny_onnx import tiny_classifier
from run_helpers import require_triton

SOAK_SECONDS, INTERVAL_S = 30, 6


def served_pair(root: Path, dense_hidden: int = 1024, pruned_hidden: int = 16) -> Path:
    """A run folder as export leaves it (export_report.json, test_samples.npz) with repository models 'd'
    and 'p' (tiny ONNX classifiers, 1x8x8 -> 10) beside it in root/repo; returns the run folder."""
    for name, hidden in (("d", dense_hidden), ("p", pruned_hidden)):
        write_model_version(root / "repo", name, tiny_classifier(root / f"{name}.onnx", hidden=hidden))
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "export_report.json").write_text(json.dumps({"model_names": {"dense": "d", "pruned": "p"},
                                                        "flops_ratio": 0.5, "input_shape": [1, 8, 8],
                                                        "num_classes": 10}))
    images = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    np.savez(run / "test_samples.npz", images=images, labels=np.arange(32) % 10)
    return run


def test_thirty_second_soak_counts_every_interval_and_watches_memory(tmp_path, capsys):
    require_triton()
    run = served_pair(tmp_path)
    reports = tmp_path / "reports"
    code = serving_main(["soak", "--run", str(run), "--repository", str(tmp_path / "repo"),
                         "--minutes", str(SOAK_SECONDS / 60), "--interval", str(INTERVAL_S),
                         "--report-dir", str(reports)])
    out, err = capsys.readouterr()
    summary = json.loads((reports / "soak.json").read_text())
    # The exit code is the verdict: 1 exactly when a check failed, and the one error line says which.
    assert code == (0 if summary["ok"] else 1), (code, summary["problems"])
    if code:
        assert err.count("\n") == 1 and err.startswith("python -m serving soak: error: "), err
        assert all(problem in err for problem in summary["problems"])
    assert summary["failures"] == 0 and summary["failures_by_reason"] == {}, summary["failures_by_reason"]
    assert summary["stuck_clients"] == 0 and summary["events"] == []
    assert summary["clients"] == 64 and summary["protocols"] == ["http", "grpc"] and summary["batch_sizes"] == [1, 4, 16]
    assert len(summary["intervals"]) == SOAK_SECONDS // INTERVAL_S
    for row in summary["intervals"]:
        for role in ("dense", "pruned"):
            entry = row["roles"][role]
            assert entry["failures"] == 0 and entry["requests"] > 0, (row["interval"], role, entry)
            assert set(entry["requests_by_protocol"]) == {"http", "grpc"}, entry
            assert all(count > 0 for count in entry["requests_by_protocol"].values()), entry
            assert entry["inferences"] > entry["requests"]  # batches of 4 and 16 are in the mix
            assert 0 < entry["p50_ms"] <= entry["p99_ms"]
        assert {"tritonserver", "d v1 stub", "p v1 stub"} <= set(row["memory_mb"]), row["memory_mb"]
        assert all(mb > 5 for mb in row["memory_mb"].values()), row["memory_mb"]
    memory = summary["memory"]
    assert memory["warmup_s"] == INTERVAL_S and memory["after_warmup_mb"] > 50
    # A tiny model under steady load: well under the load test's bound, whatever the verdict's limit.
    assert abs(memory["growth_pct"]) < 15, memory
    assert memory["leak"] == (memory["growth_pct"] >= 5.0)
    for role, entry in summary["p99"].items():
        assert entry["last_over_first"] == pytest.approx(entry["last_ms"] / entry["first_ms"])
    assert summary["provenance"]["command"] and summary["provenance"]["machine"]["cores"] >= 1
    markdown = (reports / "soak.md").read_text()
    assert f"**{summary['requests']} requests, 0 failed**" in markdown and "| d v1 stub MB |" in markdown
    assert (reports / "soak_memory.png").read_bytes()[:4] == b"\x89PNG"
    assert "soak: 64 clients for 30 s" in out


def _samples(totals_mb: list[float], every_s: float = 1.0) -> list[dict]:
    return [{"t": i * every_s, "total_mb": mb, "by_process": {"tritonserver": mb}} for i, mb in enumerate(totals_mb)]


@pytest.mark.parametrize("series, leak", [
    ([100.0] * 10 + [100.0 + i for i in range(50)], True),      # +49 MB after warm-up: 49%
    ([80.0] * 5 + [100.0] * 55, False),                          # growth inside the warm-up does not count
    ([100.0] * 10 + [101.0] * 50, False),                        # +1%
], ids=["steady growth", "warm-up step", "flat"])
def test_leak_is_judged_on_growth_after_the_warm_up(series, leak):
    verdict = leak_check(_samples(series), warmup_s=10.0, max_growth_pct=5.0)
    assert verdict["leak"] is leak, verdict
    assert verdict["after_warmup_mb"] == pytest.approx(100.0, abs=0.5)  # the samples at the end of the warm-up


def test_verdict_lists_every_failed_check():
    settings = SoakSettings(seconds=20, clients=2, interval_s=10)
    def interval(index, p99, failures):
        return {"interval": index, "start_s": 10 * index, "roles": {
            role: {"requests": 10, "inferences": 10, "requests_by_protocol": {"http": 10}, "failures": failures,
                   "failures_by_reason": {"timeout": failures} if failures else {}, "p50_ms": 1.0, "p99_ms": p99}
            for role in ("dense", "pruned")}}
    raw = {"settings": settings.__dict__ | {"protocols": ["http"], "batch_sizes": [1]}, "models": {}, "seconds": 20,
           "clients": 2, "stuck_clients": 0, "events": [],
           "intervals": [interval(0, 2.0, 0), interval(1, 4.0, 1)],
           "memory_samples": _samples([100.0] * 11 + [120.0] * 10)}
    summary = summarize(raw, "r", "test")
    assert not summary["ok"] and len(summary["problems"]) == 4, summary["problems"]
    assert "2 of 42 requests failed" in summary["problems"][0] and "grew 20.0%" in summary["problems"][1]
    assert "dense p99 in the last interval is 2.00x the first" in summary["problems"][2]


def test_memory_watch_samples_from_its_own_process_and_ends_with_the_server(tmp_path, monkeypatch, recwarn):
    """The watcher process samples a stand-in 'server' (a sleeping process) on its own clock, takes a last
    sample when stopped, and leaves by itself once the server is gone; from any working directory."""
    monkeypatch.chdir(tmp_path)  # `python -m` would find the package in the checkout's root by accident
    server = subprocess.Popen(["sleep", "30"])
    try:
        since = time.monotonic()
        watch = MemoryWatch(server.pid, 0.2)
        time.sleep(1.5)
        samples = watch.stop(since=since)
        assert len(samples) >= 4, samples  # about 7 in 1.5 s at 0.2 s, however busy this process is
        assert all(0 <= a["t"] < b["t"] for a, b in zip(samples, samples[1:]))
        assert all(set(s["by_process"]) == {"sleep"} and s["total_mb"] > 0 for s in samples), samples[0]
        gone = MemoryWatch(server.pid, 0.2)
        server.kill()
        server.wait()
        deadline = time.monotonic() + 10
        while gone._process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone._process.poll() == 0  # it noticed the server's end without being told
        gone.stop(since=since)
        assert not [w for w in recwarn if "memory watcher" in str(w.message)]
    finally:
        server.kill()
        server.wait()
