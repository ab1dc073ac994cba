"""Where the nvidia-pytriton wheel keeps the Triton server, its libraries and the python backend.

pytriton is located with importlib's finder only: importing it would pull in far more than we need.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from polarprune.serving.errors import TritonNotFound


@dataclass(frozen=True)
class TritonInstall:
    """The parts of the pytriton wheel needed to run tritonserver with the python backend."""

    binary: Path
    libs: Path
    python_backend: Path
    python_stub: Path


def find_triton_install() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFound("nvidia-pytriton is not installed (pip install nvidia-pytriton)")
    package = Path(list(spec.submodule_search_locations)[0])
    bundle = package / "tritonserver"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=bundle / "bin" / "tritonserver",
        libs=package.parent / "nvidia_pytriton.libs",
        python_backend=bundle / "backends" / "python",
        python_stub=bundle / "python_backend_stubs" / python_version / "triton_python_backend_stub",
    )
    for part in (install.binary, install.libs, install.python_backend, install.python_stub):
        if not part.exists():
            raise TritonNotFound(f"pytriton is installed but {part} is missing (Python {python_version})")
    return install


def assemble_backend_dir(install: TritonInstall, workdir: Path) -> Path:
    """A backend directory under `workdir` holding python/ with the backend library, its utils and our
    Python's stub (the wheel keeps the stubs of every Python version apart)."""
    python_dir = workdir / "backends" / "python"
    python_dir.mkdir(parents=True)
    for source in [*install.python_backend.iterdir(), install.python_stub]:
        if source.is_file():
            (python_dir / source.name).symlink_to(source)
    return python_dir.parent
