"""Probes of a served dense/pruned pair: correctness, accuracy, latency, throughput, perf_analyzer.

Every loop is bounded in request count and in time. Dense and pruned are always measured in the same
process and interleaved (A B B A ... for latency, alternating order per throughput point), because
absolute times on a shared small machine drift 15-25% between runs: ratios are what we trust. Latency is
timed by the one timing helper the benchmarks use too (common.ort_timing), and the local onnxruntime reference session
has the same no-spinning options as every timed session.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from polarprune.common.ort_timing import interleaved, percentile, start_session, summarize
from polarprune.common.tolerance import allowed_difference, tolerance
from polarprune.common.model_repository import ModelConfigError, parse_config
from polarprune.serving.client import TritonClassifier
from polarprune.serving.perf_analyzer import find_perf_analyzer
from polarprune.serving.run_artifacts import RunArtifacts
from polarprune.serving.server import Endpoints

ROLES = ("dense", "pruned")
# A closed-loop run's clients meet at a barrier before its window opens, so every client sees the same
# window; a client that has not connected by then is stuck, and the run fails instead of waiting on.
CLIENT_START_TIMEOUT_S = 60.0
# After the window and the last request's own timeout: time for the client threads to notice and end.
CLIENT_STOP_GRACE_S = 5.0


def longest_drive_s(seconds: float, timeout_s: float) -> float:
    """The longest a `_drive` of `seconds` with `timeout_s` requests can take before it returns."""
    return CLIENT_START_TIMEOUT_S + seconds + timeout_s + CLIENT_STOP_GRACE_S


@dataclass(frozen=True)
class ProbeSettings:
    protocols: tuple[str, ...] = ("http", "grpc")  # the first one is the headline / sweep protocol
    correctness_samples: int = 64      # bounds per platform and precision: common/tolerance.py
    accuracy_samples: int = 0          # 0 = every test sample
    latency_warmup: int = 50           # per model and protocol
    latency_requests: int = 500        # per model and protocol
    latency_budget_s: float = 60.0     # per protocol
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16)
    batch_sizes: tuple[int, ...] = (1, 16)
    point_seconds: float = 2.0         # per (model, batch, concurrency) point
    perf_analyzer: bool = True
    perf_analyzer_path: str | None = None
    perf_analyzer_ms: int = 1000
    # load test (serving/loadtest.py): batch 1, every level run for each model in turn
    load_concurrencies: tuple[int, ...] = (1, 8, 32, 64)
    load_seconds: float = 6.0          # per model and level
    request_timeout_s: float = 10.0    # deadline of every load-test / energy request
    # energy per inference: fixed-load windows, dense and pruned interleaved, medians over repeats
    energy_concurrency: int = 4
    energy_seconds: float = 3.0
    energy_repeats: int = 5

    @classmethod
    def quick(cls, **overrides) -> "ProbeSettings":
        """Seconds, not minutes: for tests and smoke runs."""
        return replace(cls(correctness_samples=16, accuracy_samples=512, latency_warmup=10,
                           latency_requests=60, latency_budget_s=15.0, concurrencies=(1, 4),
                           batch_sizes=(1, 8), point_seconds=0.5, perf_analyzer_ms=500,
                           load_seconds=0.4, energy_seconds=0.4, energy_repeats=3), **overrides)


def percentiles_ms(samples_ms) -> dict[str, float]:
    """common.ort_timing.summarize of millisecond samples, under the keys serving's reports use."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        return {"n": 0}
    stats = summarize(values / 1e3)
    return {"n": stats["n"], "mean_ms": stats["mean_ms"], "min_ms": stats["min_ms"], "p50_ms": stats["median_ms"],
            "p90_ms": percentile(values, 90), "p95_ms": stats["p95_ms"], "p99_ms": stats["p99_ms"],
            "max_ms": float(values.max())}


def served_version(client: TritonClassifier) -> str:
    """The highest version the server reports loaded (the one export's config names, or the latest)."""
    versions = [v for v in client.spec.versions if str(v).isdigit()]
    return max(versions, key=int) if versions else ""


