"""The one timing helper of every latency harness (bench/, serving/, the latency regression test).

On a shared machine absolute times drift 15-25% between processes and single calls spike, so models are
always timed in one process, interleaved, and compared by the ratio of their medians; the spread (p95,
min) is reported beside the median. Sessions get pinned, identical options so that two measurements
differ only in the model, and no idle thread pool may steal the cores from the one being timed:
onnxruntime's pools do not spin (`NO_SPINNING`), torch's pool is cut to one thread while onnxruntime is
timed (`quiet_torch`), and only one model runs at a time. torch is never imported here (serving uses
this module and must not pull torch in).
"""
from __future__ import annotations

import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import onnxruntime as ort

from bench import BenchError

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Spinning (onnxruntime's default) keeps a session's idle workers busy-waiting after each run: with several
# sessions alive in one process, a dense batch-64 run took 28 ms instead of 15 ms on 2 cores.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

Runner = Callable[[], object]


class BackendUnavailable(BenchError, RuntimeError):
    """The requested backend (onnxruntime execution provider, TensorRT) is not usable on this machine."""


def ort_session(path, threads: int, backend: str = "cpu") -> ort.InferenceSession:
    """A session with the same pinned options for every model; raises BackendUnavailable when onnxruntime
    lacks the provider, cannot start it, or silently falls back to the CPU (as when CUDA libraries are
    missing)."""
    provider = ORT_PROVIDERS[backend]
    if provider not in ort.get_available_providers():
        raise BackendUnavailable(f"onnxruntime {ort.__version__} has no {provider} "
                                 f"(available: {', '.join(ort.get_available_providers())})")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # provider fallbacks are checked below, not read from the log
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as error:  # onnxruntime's own exception types; on the CPU a failure is a real error
        if backend == "cpu":
            raise
        raise BackendUnavailable(f"onnxruntime could not start {provider}: {str(error).splitlines()[0]}") from None
    if session.get_providers()[0] != provider:
        raise BackendUnavailable(f"onnxruntime could not start {provider} (it fell back to "
                                 f"{session.get_providers()[0]})")
    return session


def session_settings(session: ort.InferenceSession) -> dict:
    """The options a session actually runs with, for the JSON reports."""
    options = session.get_session_options()
    return {"onnxruntime": ort.__version__, "providers": session.get_providers(),
            "graph_optimization_level": str(options.graph_optimization_level).rsplit(".", 1)[-1],
            "execution_mode": str(options.execution_mode).rsplit(".", 1)[-1],
            "intra_op_num_threads": options.intra_op_num_threads,
            "inter_op_num_threads": options.inter_op_num_threads,
            **{key: options.get_session_config_entry(key) for key in NO_SPINNING}}


@contextmanager
def quiet_torch() -> Iterator[None]:
    """torch's intra-op pool cut to one thread for the block (when torch is loaded at all): its workers
    must not compete with the onnxruntime pool being timed."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_name() -> str:
    """The CPU model and its widest vector extension (onnxruntime's blocked conv path depends on it)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return f"{name}, {widest}" if widest else name


def random_batch(shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)


def ort_runner(session: ort.InferenceSession, batch: int) -> Runner:
    """One inference of a fixed random batch; the per-image shape comes from the model's input."""
    model_input = session.get_inputs()[0]
    feed = {model_input.name: random_batch(tuple(model_input.shape[1:]), batch)}
    return lambda: session.run(None, feed)


def torch_runner(model, input_shape: tuple[int, ...], batch: int) -> Runner:
    import torch

    model.eval()
    images = torch.from_numpy(random_batch(input_shape, batch))

    def run():
        with torch.inference_mode():
            return model(images)
    return run


def interleaved(runners: Mapping[str, Runner], rounds: int, warmup: int = 3, budget_s: float | None = None,
                min_rounds: int = 5, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each runner. Every round calls each runner once; the order reverses every
    round (A B, B A, A B ...) so that neither model always runs right after the other. After `budget_s`
    the measurement stops early, but not before `min_rounds` rounds."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = None if budget_s is None else clock() + budget_s
    for round_index in range(rounds):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            start = clock()
            runners[name]()
            times[name].append(clock() - start)
        if deadline is not None and round_index + 1 >= min_rounds and clock() > deadline:
            break
    return times


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between the two nearest ranks."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(values, q))


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, p95, p99, min and mean in milliseconds, the sample count, and the spread p95 / median."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    median, p95 = percentile(ms, 50), percentile(ms, 95)
    return {"n": int(ms.size), "median_ms": median, "p95_ms": p95, "p99_ms": percentile(ms, 99),
            "min_ms": float(ms.min()), "mean_ms": float(ms.mean()), "p95_over_median": p95 / median}


def speedup(dense_time: float, pruned_time: float) -> float:
    return dense_time / pruned_time


def efficiency(measured_speedup: float, dense_flops: float, pruned_flops: float) -> float:
    """Share of the ideal speed-up that was realised: 1.0 means time fell exactly as much as the MACs."""
    return measured_speedup / (dense_flops / pruned_flops)


def compare(times: Mapping[str, list[float]], batch: int, dense_flops: float, pruned_flops: float) -> dict:
    """Summary of one interleaved dense/pruned measurement at one batch size."""
    dense, pruned = summarize(times["dense"]), summarize(times["pruned"])
    gain = speedup(dense["median_ms"], pruned["median_ms"])
    return {"batch": batch, "dense": dense, "pruned": pruned,
            "images_per_s": {"dense": batch / dense["median_ms"] * 1e3, "pruned": batch / pruned["median_ms"] * 1e3},
            "speedup": gain, "efficiency": efficiency(gain, dense_flops, pruned_flops)}


def measure_models(make_runner: Callable[[object, int], Runner], models: Mapping[str, object],
                   batches: tuple[int, ...], rounds: int, warmup: int = 3, budget_s: float | None = None,
                   timing_torch: bool = False) -> dict[int, dict[str, list[float]]]:
    """Seconds per call, per batch size and model, every model interleaved with the others;
    `make_runner(model, batch)` wraps a session, module or engine. torch's pool is kept to one thread
    unless torch is what is timed."""
    with (nullcontext() if timing_torch else quiet_torch()):
        return {batch: interleaved({name: make_runner(model, batch) for name, model in models.items()},
                                   rounds, warmup, budget_s)
                for batch in batches}


def time_onnx(paths: Mapping[str, Path], threads: int, batches: tuple[int, ...], rounds: int, warmup: int = 3,
              budget_s: float | None = None, backend: str = "cpu") -> tuple[dict[int, dict[str, dict]], dict]:
    """ONNX files timed on onnxruntime, interleaved: ({batch: {name: summarize(...)}}, session settings)."""
    sessions = {name: ort_session(path, threads, backend) for name, path in paths.items()}
    times = measure_models(ort_runner, sessions, batches, rounds, warmup, budget_s)
    summaries = {batch: {name: summarize(seconds) for name, seconds in by_name.items()}
                 for batch, by_name in times.items()}
    return summaries, session_settings(next(iter(sessions.values())))


def measure_pair(make_runner: Callable[[object, int], Runner], dense: object, pruned: object,
                 batches: tuple[int, ...], dense_flops: float, pruned_flops: float, rounds: int,
                 warmup: int = 3, budget_s: float | None = None, timing_torch: bool = False) -> list[dict]:
    """`compare` results for each batch size, dense and pruned interleaved."""
    times = measure_models(make_runner, {"dense": dense, "pruned": pruned}, batches, rounds, warmup, budget_s,
                           timing_torch)
    return [compare(times[batch], batch, dense_flops, pruned_flops) for batch in batches]
