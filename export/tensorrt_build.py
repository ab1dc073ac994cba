"""TensorRT engines from the exported ONNX, on GPU machines only.

`unavailable_reason()` says why no engine can be built here (no `tensorrt`, too old, no GPU); the export
then carries on with ONNX alone. An engine is never faked.

Precision follows the installed major version:
  TensorRT 10   weakly typed network; FP16 through BuilderFlag.FP16.
  TensorRT 11+  always strongly typed, the FP16/INT8 builder flags are gone: FP16 needs an FP16 ONNX,
                made with NVIDIA ModelOpt AutoCast. Without ModelOpt an FP16 request is refused (TensorRT
                itself would quietly build FP32); ask for FP32 explicitly instead.
Every build has one optimisation profile over the batch axis (min 1, opt, max >= Triton's
max_batch_size), a workspace limit, and a timing cache file that later builds reuse. Engine outputs are
compared with onnxruntime on real test images (bounds: common/tolerance.py). A plan loads only in the
TensorRT version that built it and runs only on GPUs of the compute capability it was built on:
`build_facts` records both for export_report.json and the repository entry.
"""
from __future__ import annotations

import importlib.util
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polarprune.common.atomicio import write_bytes
from polarprune.common.cli import EXIT_FAILED
from polarprune.common.tolerance import allowed_difference, tolerance

from . import ExportError
from .onnx_export import INPUT_NAME, OUTPUT_NAME, run_onnxruntime

MIN_MAJOR = 10
DEFAULT_WORKSPACE_BYTES = 1 << 30


class EngineError(ExportError):
    """An engine that cannot be built, or does not compute what the ONNX computes."""

    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class BuildPlan:
    trt_version: str
    precision: str            # "fp32" or "fp16": what the engine will compute in
    fp16_builder_flag: bool   # TensorRT 10: set BuilderFlag.FP16
    fp16_onnx: bool           # TensorRT 11+: build from an FP16 copy of the ONNX
    note: str


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int


def major_version(version: str) -> int:
    match = re.match(r"\s*(\d+)", version)
    if not match:
        raise EngineError(f"cannot read a TensorRT version from {version!r}")
    return int(match.group(1))


def plan_build(trt_version: str, want_fp16: bool, fp16_converter_installed: bool) -> BuildPlan:
    """How to get the requested precision from this TensorRT version (pure: no TensorRT needed)."""
    major = major_version(trt_version)
    if major < MIN_MAJOR:
        raise EngineError(f"TensorRT {trt_version} is older than {MIN_MAJOR}.x, which this exporter needs")
    if not want_fp16:
        return BuildPlan(trt_version, "fp32", False, False, "FP32 requested")
    if major == MIN_MAJOR:
        return BuildPlan(trt_version, "fp16", True, False, "FP16 through BuilderFlag.FP16 (TensorRT 10)")
    if fp16_converter_installed:
        return BuildPlan(trt_version, "fp16", False, True,
                         f"TensorRT {major} is strongly typed: FP16 ONNX made with ModelOpt AutoCast")
    raise EngineError(f"TensorRT {trt_version} takes FP16 only from an FP16 ONNX, and nvidia-modelopt, which "
                      "makes one, is not installed: TensorRT would build FP32 without a word. Install it "
                      "(pip install 'nvidia-modelopt[onnx]') or ask for FP32 (--engine-fp32)")