# ---- correctness and accuracy ------------------------------------------------------------------
def served_precision(model_dir: Path, engine_precision: str | None) -> tuple[str, str, str]:
    """(device, precision, why) the served model computes in, read from its config.pbtxt: the python
    backend runs onnxruntime on the CPU; onnxruntime_onnx runs CUDA kernels, or TensorRT at the
    accelerator's precision_mode; a tensorrt_plan at the precision export built it with."""
    try:
        config = parse_config((model_dir / "config.pbtxt").read_text(errors="replace"))
    except (OSError, ModelConfigError) as error:
        raise ValueError(f"{model_dir}/config.pbtxt: cannot tell what the model computes in ({error})") from None
    if config.backend == "python":
        return "cpu", "fp32", "python backend: onnxruntime on the CPU"
    if config.platform == "tensorrt_plan":
        if engine_precision not in ("fp32", "fp16"):
            raise ValueError(f"{model_dir}: a TensorRT plan, but export_report.json records no engine precision")
        return "gpu", engine_precision, f"TensorRT plan built {engine_precision}"
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accelerator.name == "tensorrt":
            precision = accelerator.parameters.get("precision_mode", "FP32").lower()
            return "gpu", precision, f"onnxruntime's TensorRT accelerator at {precision}"
    gpu = any(group.kind == group.KIND_GPU for group in config.instance_group)
    return ("gpu" if gpu else "cpu"), "fp32", f"{config.platform or config.backend} on the {'GPU' if gpu else 'CPU'}"


def probe_correctness(endpoints: Endpoints, models: dict[str, str], repository: Path,
                      images: np.ndarray, settings: ProbeSettings, run: RunArtifacts | None = None) -> dict:
    """Served logits vs onnxruntime (CPU) run here on the same ONNX: the repository's model.onnx, or for a
    TensorRT plan the run's <role>.onnx it was built from. The bound depends on what the server computes
    in (common/tolerance.py) and is reported with its reason."""
    batch = images[:settings.correctness_samples]
    engine = (run.export_report.get("engine") or {}) if run is not None else {}
    report = {}
    for role, name in models.items():
        with TritonClassifier(endpoints.url(settings.protocols[0]), name, settings.protocols[0]) as probe:
            version = served_version(probe)
        onnx_path = Path(repository) / name / version / "model.onnx"
        if not onnx_path.is_file() and run is not None:
            onnx_path = run.run_dir / f"{role}.onnx"  # a plan: check it against the ONNX it was built from
        if not onnx_path.is_file():
            report[role] = {"skipped": f"{onnx_path} not found here (served version {version or '?'})"}
            continue
        device, precision, basis = served_precision(Path(repository) / name, engine.get("precision"))
        session = start_session(str(onnx_path), 1, "CPUExecutionProvider")
        expected = session.run(None, {session.get_inputs()[0].name: batch})[0]
        bound = tolerance(device, precision)
        entry = {"model": name, "version": version, "samples": int(len(batch)), "reference": str(onnx_path),
                 "tolerance": allowed_difference(bound, float(np.abs(expected).max())),
                 "tolerance_basis": f"{device}/{precision} bound {bound:g} x max(1, logit scale): {basis}"}
        for protocol in settings.protocols:
            with TritonClassifier(endpoints.url(protocol), name, protocol) as client:
                as_batch = client.logits(batch)
                one_by_one = np.concatenate([client.logits(x) for x in batch[:8]])
            diff = max(float(np.abs(as_batch - expected).max()),
                       float(np.abs(one_by_one - expected[:len(one_by_one)]).max()))
            entry[protocol] = {"max_abs_diff": diff,
                               "top1_match": float((as_batch.argmax(1) == expected.argmax(1)).mean()),
                               "ok": diff <= entry["tolerance"]}
        entry["ok"] = all(entry[p]["ok"] for p in settings.protocols)
        report[role] = entry
    return report


def probe_accuracy(endpoints: Endpoints, models: dict[str, str], images: np.ndarray,
                   labels: np.ndarray, protocol: str) -> dict:
    """Top-1 accuracy of each served model on the labelled test samples, and their agreement."""
    predictions = {}
    for role, name in models.items():
        with TritonClassifier(endpoints.url(protocol), name, protocol) as client:
            predictions[role] = client.classify(images)
    result = {role: float((pred == labels).mean()) for role, pred in predictions.items()}
    result["top1_agreement"] = float((predictions["dense"] == predictions["pruned"]).mean())
    result["samples"] = int(len(labels))
    return result


# ---- latency -----------------------------------------------------------------------------------
def _requests_over(client: TritonClassifier, samples: list[np.ndarray]):
    """A runner for common.ort_timing.interleaved: one request per call, cycling through `samples`."""
    position = itertools.count()
    return lambda: client.infer_once(samples[next(position) % len(samples)])


