"""Packaging: the top-level stage folders install as subpackages of `polarprune`, and the dependencies
and extras are read from the requirements files `make venv` installs (one list of pins).

    training/ -> polarprune/training/, export/ -> polarprune/export/, ... (package_dir below)

so a user's site-packages gets one top-level name, `polarprune`. Metadata lives in pyproject.toml.
"""
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from polarprune import STAGES  # noqa: E402 (imports nothing else: the API is loaded lazily)


def requirements(name: str, follow: bool = True) -> list[str]:
    """The requirement lines of one requirements file, with its `-r` includes when `follow`."""
    lines = []
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            lines += requirements(line[3:].strip()) if follow else []
        elif line:
            lines.append(line)
    return lines


def packages() -> list[str]:
    found = ["polarprune"]
    for stage in STAGES:
        found += ["polarprune." + ".".join(folder.relative_to(ROOT).parts)
                  for folder in sorted([ROOT / stage, *(ROOT / stage).rglob("*")])
                  if (folder / "__init__.py").is_file() and "__pycache__" not in folder.parts]
    return found


setup(
    packages=packages(),
    package_dir={"polarprune": "polarprune", **{f"polarprune.{stage}": stage for stage in STAGES}},
    package_data={"polarprune.bench": ["baseline.json"]},
    # torch and onnxruntime come from an extra: the CPU and GPU builds must never share a venv
    install_requires=requirements("requirements-common.txt"),
    extras_require={
        "cpu": requirements("requirements.txt", follow=False),
        "gpu": requirements("requirements-gpu-cuda13.txt", follow=False) + requirements("requirements-gpu.txt", follow=False),
        "gpu-cuda12": requirements("requirements-gpu-cuda12.txt", follow=False)
                      + requirements("requirements-gpu.txt", follow=False),
        "bench": requirements("requirements-bench.txt"),
    },
)
