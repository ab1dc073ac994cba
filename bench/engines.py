"""TensorRT engines for timing: built by the export stage's own builder, run through polygraphy.

GPU machines only. `build_engines` raises timing.BackendUnavailable with the export stage's reason (no
`tensorrt`, too old, no GPU) wherever an engine cannot be built.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from .timing import BackendUnavailable, Runner, random_batch

INPUT_NAME = "input"


def build_engines(onnx_paths: dict[str, Path], sample_shape: tuple[int, ...], max_batch: int) -> dict[str, Path]:
    """FP32 engines with one batch profile up to `max_batch`, written beside each ONNX; an engine already
    there is reused (building one takes far longer than timing it)."""
    from polarprune.export import tensorrt_build

    reason = tensorrt_build.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(reason)
    plan = tensorrt_build.plan_build(tensorrt_build.installed_version(), want_fp16=False,
                                     fp16_converter_installed=False)
    profile = tensorrt_build.batch_profile(max_batch)
    engines = {}
    for role, onnx_path in onnx_paths.items():
        engines[role] = onnx_path.with_suffix(".plan")
        if not engines[role].is_file():
            tensorrt_build.build_engine(onnx_path, engines[role], sample_shape, profile, plan,
                                        onnx_path.parent / "tensorrt_timing.cache")
    return engines


def open_engines(engines: dict[str, Path], stack: ExitStack) -> dict[str, object]:
    """Active polygraphy runners, closed with `stack`."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return {role: stack.enter_context(TrtRunner(EngineFromBytes(BytesFromPath(str(path)))))
            for role, path in engines.items()}


def engine_runner(runner, batch: int) -> Runner:
    """One inference of a fixed random batch, host to host (as a client sees it)."""
    feed = {INPUT_NAME: random_batch(tuple(runner.get_input_metadata()[INPUT_NAME].shape[1:]), batch)}
    return lambda: runner.infer(feed)


def engine_settings() -> dict:
    import tensorrt

    return {"tensorrt": tensorrt.__version__, "precision": "fp32", "runner": "polygraphy TrtRunner"}