def probe_latency(endpoints: Endpoints, models: dict[str, str], images: np.ndarray, protocol: str,
                  settings: ProbeSettings) -> dict:
    """Batch-1 round trips, dense and pruned interleaved (A B B A ...); raw samples plus percentiles."""
    samples = [np.ascontiguousarray(images[i:i + 1]) for i in range(min(len(images), 256))]
    clients = {}
    try:
        for role in ROLES:
            clients[role] = TritonClassifier(endpoints.url(protocol), models[role], protocol)
        # Each model's requests walk through the samples in the same order.
        runners = {role: _requests_over(client, samples) for role, client in clients.items()}
        seconds = interleaved(runners, settings.latency_requests, settings.latency_warmup,
                              settings.latency_budget_s, min_rounds=1)
    finally:
        for client in clients.values():
            client.close()
    times = {role: [s * 1e3 for s in values] for role, values in seconds.items()}
    rounds = min(len(t) for t in times.values())
    paired = np.asarray(times["dense"][:rounds]) / np.asarray(times["pruned"][:rounds])
    return {"samples_ms": times,
            "summary": {role: percentiles_ms(t) for role, t in times.items()},
            "paired_speedup_median": float(np.median(paired)) if rounds else None}


# ---- closed-loop load (throughput sweep here; load test and energy in loadtest.py) --------------
def _drive(url: str, protocol: str, model: str, batch: np.ndarray, concurrency: int, seconds: float, *,
           timeout_s: float = 60.0, stop: threading.Event | None = None,
           max_requests_per_client: int = 100_000, max_errors_kept: int = 5) -> dict:
    """`concurrency` closed-loop clients (own thread, own connection) for `seconds`, or until `stop` is
    set (`seconds` is then the hard cap). Every request has a `timeout_s` deadline; an exception or an
    output of the wrong shape counts as a failure (the first few messages are kept) and the client
    carries on. Only successes count towards latency and throughput."""
    with TritonClassifier(url, model, protocol, timeout_s=timeout_s) as probe:
        spec = probe.spec
    expected_shape = (len(batch), *spec.output_dims)
    stop = stop or threading.Event()
    counts, failures = [0] * concurrency, [0] * concurrency
    latencies = [[] for _ in range(concurrency)]
    versions = [Counter() for _ in range(concurrency)]
    errors: list[str] = []
    window = {}
    # The barrier action runs before anyone is released: every client sees the same window.
    ready = threading.Barrier(concurrency + 1, timeout=CLIENT_START_TIMEOUT_S, action=lambda: window.update(
        start=time.perf_counter(), stop=time.perf_counter() + seconds))

    def failed(slot: int, problem: Exception) -> None:
        failures[slot] += 1
        if len(errors) < max_errors_kept:
            errors.append(f"{type(problem).__name__}: {problem}")

    def client_loop(slot: int) -> None:
        requester = None
        try:
            requester = TritonClassifier(url, model, protocol, timeout_s=timeout_s)
        except Exception as problem:  # still meet the barrier so the others are not stuck
            failed(slot, problem)
        ready.wait()
        try:
            while (requester is not None and not stop.is_set() and time.perf_counter() < window["stop"]
                   and counts[slot] + failures[slot] < max_requests_per_client):
                start = time.perf_counter_ns()
                try:
                    output, version = requester.infer_versioned(batch)
                    if output is None or output.shape != expected_shape:
                        raise ValueError(f"output shape {None if output is None else list(output.shape)}, "
                                         f"expected {list(expected_shape)}")
                except Exception as problem:
                    failed(slot, problem)
                    time.sleep(0.01)  # a dead server must not turn the client into a busy loop
                    continue
                latencies[slot].append((time.perf_counter_ns() - start) / 1e6)
                counts[slot] += 1
                versions[slot][version] += 1
        finally:
            if requester is not None:
                requester.close()

    threads = [threading.Thread(target=client_loop, args=(s,), daemon=True) for s in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    hard_stop = window["stop"] + timeout_s + CLIENT_STOP_GRACE_S  # the last requests may take their timeout
    for thread in threads:
        thread.join(timeout=max(hard_stop - time.perf_counter(), 0.0))
    elapsed = time.perf_counter() - window["start"]
    requests = sum(counts)
    return {"requests": requests, "failures": sum(failures), "seconds": elapsed,
            "requests_per_s": requests / elapsed, "infer_per_s": requests * len(batch) / elapsed,
            "latency": percentiles_ms([ms for per_client in latencies for ms in per_client]),
            "versions": dict(sum(versions, Counter())), "errors": errors,
            "stuck_clients": sum(thread.is_alive() for thread in threads)}


# ---- throughput --------------------------------------------------------------------------------
def server_delta(before: dict, after: dict) -> dict:
    """Per-request means between two `TritonClassifier.statistics()` readings: the whole time a request
    spent in the server, its queueing, its compute (input + infer + output) and the compute_infer part."""
    delta = {k: after[k] - before[k] for k in before}
    requests = max(delta["success_count"], 1)
    return {"requests": delta["success_count"], "server_total_us": delta["success_ns"] / requests / 1e3,
            "server_queue_us": delta["queue_ns"] / requests / 1e3,
            "server_compute_us": (delta["compute_input_ns"] + delta["compute_infer_ns"]
                                  + delta["compute_output_ns"]) / requests / 1e3,
            "server_compute_infer_us": delta["compute_infer_ns"] / requests / 1e3,
            "avg_execution_batch": delta["inference_count"] / max(delta["execution_count"], 1)}


def probe_throughput(endpoints: Endpoints, models: dict[str, str], images: np.ndarray, protocol: str,
                     settings: ProbeSettings) -> list[dict]:
    """Inferences/s over client concurrency x batch size, with server queue/compute per request."""
    url = endpoints.url(protocol)
    stats, records = {}, []
    try:
        for role in ROLES:  # one client per model, only for the statistics endpoint
            stats[role] = TritonClassifier(url, models[role], protocol)
        point = 0
        for batch_size in settings.batch_sizes:
            batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
            for concurrency in settings.concurrencies:
                order = ROLES if point % 2 == 0 else ROLES[::-1]  # neither model always goes first
                point += 1
                for role in order:
                    before = stats[role].statistics()
                    measured = _drive(url, protocol, models[role], batch, concurrency, settings.point_seconds)
                    measured.update({k: v for k, v in server_delta(before, stats[role].statistics()).items()
                                    if k != "requests"})
                    records.append({"role": role, "protocol": protocol, "batch_size": batch_size,
                                    "concurrency": concurrency, **measured})
    finally:
        for client in stats.values():
            client.close()
    return records


def probe_perf_analyzer(endpoints: Endpoints, models: dict[str, str], protocol: str,
                        settings: ProbeSettings) -> dict:
    """perf_analyzer at batch 1 over the concurrency list, when its binary is available."""
    if not settings.perf_analyzer:
        return {"skipped": "disabled (--no-perf-analyzer)"}
    analyzer, note = find_perf_analyzer(settings.perf_analyzer_path)
    if analyzer is None:
        return {"skipped": note}
    try:
        rows = []
        for concurrency in settings.concurrencies:
            for role in ROLES:
                row = analyzer.measure(models[role], endpoints.url(protocol), protocol, concurrency,
                                       measurement_ms=settings.perf_analyzer_ms)
                rows.append({"role": role, "protocol": protocol, "concurrency": concurrency, **row})
    finally:
        analyzer.close()
    return {"version": note, "binary": str(analyzer.binary), "rows": rows}


# ---- everything --------------------------------------------------------------------------------
def run_probes(endpoints: Endpoints, repository: Path, run: RunArtifacts, settings: ProbeSettings,
               log=print) -> dict:
    """All probes in a fixed order; returns the raw results that report.py summarises."""
    models = run.model_names
    headline = settings.protocols[0]
    results = {"settings": asdict(settings), "endpoints": asdict(endpoints), "models": models}
    log("correctness: served logits vs local onnxruntime ...")
    results["correctness"] = probe_correctness(endpoints, models, repository, run.images, settings, run)
    count = settings.accuracy_samples or len(run.images)
    log(f"accuracy on {min(count, len(run.images))} labelled test samples ...")
    results["accuracy"] = probe_accuracy(endpoints, models, run.images[:count], run.labels[:count], headline)
    results["latency"] = {}
    for protocol in settings.protocols:
        log(f"latency, batch 1, {protocol}, dense/pruned interleaved ...")
        results["latency"][protocol] = probe_latency(endpoints, models, run.images, protocol, settings)
    log(f"throughput sweep ({headline}): batch {list(settings.batch_sizes)} x concurrency "
        f"{list(settings.concurrencies)} ...")
    results["throughput"] = probe_throughput(endpoints, models, run.images, headline, settings)
    log("perf_analyzer ...")
    results["perf_analyzer"] = probe_perf_analyzer(endpoints, models, headline, settings)
    return results
