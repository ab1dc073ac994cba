"""Launching training as a real subprocess, killing it the way a crash would, and what a fresh interpreter
loads for a stage."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from polarprune.common.energy import process_tree

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


# What only training needs: export, which reads what training wrote, loads none of these.
TRAINING_ONLY = ("polarprune.training.config", "polarprune.training.methods", "polarprune.training.api",
                 "polarprune.training.loop")


def modules_loaded_by(*modules: str) -> set[str]:
    """Every module name in sys.modules of a fresh interpreter (run from the checkout) after importing
    `modules`: what a stage pulls in, e.g. that serving loads no torch."""
    code = f"import sys; import {', '.join(modules)}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def training_command(settings: dict, nproc: int = 1) -> list[str]:
    """`python -m training --set k=v ...`, under torchrun with `nproc` > 1 (gloo on CPU). Tests name their
    device: "auto" would train on a GPU (and switch torchrun to NCCL) wherever one exists."""
    if "device" not in settings:
        raise ValueError("training_command: give settings a 'device' (cpu; a GPU test asks for cuda itself)")
    launcher = [sys.executable, "-m", "training"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "training"]
    return launcher + [f"--set={key}={value}" for key, value in settings.items()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # zombie: dead
    except (OSError, IndexError):
        return True


def kill_after_first_checkpoint(command: list[str], checkpoint: Path, timeout_s: float = 300) -> None:
    """Start `command`, SIGKILL it and every process under it (torchrun's workers run in sessions of
    their own, so a process-group kill would miss them) the moment the first checkpoint lands: nothing
    gets to clean up or write on, as after a crash or an OOM kill."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + timeout_s
    try:
        while not checkpoint.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, f"no checkpoint within {timeout_s:.0f} s"
            time.sleep(0.05)
    finally:
        doomed = process_tree(process.pid)  # listed before the kill: orphans no longer hang below it
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in doomed):
            assert time.monotonic() < deadline, "killed processes still running after 30 s"
            time.sleep(0.05)


def require_triton() -> None:
    """Skip the calling test, saying why, where the bundled Triton server is not installed."""
    import pytest

    from polarprune.serving.errors import TritonNotFound
    from polarprune.serving.triton_install import find_triton_install
    try:
        find_triton_install()
    except TritonNotFound as missing:
        pytest.skip(f"bundled tritonserver unavailable: {missing}")
