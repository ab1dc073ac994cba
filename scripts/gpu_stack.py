"""Which CUDA stack this machine's NVIDIA driver runs, and whether the GPU venv can be installed here.

    python3 scripts/gpu_stack.py [--python PATH] [--venv DIR]

prints the requirements file of the stack the driver runs (the Makefile installs it for `make venv GPU=1`),
or one `gpu_stack: error: ...` line naming what to do, exit 2. Standard library only: it runs with the system
Python, before the venv exists. scripts/gpu_check.py reads the same table. The package versions live in the
requirements files (each pins every GPU package); this table holds what the driver decides.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROG = "gpu_stack"
SHARED_GPU_REQUIREMENTS = "requirements-gpu.txt"   # both stacks include it: TensorRT, its CUDA 12 runtime, NVML


class StackError(Exception):
    """No GPU stack can be installed here; the message says why and what to do."""


@dataclass(frozen=True)
class CudaStack:
    name: str
    cuda: str                        # the CUDA major.minor its torch wheel is built with
    min_driver: tuple[int, ...]      # oldest driver that runs it (NVIDIA's CUDA compatibility table)
    requirements: str                # the file `make venv GPU=1` installs

    def pins(self) -> dict[str, str]:
        """name -> pinned version of the stack's packages, `-r` includes followed."""
        return requirement_pins(ROOT / self.requirements)


# Newest first; a driver gets the first stack it runs. CUDA 13 needs driver 580 or newer; a CUDA 12 build runs
# on 525.60.13 or newer (CUDA minor-version compatibility), torch 2.10.0 being the last torch built for it.
STACKS = (
    CudaStack("cuda13", cuda="13.0", min_driver=(580,), requirements="requirements-gpu-cuda13.txt"),
    CudaStack("cuda12", cuda="12.8", min_driver=(525, 60, 13), requirements="requirements-gpu-cuda12.txt"),
)
# Python versions with a TensorRT binding wheel on PyPI, per pinned TensorRT (3.13 arrives with 10.9).
TENSORRT_PYTHONS = {"10.7.0": ((3, 10), (3, 12))}
# NVIDIA's Triton container (common.model_repository.TRITON_RELEASE; its release notes): 24.12 is CUDA 12.6.3,
# driver 560+, or on data-center GPUs one of these forward-compatible branches.
TRITON_CONTAINER = "24.12"
TRITON_MIN_DRIVER = (560,)
TRITON_DATACENTER_DRIVERS = ((470, 57), (525, 85), (535, 86), (545, 23))
VENV_FREE_GIB = 15      # estimate: a CUDA torch, onnxruntime-gpu and TensorRT install to ~8 GiB, pip unpacks beside


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def requirement_pins(path: Path) -> dict[str, str]:
    """name -> version for every `name==version` line of a requirements file, `-r` includes followed."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            pins.update(requirement_pins(path.parent / line.split(maxsplit=1)[1]))
        elif match := re.match(r"([A-Za-z0-9._-]+)(\[[^]]*\])?\s*==\s*([^\s;]+)", line):
            pins[match.group(1).lower().replace("_", "-")] = match.group(3)
    return pins


def driver_key(driver: str) -> tuple[int, ...]:
    """A driver version string ("570.124.06") as numbers to compare."""
    return tuple(int(part) for part in driver.split("."))


def read_driver_version() -> str:
    """The NVIDIA driver version nvidia-smi reports (first GPU), e.g. "570.124.06"; StackError when none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise StackError("nvidia-smi not found: install the NVIDIA driver (580 or newer for the CUDA 13 stack)")
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise StackError(f"nvidia-smi did not answer ({error}): check the NVIDIA driver") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not re.fullmatch(r"\d+(\.\d+)*", lines[0].strip()):
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise StackError(f"nvidia-smi gave no driver version ({reason[0] if reason else f'exit {done.returncode}'}): "
                         "check that the NVIDIA driver is loaded (nvidia-smi should list the GPU)")
    return lines[0].strip()