def batch_profile(max_batch_size: int, opt: int | None = None, maximum: int | None = None) -> BatchProfile:
    """Profile over the batch axis; its max must cover every batch Triton may form."""
    maximum = max_batch_size if maximum is None else maximum
    opt = max(1, maximum // 2) if opt is None else opt
    if maximum < max_batch_size:
        raise EngineError(f"engine max batch {maximum} is below the Triton max_batch_size {max_batch_size}")
    if not 1 <= opt <= maximum:
        raise EngineError(f"engine opt batch {opt} must lie in [1, {maximum}]")
    return BatchProfile(1, opt, maximum)


def fp16_converter_installed() -> bool:
    return importlib.util.find_spec("modelopt") is not None


def installed_version() -> str:
    import tensorrt as trt

    return trt.__version__


def build_facts() -> dict:
    """What a plan built here is tied to: the TensorRT version and the GPU (compute capability)."""
    import tensorrt as trt
    import torch

    facts = {"tensorrt_version": trt.__version__, "gpu": None, "compute_capability": None}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        facts.update(gpu=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}")
    return facts


def unavailable_reason() -> str | None:
    """None when engines can be built here, else one line saying why not."""
    try:
        import tensorrt as trt
    except Exception as error:  # a broken install raises OSError/ImportError from its native libraries
        return f"tensorrt is not importable ({type(error).__name__}: {str(error).splitlines()[0]})"
    try:
        plan_build(trt.__version__, False, False)
    except EngineError as error:
        return str(error)
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as error:  # no CUDA device: the binding raises instead of returning a builder
        return f"TensorRT {trt.__version__} cannot start a builder, no usable CUDA GPU ({error})"
    if builder is None:
        return f"TensorRT {trt.__version__} cannot start a builder, no usable CUDA GPU"
    return None


def _fp16_copy(onnx_path: Path, out_path: Path) -> None:
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    converted = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                           keep_io_types=True)  # input/logits stay FP32 for Triton
    onnx.save(converted, str(out_path))


def build_engine(onnx_path: str | Path, engine_path: str | Path, sample_shape: tuple[int, ...],
                 profile: BatchProfile, plan: BuildPlan, timing_cache_path: str | Path,
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> None:
    """Build and atomically write a serialized engine; the timing cache file is read and rewritten."""
    import tensorrt as trt

    onnx_path, timing_cache_path = Path(onnx_path), Path(timing_cache_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode from 10 on; 11+ is strongly typed
    parser = trt.OnnxParser(network, logger)  # holds the weights: must outlive the build
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if plan.fp16_builder_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    batch = builder.create_optimization_profile()
    batch.set_shape(INPUT_NAME, (profile.min, *sample_shape), (profile.opt, *sample_shape),
                    (profile.max, *sample_shape))
    config.add_optimization_profile(batch)
    cached = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cached), False):
        config.set_timing_cache(config.create_timing_cache(b""), False)  # made on another GPU/version
    with tempfile.TemporaryDirectory() as scratch:
        source = onnx_path
        if plan.fp16_onnx:
            source = Path(scratch) / "model.fp16.onnx"
            _fp16_copy(onnx_path, source)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT build failed (see the TensorRT log above)")
    write_bytes(engine_path, bytes(serialized))
    write_bytes(timing_cache_path, bytes(config.get_timing_cache().serialize()))


def compare_with_onnxruntime(engine_path: str | Path, onnx_path: str | Path, images: np.ndarray,
                             profile: BatchProfile, precision: str) -> dict:
    """Max |engine - onnxruntime| on `images` and top-1 agreement; EngineError beyond tolerance."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    expected = run_onnxruntime(onnx_path, images)
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        # copy: the runner may hand back views of host buffers it reuses on the next call
        got = np.concatenate([np.array(runner.infer({INPUT_NAME: images[i:i + profile.max]})[OUTPUT_NAME])
                              for i in range(0, len(images), profile.max)])
    diff = float(np.abs(got.astype(np.float32) - expected).max())
    scale = float(np.abs(expected).max())
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    bound = tolerance("gpu", precision)
    if diff > allowed_difference(bound, scale):
        raise EngineError(f"{engine_path}: engine logits differ from onnxruntime by {diff:.3g} "
                          f"(gpu/{precision} tolerance {bound:g} x max(1, logit scale {scale:.3g}))")
    return {"max_abs_diff_vs_onnxruntime": diff, "top1_agreement": agreement, "tolerance": bound}


def build_and_check(onnx_path: Path, engine_path: Path, images: np.ndarray, profile: BatchProfile,
                    plan: BuildPlan, timing_cache_path: Path, workspace_bytes: int) -> dict:
    """Build one engine and compare it with onnxruntime; the report entry for it."""
    build_engine(onnx_path, engine_path, tuple(images.shape[1:]), profile, plan, timing_cache_path,
                 workspace_bytes)
    return {"file": engine_path.name, **compare_with_onnxruntime(engine_path, onnx_path, images, profile,
                                                                 plan.precision)}


def describe_plan(plan: BuildPlan, profile: BatchProfile, workspace_bytes: int) -> dict:
    return {**asdict(plan), **build_facts(), "profile": asdict(profile), "workspace_bytes": workspace_bytes}
