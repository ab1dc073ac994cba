"""The GPU set-up that runs without a GPU: which CUDA stack `make venv GPU=1` installs for a driver (nvidia-smi
faked), that a GPU venv stays one, and scripts/gpu_check.sh on a machine without one (issues 12, 25)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from scripts import gpu_stack

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


def fake_driver(tmp_path: Path, version: str | None) -> dict[str, str]:
    """An environment whose nvidia-smi reports `version` as the driver (None: nvidia-smi fails)."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho {version}\n" if version else "#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def make_plan(target: str, venv: Path, env: dict[str, str] | None = None, *variables: str) -> list[list[str]]:
    """The commands `make <target>` would run (make -n: nothing is executed)."""
    args = ["make", "--no-print-directory", "-n", target, f"VENV={venv}", f"PYTHON={sys.executable}", *variables]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def installed_files(recipe: list[list[str]]) -> list[Path]:
    return [ROOT / cmd[i + 1] for cmd in recipe if "install" in cmd for i, a in enumerate(cmd) if a == "-r"]


def fake_venv(venv: Path, stamp: str) -> Path:
    """A venv folder as an install leaves it (a python and the stamp file), without any package."""
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / stamp).touch()
    return venv


@pytest.mark.parametrize("driver, stack", [("550.54.15", "cuda12"), ("570.124.06", "cuda12"),
                                           ("580.65.06", "cuda13"), ("595.12", "cuda13")])
def test_the_driver_chooses_the_cuda_stack(driver, stack):
    chosen = gpu_stack.choose_stack(driver)
    assert chosen.name == stack
    pins = chosen.pins()
    assert pins["torch"] == {"cuda13": "2.13.0", "cuda12": "2.10.0"}[stack]
    assert pins["onnxruntime-gpu"] == {"cuda13": "1.31.1", "cuda12": "1.26.0"}[stack]
    assert pins["tensorrt"] == "10.7.0"


def test_a_driver_older_than_every_stack_is_refused_naming_driver_stack_and_fix():
    with pytest.raises(gpu_stack.StackError) as refused:
        gpu_stack.choose_stack("470.82.01")
    message = str(refused.value)
    assert "\n" not in message
    assert "NVIDIA driver 470.82.01" in message and "CUDA 12.8 stack" in message and "torch 2.10.0" in message
    assert "update the driver to 580 or newer" in message


def test_the_triton_container_note_follows_its_driver_table():
    assert "needs driver 560+" in gpu_stack.triton_driver_note("550.54.15")
    assert gpu_stack.triton_driver_note("535.104.05") is None  # a forward-compatible data-center branch
    assert gpu_stack.triton_driver_note("570.124.06") is None


def test_every_gpu_package_is_pinned_in_both_stacks():
    for stack in gpu_stack.STACKS:
        names = requirement_names(ROOT / stack.requirements)
        pins = stack.pins()
        gpu_packages = [n for n in names if n in ("torch", "onnxruntime-gpu", "tensorrt", "nvidia-ml-py")
                        or n.startswith("nvidia-cuda")]
        assert len(gpu_packages) == 5 and all(name in pins for name in gpu_packages), (stack.name, pins)
    # The TensorRT pin and the Python range known for it move together.
    assert gpu_stack.requirement_pins(ROOT / gpu_stack.SHARED_GPU_REQUIREMENTS)["tensorrt"] in gpu_stack.TENSORRT_PYTHONS


def test_tensorrt_wheels_decide_the_python_version():
    assert gpu_stack.tensorrt_python_problem((3, 11)) is None
    problem = gpu_stack.tensorrt_python_problem((3, 13))
    assert "Python 3.13 has no TensorRT 10.7.0 wheel" in problem and "PYTHON=python3.12" in problem


@pytest.mark.parametrize("driver, requirements", [("550.54.15", "requirements-gpu-cuda12.txt"),
                                                  ("570.124.06", "requirements-gpu-cuda12.txt"),
                                                  ("580.65.06", "requirements-gpu-cuda13.txt")])
def test_make_venv_gpu_installs_the_stack_the_driver_runs(tmp_path, driver, requirements):
    recipe = make_plan("venv", tmp_path / "venv", fake_driver(tmp_path, driver), "GPU=1")
    assert installed_files(recipe) == [ROOT / requirements]
    assert recipe[-1] == ["touch", str(tmp_path / "venv" / f".installed-{requirements[:-4]}")]