def choose_stack(driver: str) -> CudaStack:
    """The newest stack the driver runs; StackError naming the driver, the stack and the fix otherwise."""
    for stack in STACKS:
        if driver_key(driver) >= stack.min_driver:
            return stack
    oldest = STACKS[-1]
    pins = oldest.pins()
    packages = ", ".join(f"{name} {pins[name]}" for name in ("torch", "onnxruntime-gpu", "tensorrt") if name in pins)
    raise StackError(f"NVIDIA driver {driver} is older than {version_text(oldest.min_driver)}, the oldest "
                   f"that runs the CUDA {oldest.cuda} stack ({packages}): update the driver to "
                   f"{version_text(STACKS[0].min_driver)} or newer (CUDA {STACKS[0].cuda} stack), or at least "
                   f"{version_text(oldest.min_driver)}")


def triton_driver_note(driver: str) -> str | None:
    """Why NVIDIA's Triton container may not start on this driver, or None."""
    key = driver_key(driver)
    if key >= TRITON_MIN_DRIVER or any(key[:1] == branch[:1] and key >= branch
                                       for branch in TRITON_DATACENTER_DRIVERS):
        return None
    return (f"the Triton {TRITON_CONTAINER} container needs driver {version_text(TRITON_MIN_DRIVER)}+ (data-center "
            f"GPUs: {', '.join(version_text(b) + '+' for b in TRITON_DATACENTER_DRIVERS)}); driver "
            f"{driver} may not start it: update the driver to serve with it")


def tensorrt_python_problem(python_version: tuple[int, int]) -> str | None:
    """Why the pinned TensorRT has no wheel for this Python, or None."""
    tensorrt = requirement_pins(ROOT / SHARED_GPU_REQUIREMENTS)["tensorrt"]
    low, high = TENSORRT_PYTHONS[tensorrt]
    if low <= python_version <= high:
        return None
    return (f"Python {version_text(python_version)} has no TensorRT {tensorrt} wheel (bindings exist for Python "
            f"{version_text(low)}-{version_text(high)}): make venv GPU=1 PYTHON=python{version_text(high)}")


def python_version_of(python: str) -> tuple[int, int]:
    done = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"{python} does not run ({done.stderr.strip()[:200]}): pass PYTHON=<a python3.10-3.12>")
    major, minor = done.stdout.split()
    return int(major), int(minor)


def install_problems(python: str, venv: Path) -> list[str]:
    """What stops the GPU venv from being installed with `python` into `venv`: one line each."""
    problem = tensorrt_python_problem(python_version_of(python))
    problems = [problem] if problem else []
    if not (venv / "bin" / "python").exists():
        if subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True).returncode != 0:
            problems.append(f"{python} cannot make a venv (no ensurepip): apt-get install python3-venv "
                            "(or your distribution's venv package)")
        existing = next(p for p in (venv, *venv.resolve().parents) if p.exists())
        free_gib = shutil.disk_usage(existing).free / 2**30
        if free_gib < VENV_FREE_GIB:
            problems.append(f"{free_gib:.1f} GiB free under {existing}, the GPU venv needs about {VENV_FREE_GIB} GiB: "
                            "free some space or pass VENV=<a folder on a larger disk>")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python the venv is (or was) made with")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the venv to install into")
    args = parser.parse_args(argv)
    problems = []
    try:
        driver = read_driver_version()
        stack = choose_stack(driver)
    except StackError as error:
        problems.append(str(error))
    try:
        problems += install_problems(args.python, args.venv)
    except StackError as error:
        problems.append(str(error))
    if problems:
        for problem in problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    print(f"{PROG}: NVIDIA driver {driver}: CUDA {stack.cuda} stack ({stack.requirements})",
          file=sys.stderr)
    if note := triton_driver_note(driver):
        print(f"{PROG}: note: {note}", file=sys.stderr)
    print(stack.requirements)
    return 0


if __name__ == "__main__":
    sys.exit(main())
