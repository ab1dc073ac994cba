"""The latency-regression fixture: one fixed dense/pruned pair, measured the same way by
tests/test_latency_regression.py and by `bench/speedup.py --baseline-fixture`, and its baseline file.

The pair is ResNet-20 at 1x28x28 (the default dataset's input) with about half its MACs removed as whole
residual blocks; the remaining inner widths are the full 16/32/64, multiples of 16.
"""
from __future__ import annotations

import json
import statistics
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from polarprune.common.atomicio import write_json
from polarprune.training.gating import full_mask

from .engines import build_engines, engine_runner, engine_settings, open_engines
from .networks import close_blocks, dense_network, write_onnx
from .timing import cpu_name, measure_pair, ort_runner, ort_session, session_settings

BASELINE_PATH = Path(__file__).with_name("baseline.json")
MODEL, INPUT_SHAPE, TARGET_RATIO = "resnet20", (1, 28, 28), 0.5
BATCHES = (1, 16)
# On a GPU this small network is bound by kernel launches and copies at small batches, whatever its MACs:
# only large batches keep the GPU busy enough for a MAC cut to show.
GPU_BATCHES = (64, 256)


def batches_for(backend: str) -> tuple[int, ...]:
    return BATCHES if backend == "cpu" else GPU_BATCHES
# One intra-op thread: on a busy 2-core machine a pool of two turns every preemption of either thread into a
# stall of the whole op, and batch 16 then took 3x as long as with one thread. The pipeline's 2-thread
# numbers come from bench/speedup.py.
THREADS = 1
ROUNDS, WARMUP, BUDGET_S = 300, 5, 1.5  # per batch size; the budget bounds a slow machine


@dataclass(frozen=True)
class FixturePair:
    dense_onnx: Path
    pruned_onnx: Path
    dense_flops: float
    pruned_flops: float
    closed_blocks: tuple[str, ...]


def build_fixture(directory: str | Path) -> FixturePair:
    """Write the pair's ONNX files into `directory` with the export stage's exporter (about 30 s here)."""
    directory = Path(directory)
    dense = dense_network(MODEL, INPUT_SHAPE)
    full, pruned = full_mask(dense.graph), close_blocks(dense, TARGET_RATIO)
    return FixturePair(write_onnx(dense, full, directory / "dense.onnx"),
                       write_onnx(dense, pruned, directory / "pruned.onnx"),
                       dense.macs(full), dense.macs(pruned), tuple(pruned.closed_blocks))


def measure_fixture(pair: FixturePair, backend: str = "cpu") -> dict:
    """{"settings": what ran, "by_batch": batch size -> `timing.compare` result} for the pair on one
    backend: "cpu" or "cuda" (onnxruntime execution providers) or "tensorrt" (engines built by the export
    stage). Raises timing.BackendUnavailable."""
    onnx_paths = {"dense": pair.dense_onnx, "pruned": pair.pruned_onnx}
    with ExitStack() as stack:
        if backend == "tensorrt":
            models = open_engines(build_engines(onnx_paths, INPUT_SHAPE, max(batches_for(backend))), stack)
            make_runner, settings = engine_runner, engine_settings()
        else:
            models = {role: ort_session(path, THREADS, backend) for role, path in onnx_paths.items()}
            make_runner, settings = ort_runner, session_settings(models["dense"])
        results = measure_pair(make_runner, models["dense"], models["pruned"], batches_for(backend), pair.dense_flops,
                               pair.pruned_flops, ROUNDS, WARMUP, BUDGET_S)
    return {"settings": settings, "by_batch": {r["batch"]: r for r in results}}


def required_speedup(pair: FixturePair, share: float) -> float:
    """Speed-up that realises `share` of the ideal one: 1 + share * (dense/pruned MACs - 1)."""
    return 1 + share * (pair.dense_flops / pair.pruned_flops - 1)


def load_baseline(path: Path = BASELINE_PATH) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def baseline_speedup(baseline: dict, backend: str, batch: int) -> float | None:
    return baseline.get("speedup", {}).get(backend, {}).get(str(batch))


def write_baseline(pair: FixturePair, measurements: list[dict], backend: str, path: Path = BASELINE_PATH) -> dict:
    """Record the median speed-up per batch size over several measurements, keeping other backends' entries."""
    baseline = load_baseline(path)
    baseline["fixture"] = {"model": MODEL, "input_shape": list(INPUT_SHAPE), "closed_blocks": list(pair.closed_blocks),
                           "flops_ratio": pair.pruned_flops / pair.dense_flops}
    baseline.setdefault("speedup", {})[backend] = {
        str(batch): statistics.median(m["by_batch"][batch]["speedup"] for m in measurements)
        for batch in batches_for(backend)}
    baseline.setdefault("measured_on", {})[backend] = {
        "processor": cpu_name(), "attempts": len(measurements), **measurements[0]["settings"],
        "rounds": {str(batch): [m["by_batch"][batch]["dense"]["n"] for m in measurements]
                   for batch in batches_for(backend)}}
    write_json(path, baseline)
    return baseline
