"""The GPU set-up that runs without a GPU: what `make venv GPU=1` installs, and scripts/gpu_check.sh on a
machine without one (issue 12)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORT_BUILDS = re.compile(r"^onnxruntime(-[a-z]+)?$")


def requirement_names(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """Distribution names a requirements file asks for, `-r` includes followed."""
    names = []
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            included = (path.parent / line.split(maxsplit=1)[1]).resolve()
            assert included not in seen, f"{path}: include cycle through {included}"
            names += requirement_names(included, (*seen, path.resolve()))
            continue
        names.append(re.match(r"[A-Za-z0-9._-]+", line).group(0).lower().replace("_", "-"))
    return names


def venv_recipe(gpu: bool, venv: Path) -> list[list[str]]:
    """The commands `make venv` would run (make -n: nothing is executed)."""
    args = ["make", "-n", "venv", f"VENV={venv}"] + (["GPU=1"] if gpu else [])
    printed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in printed.splitlines() if line.strip()]


def installed_files(recipe: list[list[str]]) -> list[Path]:
    return [ROOT / cmd[i + 1] for cmd in recipe if "install" in cmd for i, a in enumerate(cmd) if a == "-r"]


@pytest.mark.parametrize("gpu, wanted", [(True, "onnxruntime-gpu"), (False, "onnxruntime")], ids=["GPU=1", "cpu"])
def test_make_venv_installs_exactly_one_onnxruntime_build(tmp_path, gpu, wanted):
    recipe = venv_recipe(gpu, tmp_path / "venv")
    files = installed_files(recipe)
    assert files, f"make venv installs no requirements file: {recipe}"
    names = [name for path in files for name in requirement_names(path)]
    assert [n for n in names if ORT_BUILDS.match(n)] == [wanted], names
    if gpu:
        assert "tensorrt" in names and "nvidia-ml-py" in names
    # A venv that held the other build is cleared of both before the install (they share files).
    other = "onnxruntime" if gpu else "onnxruntime-gpu"
    text = [" ".join(cmd) for cmd in recipe]
    clear = next(i for i, cmd in enumerate(text) if "uninstall" in cmd)
    assert f"pip show -q {other}" in text[clear] and "onnxruntime onnxruntime-gpu" in text[clear]
    assert clear < next(i for i, cmd in enumerate(recipe) if "install" in cmd and "-r" in cmd)


def test_no_shared_requirement_pulls_the_cpu_onnxruntime_back_in():
    """The shared packages (installed here) must not depend on `onnxruntime`, or a GPU venv would get both
    builds again through a dependency. (onnxruntime-gpu's and tensorrt's own dependencies cannot be read
    here: they are not installable on this machine.)"""
    todo = requirement_names(ROOT / "requirements-common.txt")
    seen, pulled = set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue  # an optional extra's package that this venv does not have
        for requirement in requires:
            if "extra ==" in requirement and name != "tritonclient":
                continue
            dependency = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
            if ORT_BUILDS.match(dependency):
                pulled.append(f"{name} -> {requirement}")
            todo.append(dependency)
    assert "torch" in seen and "tritonclient" in seen
    assert not pulled, pulled


@pytest.mark.parametrize("fake_smi", ["exit 9", "exit 0"], ids=["driver fails", "no GPU listed"])
def test_gpu_check_exits_at_once_without_a_gpu(tmp_path, fake_smi):
    """Whatever this machine has, a nvidia-smi that lists no GPU must stop the check before it installs,
    trains or writes anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{fake_smi}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    venv = tmp_path / "venv"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv)}
    started = time.monotonic()
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - started < 10
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no NVIDIA GPU" in done.stderr and "Nothing was run" in done.stderr
    assert not venv.exists(), "the check installed a venv on a machine without a GPU"