@pytest.mark.parametrize("driver", ["470.82.01", None], ids=["old driver", "no driver"])
def test_make_venv_gpu_stops_with_the_reason_when_no_stack_fits(tmp_path, driver):
    done = subprocess.run(["make", "--no-print-directory", "-n", "venv", "GPU=1", f"VENV={tmp_path / 'venv'}",
                           f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, env=fake_driver(tmp_path, driver))
    assert done.returncode != 0 and "pip" not in done.stdout
    reasons = [line for line in done.stderr.splitlines() if line.startswith("gpu_stack: error: ")]
    assert len(reasons) == 1, done.stderr
    expected = "NVIDIA driver 470.82.01 is older than 525.60.13" if driver else "nvidia-smi gave no driver version"
    assert expected in reasons[0]


@pytest.mark.parametrize("stamp", [".installed-requirements-gpu-cuda13", ".installed-requirements-gpu-cuda12"])
def test_a_gpu_venv_stays_one_without_gpu_1(tmp_path, stamp):
    """After `make venv GPU=1`, `make train` without GPU=1 plans no install at all, so no CPU onnxruntime."""
    venv = fake_venv(tmp_path / "venv", stamp)
    plan = make_plan("train", venv, fake_driver(tmp_path, None))  # the driver is not even asked
    assert plan and all("pip" not in cmd for cmd in plan), plan
    assert any(cmd[1:3] == ["-m", "training"] for cmd in plan)
    # GPU=0 is how a venv goes back to the CPU stack.
    assert installed_files(make_plan("venv", venv, None, "GPU=0")) == [ROOT / "requirements.txt"]


def test_a_venv_with_the_stamp_of_the_earlier_makefile_stays_a_gpu_venv(tmp_path):
    venv = fake_venv(tmp_path / "venv", ".installed-gpu")
    plan = make_plan("train", venv, fake_driver(tmp_path, "570.124.06"))
    assert installed_files(plan) == [ROOT / "requirements-gpu-cuda12.txt"]


def test_make_serve_on_a_gpu_repository_without_url_exits_2_with_one_line(tmp_path):
    """`make serve` in a GPU venv (stamp only; its python is this test's) on what `export --target gpu` writes."""
    from test_serving import gpu_run

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".installed-requirements-gpu-cuda13").touch()
    repo, run = gpu_run(tmp_path)
    done = subprocess.run(["make", "--no-print-directory", "-s", "serve", f"VENV={venv}", f"REPO={repo}", f"RUN_DIR={run}",
                           f"REPORTS={tmp_path / 'reports'}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=fake_driver(tmp_path, None))
    assert done.returncode == 2, done.stdout + done.stderr
    serving_lines = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert len(serving_lines) == 1, done.stderr
    assert serving_lines[0].startswith("python -m serving: error: ") and "docker run" in serving_lines[0]
    assert "--url localhost:8000" in serving_lines[0]
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("driver", ["570.124.06", "580.65.06", None], ids=["cuda12", "cuda13", "cpu"])
def test_make_venv_installs_exactly_one_onnxruntime_build(tmp_path, driver):
    gpu = driver is not None
    recipe = make_plan("venv", tmp_path / "venv", fake_driver(tmp_path, driver), *(["GPU=1"] if gpu else []))
    files = installed_files(recipe)
    assert files, f"make venv installs no requirements file: {recipe}"
    names = [name for path in files for name in requirement_names(path)]
    assert [n for n in names if ORT_BUILDS.match(n)] == ["onnxruntime-gpu" if gpu else "onnxruntime"], names
    assert names.count("torch") == 1
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
    todo = requirement_names(ROOT / "requirements-common.txt") + ["torch"]
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


# == scripts/gpu_check.py: what it decides without a GPU =================================================

def fake_docker(tmp_path: Path, monkeypatch, script: str) -> None:
    """A `docker` first on PATH that runs `script` (sh) whatever it is asked."""
    bin_dir = tmp_path / "docker-bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_the_gpu_step_blames_the_build_that_does_not_fit_the_driver():
    from scripts.gpu_check import cuda_build_problem

    cuda12, cuda13 = (gpu_stack.choose_stack(d) for d in ("570.124.06", "580.65.06"))
    assert "is a CPU build" in cuda_build_problem("2.13.0+cpu", None, "570.124.06", cuda12)
    mismatch = cuda_build_problem("2.13.0", "13.0", "570.124.06", cuda12)
    assert "CUDA 13.0 build, but NVIDIA driver 570.124.06 runs the CUDA 12.8 stack at most" in mismatch
    assert "requirements-gpu-cuda12.txt" in mismatch and "\n" not in mismatch
    assert cuda_build_problem("2.10.0", "12.8", "580.65.06", cuda13) is None
    assert cuda_build_problem("2.13.0", "13.0", "580.65.06", cuda13) is None


def test_preconditions_give_one_line_per_problem_naming_the_fix(tmp_path, monkeypatch):
    import scripts.gpu_check as gpu_check

    fake_docker(tmp_path, monkeypatch, "echo 'permission denied while trying to connect to the Docker daemon "
                                       "socket at unix:///var/run/docker.sock' >&2; exit 1")
    (tmp_path / "work").mkdir()
    check = gpu_check.GpuCheck(tmp_path / "work")
    monkeypatch.setattr(gpu_check, "version", lambda name: {"polygraphy": "0.49.26"}[name])
    monkeypatch.setattr(gpu_check.sys, "version_info", (3, 13, 1))
    with pytest.raises(gpu_check.Problems) as found:
        check.preconditions(pull=True)
    lines = found.value.lines
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert "Python 3.13 has no TensorRT 10.7.0 wheel" in lines[0] and "PYTHON=python3.12" in lines[0]
    assert "polygraphy 0.49.26" in lines[1] and "polygraphy>=0.53" in lines[1]
    assert "permission denied" in lines[2] and "docker group" in lines[2]


def test_preconditions_check_the_disk_docker_pulls_to(tmp_path, monkeypatch):
    import scripts.gpu_check as gpu_check

    root = tmp_path / "docker-root"
    root.mkdir()
    # `docker info` names its data root; `docker image inspect` finds no image, so --pull would fetch it.
    fake_docker(tmp_path, monkeypatch, f'[ "$1" = info ] && echo {root} && exit 0; exit 1')
    (tmp_path / "work").mkdir()
    check = gpu_check.GpuCheck(tmp_path / "work")
    assert (check.docker_root, check.docker_problem) == (str(root), None)
    monkeypatch.setattr(gpu_check, "free_gib", lambda path: 3.0 if str(path) == str(root) else 100.0)
    with pytest.raises(gpu_check.Problems) as found:
        check.preconditions(pull=True)
    about_the_image = [line for line in found.value.lines if "pulling nvcr.io/nvidia/tritonserver" in line]
    assert len(about_the_image) == 1 and "3.0 GiB free under docker's" in about_the_image[0]
    if gpu_check.polygraphy_problem() is None and gpu_stack.tensorrt_python_problem(sys.version_info[:2]) is None:
        detail, data = check.preconditions(pull=False)  # without --pull the image's space is not needed
        assert "docker usable" in detail and data["docker_root"] == str(root)


def test_the_container_mounts_the_repository_and_the_engine_cache(tmp_path):
    from polarprune.common.model_repository import ENGINE_CACHE_DIR, TRITON_RELEASE
    from polarprune.serving.container import container_command

    command = container_command(tmp_path / "repo", ("a", "b"), tmp_path / "cache", (9000, 9001, 9002), name="x")
    assert command[:2] == ["docker", "run"] and TRITON_RELEASE.image in command
    mounts = [command[i + 1] for i, arg in enumerate(command) if arg == "-v"]
    assert mounts == [f"{tmp_path / 'repo'}:/models:ro", f"{tmp_path / 'cache'}:{ENGINE_CACHE_DIR}"]
    assert "--load-model=a" in command and "--load-model=b" in command and "9000:8000" in command
    assert gpu_stack.TRITON_CONTAINER == TRITON_RELEASE.container  # the driver table is the same release's


def test_engine_warmup_is_timed_apart_from_the_budget():
    from scripts.gpu_check import budgeted_seconds

    assert budgeted_seconds(500.0, {"docker_pull": 120.0, "engine_warmup": 90.0}) == 410.0


def test_the_gpu_step_on_a_gpu_machine(tmp_path):
    """The real step: driver, torch's CUDA, onnxruntime-CUDA session, TensorRT build. GPU machines only."""
    from polarprune.export.tensorrt_build import unavailable_reason

    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi: not a GPU machine")
    if reason := unavailable_reason():
        pytest.skip(f"no TensorRT engine here: {reason}")
    import scripts.gpu_check as gpu_check

    check = gpu_check.GpuCheck(tmp_path)
    detail, data = check.gpu()
    assert data["torch_cuda"] and "CUDAExecutionProvider" in data["providers"]
    assert data["tensorrt_probe"]["top1_agreement"] >= 0.9 and "TensorRT engine built" in detail
