"""NVIDIA's Triton container for a GPU model repository: the one `docker run` that serves it.

The bundled CPU Triton has only the python backend, so it cannot load the models a GPU export writes
(`onnxruntime_onnx`, `tensorrt_plan`). `python -m serving` names this command when it refuses such a
repository, and scripts/gpu_check.py runs it: the repository is mounted read-only at /models, a host folder
at the TensorRT engine cache (common.model_repository.ENGINE_CACHE_DIR, so engines survive restarts), and
the models are loaded explicitly so `python -m serving reload` works.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from polarprune.common.model_repository import ENGINE_CACHE_DIR, TRITON_RELEASE, ModelConfigError, parse_config

GPU_PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")
DEFAULT_ENGINE_CACHE = Path.home() / ".cache" / "polarprune" / "trt_engines"   # host side of the cache mount


def tritonserver_args(models: tuple[str, ...]) -> list[str]:
    """How polarprune runs any tritonserver: explicit loads (what `serving reload` needs), up despite a bad
    model (so the repository index can say why it failed), ready only when every loaded model is."""
    return ["--model-control-mode=explicit", *[f"--load-model={model}" for model in models],
            "--exit-on-error=false", "--strict-readiness=true"]


def container_command(repository: Path, models: tuple[str, ...], engine_cache: Path = DEFAULT_ENGINE_CACHE,
                      ports: tuple[int, int, int] = (8000, 8001, 8002), name: str | None = None) -> list[str]:
    """`docker run` of the Triton release polarprune targets, serving `models` of `repository` on the host's
    HTTP, gRPC and metrics `ports`."""
    http, grpc, metrics = ports
    return ["docker", "run", "--rm", *(["--name", name] if name else []), "--gpus=all",
            "-p", f"{http}:8000", "-p", f"{grpc}:8001", "-p", f"{metrics}:8002",
            "-v", f"{Path(repository).resolve()}:/models:ro", "-v", f"{Path(engine_cache).resolve()}:{ENGINE_CACHE_DIR}",
            TRITON_RELEASE.image, "tritonserver", "--model-repository=/models", *tritonserver_args(models)]


def gpu_models(repository: Path, models: tuple[str, ...]) -> dict[str, str]:
    """model -> platform, for each of `models` whose config needs NVIDIA's container (a GPU platform)."""
    found = {}
    for model in models:
        try:
            config = parse_config((Path(repository) / model / "config.pbtxt").read_text(errors="replace"))
        except (OSError, ModelConfigError):
            continue  # not ours to judge here: the server start reports a missing or broken config
        if config.platform in GPU_PLATFORMS:
            found[model] = config.platform
    return found


def bundled_server_refusal(repository: Path, models: tuple[str, ...]) -> str | None:
    """One line saying why the bundled CPU Triton cannot serve these models and how to start the container,
    or None when it can."""
    found = gpu_models(repository, models)
    if not found:
        return None
    listed = ", ".join(f"{model} ({platform})" for model, platform in found.items())
    command = shlex.join(container_command(repository, models))
    return (f"{listed}: GPU models, which the bundled CPU Triton (python backend only) cannot load; start NVIDIA's "
            f"Triton container on a GPU machine with `{command}` and pass --url localhost:8000 (docs/gpu.md)")
