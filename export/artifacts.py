"""What both exports (a training run's folder, a Python API folder) share: the staged artifacts and their
commit into the run folder, TensorRT engines, and the Triton models. `options` is an `export.api.ExportOptions`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polarprune.common.atomicio import write_bytes

from . import ExportError
from . import tensorrt_build as trt_build
from .triton_repo import TritonModelOptions, write_model_versions

KINDS = ("dense", "pruned")
REPORT_NAME = "export_report.json"
OPTIONAL_ARTIFACTS = ("*.ort-*.onnx", "dense.plan", "pruned.plan")


@dataclass
class Samples:
    images: torch.Tensor  # float32 (N, C, H, W), normalised
    labels: torch.Tensor  # int64 (N,)
    normalization: dict | None = None  # {"mean", "std"} per channel, as the images were normalised


def stage_samples(path: Path, samples: Samples) -> None:
    buffer = io.BytesIO()  # built in memory: a failed file write then leaves no half-closed zip behind
    np.savez(buffer, images=samples.images.numpy().astype(np.float32), labels=samples.labels.numpy().astype(np.int64))
    write_bytes(path, buffer.getvalue())


def engines(options, staging: Path, samples: Samples, timing_cache: Path) -> dict:
    if not options.engine:
        return {"built": False, "reason": "not requested (--engine, on a GPU machine)"}
    reason = trt_build.unavailable_reason()
    if reason:
        print(f"TensorRT: no engine built: {reason}")
        return {"built": False, "reason": reason}
    plan = trt_build.plan_build(trt_build.installed_version(), not options.engine_fp32,
                                trt_build.fp16_converter_installed())
    profile = trt_build.batch_profile(options.max_batch_size, options.engine_opt_batch, options.engine_max_batch)
    workspace = options.workspace_mb << 20
    models = {kind: trt_build.build_and_check(staging / f"{kind}.onnx", staging / f"{kind}.plan",
                                              samples.images.numpy(), profile, plan, timing_cache, workspace)
              for kind in KINDS}
    print(f"TensorRT {plan.trt_version}: {plan.precision} engines built ({plan.note})")
    return {"built": True, **trt_build.describe_plan(plan, profile, workspace), "models": models}


def commit(staging: Path, run_dir: Path) -> None:
    """Move the staged artifacts in. The old report goes first (no report = no complete export), and
    optional artifacts of an earlier export that this one did not make go too, so nothing stale stays."""
    (run_dir / REPORT_NAME).unlink(missing_ok=True)
    staged = {path.name for path in staging.iterdir()}
    for pattern in OPTIONAL_ARTIFACTS:
        for stale in run_dir.glob(pattern):
            if stale.name not in staged:
                stale.unlink()
    for name in sorted(staged):
        os.replace(staging / name, run_dir / name)


def write_triton_models(options, run_dir: Path, engine: dict, normalization: dict | None = None) -> dict:
    """Add a version of <run>_dense and <run>_pruned, both or neither; TensorRT plans are served only on
    target gpu. `normalization` ({"mean", "std"}) goes into each config's parameters."""
    names = {kind: f"{run_dir.name}_{kind}" for kind in KINDS}
    serve_plan = options.serve_plan
    if serve_plan and not engine["built"]:
        raise ExportError(f"--serve-plan: no TensorRT engine was built ({engine['reason']})")
    entries = []
    for kind in KINDS:
        plan = run_dir / f"{kind}.plan" if serve_plan else None
        model_options = TritonModelOptions(target=options.target, max_batch_size=options.max_batch_size,
                                           engine_path=str(plan) if plan else None,
                                           engine_tensorrt=engine.get("tensorrt_version") if plan else None,
                                           input_normalization=normalization)
        entries.append((names[kind], run_dir / f"{kind}.onnx", model_options))
    version_dirs = write_model_versions(Path(options.repository), entries)
    platform = "python" if options.target == "cpu" else "tensorrt_plan" if serve_plan else "onnxruntime_onnx"
    return {"repository": str(options.repository), "target": options.target, "platform": platform,
            "max_batch_size": options.max_batch_size,
            "model_names": names, "versions": {kind: str(path) for kind, path in zip(KINDS, version_dirs)}}
