"""What a polarprune model repository entry is, for the stage that writes it (export) and the one that
serves it: the manifest's name, config.pbtxt parsed as Triton's ModelConfig, the version folders, and
which TensorRT a prebuilt plan needs. torch-free and onnx-free, so serving can use it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

MANIFEST_NAME = ".polarprune.json"  # in every model folder polarprune wrote: the files and versions it owns
# Where Triton's onnxruntime backend caches the TensorRT engines of GPU models, inside the server's filesystem.
# onnxruntime's TensorRT provider creates only the last level of this path (std::filesystem::create_directory)
# and fails when the parent is missing, so it is one level under /tmp; each model's engines are told apart by
# trt_engine_cache_prefix. Mount a host folder here to keep them across restarts (docs/gpu.md).
ENGINE_CACHE_DIR = "/tmp/polarprune_trt_cache"


class RepositoryError(RuntimeError):
    """The repository entry cannot be written safely; nothing was written."""


class ModelConfigError(RepositoryError):
    """config.pbtxt text that is not a usable Triton ModelConfig; `detail` is protobuf's line:column
    message or what is missing."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class TritonRelease:
    """One NVIDIA Triton container release and the TensorRT inside it (its release notes' version table)."""

    container: str   # nvcr.io/nvidia/tritonserver:<container>-py3
    triton: str      # the server version its metadata reports
    tensorrt: str    # major.minor.patch; requirements-gpu.txt pins the same for `--engine` builds

    @property
    def image(self) -> str:
        return f"nvcr.io/nvidia/tritonserver:{self.container}-py3"


# The release the GPU path is written for. A plan served by it must be built by this TensorRT.
TRITON_RELEASE = TritonRelease(container="24.12", triton="2.53.0", tensorrt="10.7.0")
KNOWN_RELEASES = {release.triton: release for release in (TRITON_RELEASE,)}


def engine_version(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a TensorRT version string: what decides whether a plan deserializes
    (the PyPI wheel says 10.7.0 or 10.7.0.post1 where the container's library says 10.7.0.23)."""
    numbers = re.findall(r"\d+", version)
    if len(numbers) < 3:
        raise RepositoryError(f"cannot read a TensorRT major.minor.patch version from {version!r}")
    return tuple(int(n) for n in numbers[:3])


def plan_problem(plan_tensorrt: str | None, server_triton: str | None,
                 server_tensorrt: str | None = None) -> str | None:
    """Why a server cannot load a TensorRT plan built by `plan_tensorrt`, or None when it can.
    The server's TensorRT is `server_tensorrt` when known, else looked up from its Triton version."""
    if not plan_tensorrt:
        return "the plan's TensorRT version is not recorded (re-export with --engine to record it)"
    if server_tensorrt is None:
        release = KNOWN_RELEASES.get(server_triton or "")
        if release is None:
            return (f"cannot tell which TensorRT Triton {server_triton or '(unknown version)'} ships (known: "
                    + ", ".join(f"Triton {r.triton} = container {r.container} = TensorRT {r.tensorrt}"
                                for r in KNOWN_RELEASES.values())
                    + "); give it with --server-tensorrt, or serve model.onnx (the default gpu target)")
        server_tensorrt = release.tensorrt
    if engine_version(plan_tensorrt) != engine_version(server_tensorrt):
        return (f"the plan was built by TensorRT {plan_tensorrt} but the server runs TensorRT {server_tensorrt}; "
                "a serialized engine loads only in the TensorRT that built it: rebuild it with that version "
                "(docs/gpu.md) or serve model.onnx (export --target gpu without --serve-plan)")
    return None


def parse_config(text: str, model_name: str | None = None) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text into Triton's ModelConfig; RepositoryError if it does not parse."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as bad:
        raise ModelConfigError(f"config.pbtxt does not parse as Triton ModelConfig: {bad}", str(bad)) from None
    if model_name is not None and config.name != model_name:
        problem = f"config name {config.name!r} != model folder {model_name!r}"
        raise ModelConfigError(problem, problem)
    if not (config.backend or config.platform) or not config.input or not config.output:
        problem = "config.pbtxt needs a backend/platform, an input and an output"
        raise ModelConfigError(problem, problem)
    return config


def model_versions(model_dir: str | os.PathLike) -> list[int]:
    """Numeric version folders present in `model_dir`, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
