"""Refuse to serve a TensorRT plan on a server that cannot load it, before it is asked to.

A serialized engine loads only in the TensorRT version that built it. Export records that version in the
repository manifest of every plan version; the server's own version comes from its metadata (its Triton
version, mapped through the releases `export.triton_repo` knows) or from `--server-tensorrt`. The bundled
CPU server has no TensorRT backend at all: serving/container.py refuses GPU models for it before this runs.
"""
from __future__ import annotations

import json
from pathlib import Path

from polarprune.common.model_repository import MANIFEST_NAME, ModelConfigError, model_versions, parse_config, plan_problem


def plan_tensorrt(model_dir: Path) -> tuple[bool, str | None]:
    """(serves a plan, the TensorRT that built its newest version) for one repository model folder."""
    try:
        config = parse_config((model_dir / "config.pbtxt").read_text(errors="replace"))
    except (OSError, ModelConfigError):
        return False, None  # not ours to judge here: the server reports why it cannot load it
    if config.platform != "tensorrt_plan":
        return False, None
    try:
        versions = json.loads((model_dir / MANIFEST_NAME).read_text())["versions"]
        newest = str(max(model_versions(model_dir)))
        return True, versions[newest]["options"].get("engine_tensorrt")
    except (OSError, ValueError, KeyError, TypeError):
        return True, None


def plan_refusals(repository: Path, models: tuple[str, ...], server_triton: str | None,
                  server_tensorrt: str | None) -> dict[str, str]:
    """model -> why the server cannot load its plan, for every requested model that serves one."""
    refusals = {}
    for model in models:
        is_plan, built_by = plan_tensorrt(Path(repository) / model)
        if not is_plan:
            continue
        if problem := plan_problem(built_by, server_triton, server_tensorrt):
            refusals[model] = problem
    return refusals
