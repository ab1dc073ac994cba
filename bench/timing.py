"""The one timing helper of every latency harness (bench/, serving/, the latency regression test).

On a shared machine absolute times drift 15-25% between processes and single calls spike, so models are
always timed in one process, interleaved, and compared by the ratio of their medians; the spread (p95,
min) is reported beside the median. Session options, spinning, torch's pool and the interleaving itself
live in `common.ort_timing` (training's latency cost uses them too and may not import bench): pinned
identical options, no spinning, torch's pool cut to one thread while onnxruntime is timed, and only one
model runs at a time. torch is never imported here (serving uses this module and must not pull torch in).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnxruntime as ort

from polarprune.bench import BenchError
from polarprune.common.ort_timing import (NO_SPINNING, ProviderUnavailable, Runner, interleaved,  # noqa: F401
                                         percentile, quiet_torch, start_session, summarize)
from polarprune.common.results import cpu_flags, cpu_model

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class BackendUnavailable(BenchError, ProviderUnavailable):
    """The requested backend (onnxruntime execution provider, TensorRT) is not usable on this machine."""


def ort_session(path, threads: int, backend: str = "cpu") -> ort.InferenceSession:
    """A session with the same pinned options for every model (`common.ort_timing.start_session`);
    raises BackendUnavailable when onnxruntime lacks the provider, cannot start it, or silently falls back
    to the CPU (as when CUDA libraries are missing)."""
    try:
        return start_session(str(path), threads, ORT_PROVIDERS[backend])
    except ProviderUnavailable as error:
        raise BackendUnavailable(str(error)) from None


def session_settings(session: ort.InferenceSession) -> dict:
    """The options a session actually runs with, for the JSON reports."""
    options = session.get_session_options()
    return {"onnxruntime": ort.__version__, "providers": session.get_providers(),
            "graph_optimization_level": str(options.graph_optimization_level).rsplit(".", 1)[-1],
            "execution_mode": str(options.execution_mode).rsplit(".", 1)[-1],
            "intra_op_num_threads": options.intra_op_num_threads,
            "inter_op_num_threads": options.inter_op_num_threads,
            **{key: options.get_session_config_entry(key) for key in NO_SPINNING}}


def cpu_name() -> str:
    """The CPU model and its widest vector extension (onnxruntime's blocked conv path depends on it)."""
    flags = cpu_flags()
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return f"{cpu_model()}, {widest}" if widest else cpu_model()


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
