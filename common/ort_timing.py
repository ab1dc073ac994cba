"""onnxruntime sessions, interleaved timing and its summary statistics, shared by the benchmarks (bench/, serving/) and the
latency cost model of training (training/latency.py), which may not import bench.

Sessions get pinned, identical options so that two measurements differ only in the model, and no idle
thread pool may steal the cores from the one being timed: onnxruntime's pools do not spin (`NO_SPINNING`)
and torch's pool is cut to one thread while onnxruntime is timed (`quiet_torch`). Models are timed in one
process, interleaved, and compared by medians. torch is never imported here (serving must not load it).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import numpy as np
import onnxruntime as ort

# Spinning (onnxruntime's default) keeps a session's idle workers busy-waiting after each run: with several
# sessions alive in one process, a dense batch-64 run took 28 ms instead of 15 ms on 2 cores.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

Runner = Callable[[], object]


class ProviderUnavailable(RuntimeError):
    """onnxruntime lacks an execution provider, cannot start it, or silently fell back to another."""


def session_options(threads: int) -> ort.SessionOptions:
    """The pinned options of every timed session: all graph optimisations, sequential, `threads` intra-op
    threads, no spinning."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # provider fallbacks are checked below, not read from the log
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    return options


def provider_problem(provider: str) -> str | None:
    """Why `provider` cannot be used by this onnxruntime build (None: it is available)."""
    available = ort.get_available_providers()
    if provider in available:
        return None
    return f"onnxruntime {ort.__version__} has no {provider} (available: {', '.join(available)})"


def start_session(model: str | bytes, threads: int, provider: str) -> ort.InferenceSession:
    """A session on `model` (a path or serialized ONNX) with `session_options`; ProviderUnavailable when
    the provider is absent, fails to start, or onnxruntime fell back to another (CUDA libraries missing).
    A failure on the CPU provider is a real error and propagates as onnxruntime raised it."""
    problem = provider_problem(provider)
    if problem:
        raise ProviderUnavailable(problem)
    try:
        session = ort.InferenceSession(model, session_options(threads), providers=[provider])
    except Exception as error:  # onnxruntime's own exception types
        if provider == "CPUExecutionProvider":
            raise
        raise ProviderUnavailable(f"onnxruntime could not start {provider}: {str(error).splitlines()[0]}") from None
    if session.get_providers()[0] != provider:
        raise ProviderUnavailable(f"onnxruntime could not start {provider} (it fell back to "
                                  f"{session.get_providers()[0]})")
    return session


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
