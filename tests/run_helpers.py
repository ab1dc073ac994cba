"""Launching training as a real subprocess, and killing it the way a crash would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def training_command(settings: dict, nproc: int = 1) -> list[str]:
    """`python -m training --set k=v ...`, under torchrun with `nproc` > 1 (gloo on CPU)."""
    launcher = [sys.executable, "-m", "training"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "training"]
    return launcher + [f"--set={key}={value}" for key, value in settings.items()]


def kill_after_first_checkpoint(command: list[str], checkpoint: Path, timeout_s: float = 300) -> None:
    """Start `command`, SIGKILL its whole process group (launcher and workers) the moment the first
    checkpoint lands: nothing gets to clean up, as after a crash or an OOM kill."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                               start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not checkpoint.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, f"no checkpoint within {timeout_s:.0f} s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
