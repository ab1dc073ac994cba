"""Measuring latency on the deployment runtime (`cost: latency`): which runtime and machine, the network or
layer as an ONNX graph, and interleaved timing of many graphs in one process. The table built from these
timings, its fit and the cost it gives the gates: `training.latency`.
"""
from __future__ import annotations

import copy
import io
import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort
import torch
from torch import nn

from polarprune.common.ort_timing import ProviderUnavailable, interleaved, provider_problem, quiet_torch, start_session
from polarprune.common.results import cpu_flags, cpu_model

from .errors import ConfigError
from .onnx_graph import INPUT_NAME, OPSET, OUTPUT_NAME, network_graph, quiet_exporter

RUNTIMES = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider"}
# ISA extensions that change which kernels onnxruntime picks (its blocked conv path follows the widest)
KERNEL_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile")


@dataclass(frozen=True)
class LatencySettings:
    """How and where the table is measured: the `latency_*` config keys."""
    runtime: str = "onnxruntime-cpu"
    batch: int = 1
    threads: int = 2
    cache: str = "~/.cache/polarprune/latency"
    rounds: int = 600          # interleaved rounds; the median of each graph's times is its entry
    budget_s: float = 40.0     # the rounds stop early after this (never before 20 rounds)

    @classmethod
    def from_config(cls, cfg) -> "LatencySettings":
        return cls(cfg.latency_runtime, cfg.latency_batch, cfg.latency_threads, cfg.latency_cache)

    @property
    def provider(self) -> str:
        return RUNTIMES[self.runtime]


def runtime_problem(runtime: str) -> str | None:
    """Why `latency_runtime` cannot be used here (None: it can)."""
    if runtime not in RUNTIMES:
        return f"must be one of {', '.join(RUNTIMES)}"
    problem = provider_problem(RUNTIMES[runtime])
    return None if problem is None else f"{problem}; install the onnxruntime build for it or use onnxruntime-cpu"


def machine_fingerprint() -> dict[str, Any]:
    """What makes timings from two machines incomparable: CPU model, logical cores, kernel-relevant ISA."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = cpu_flags()
    return {"cpu": cpu_model(), "logical_cores": cores, "isa": [f for f in KERNEL_FLAGS if f in flags]}


def layer_bytes(module: nn.Module, input_shape: tuple[int, ...], batch: int) -> bytes:
    """One layer (conv, depthwise conv, linear) as serialized ONNX at a fixed batch, through the TorchScript
    exporter: ~0.03 s a graph where the shared exporter (`training.onnx_graph`) takes ~1 s, and for a single
    layer both emit the same one operator (tests/test_latency_cost.py checks each kind)."""
    buffer = io.BytesIO()
    module = copy.deepcopy(module).eval()
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(module, (torch.zeros(batch, *input_shape),), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    return buffer.getvalue()


def network_bytes(module: nn.Module, input_shape: tuple[int, ...], batch: int) -> bytes:
    """A whole network as serialized ONNX at a fixed batch: the graph export writes (`training.onnx_graph`),
    so the dense, calibration and pruned networks are timed as they will be served."""
    with torch.no_grad():
        return network_graph(copy.deepcopy(module).eval(), input_shape, batch).SerializeToString()


def empty_graph(batch: int) -> bytes:
    """The runtime's per-call floor: an Identity on a (batch, 1) tensor."""
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input"], ["output"])], "floor",
                                   [tensor("input", onnx.TensorProto.FLOAT, [batch, 1])],
                                   [tensor("output", onnx.TensorProto.FLOAT, [batch, 1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    return model.SerializeToString()


def _runner(session: ort.InferenceSession) -> Callable[[], object]:
    model_input = session.get_inputs()[0]
    shape = [int(d) for d in model_input.shape]
    feed = {model_input.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    return lambda: session.run(None, feed)


def time_graphs(graphs: Mapping[str, bytes], settings: LatencySettings,
                rounds: int | None = None) -> dict[str, list[float]]:
    """Milliseconds of every call of each serialized graph, all interleaved in this process.
    ConfigError (key latency_runtime) when the runtime's provider cannot run them."""
    try:
        sessions = {name: start_session(graph, settings.threads, settings.provider) for name, graph in graphs.items()}
    except ProviderUnavailable as error:
        raise ConfigError(f"config key 'latency_runtime': {error}", "latency_runtime") from None
    runners = {name: _runner(session) for name, session in sessions.items()}
    with quiet_torch():
        seconds = interleaved(runners, rounds or settings.rounds, warmup=5, budget_s=settings.budget_s,
                              min_rounds=20)
    return {name: [value * 1e3 for value in values] for name, values in seconds.items()}


def median_ms(graphs: Mapping[str, bytes], settings: LatencySettings) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in time_graphs(graphs, settings).items()}


def measure_networks(dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...],
                     settings: LatencySettings, rounds: int = 3000, blocks: int = 5) -> dict[str, Any]:
    """The dense and the pruned network timed interleaved with the table's settings: medians in ms, their
    ratio, and the ratio within each of `blocks` consecutive stretches of the rounds and of the fastest
    calls (how much the machine's load moved it; under load the fastest calls are the least disturbed)."""
    graphs = {name: network_bytes(module, input_shape, settings.batch)
              for name, module in (("dense", dense), ("pruned", pruned))}
    times = time_graphs(graphs, settings, rounds)
    dense_ms, pruned_ms = (np.asarray(times[name]) for name in ("dense", "pruned"))
    stretches = [(float(np.median(p)) / float(np.median(d)))
                 for d, p in zip(np.array_split(dense_ms, blocks), np.array_split(pruned_ms, blocks))]
    return {"dense_ms": float(np.median(dense_ms)), "pruned_ms": float(np.median(pruned_ms)),
            "measured_ratio": float(np.median(pruned_ms) / np.median(dense_ms)),
            "measured_ratio_blocks": stretches, "fastest_call_ratio": float(pruned_ms.min() / dense_ms.min()),
            "rounds": int(dense_ms.size)}
