"""The local tritonserver's process tree: what each process is, and its resident memory over time.

`MemoryWatch` samples the memory from a process of its own (`python -m polarprune.serving.server_memory
PID SECONDS`). Inside a soak's process the 64 client threads keep the GIL busy, and every file read of a
/proc scan waits for it again: one scan took up to 1.5 s on a 2-core machine, and in a CI run a whole
6-second interval got no memory sample. The watcher stamps each sample with the system-wide monotonic
clock and writes it as one JSON line; the soak reads them when it stops the watcher.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from polarprune.common.energy import process_tree, rss_bytes

MB = 1024 * 1024


def process_label(pid: int) -> str:
    """'tritonserver', or '<model> v<version> stub' for a python-backend stub (from its model.py path)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid} (gone)"
    if len(argv) > 1 and argv[1].endswith(b"model.py"):
        model_py = Path(argv[1].decode(errors="replace"))
        return f"{model_py.parent.parent.name} v{model_py.parent.name} stub"
    return Path(argv[0].decode(errors="replace")).name or f"pid {pid}"


def memory_by_process(server_pid: int) -> dict[str, float]:
    """Resident MB of tritonserver and of each live python-backend stub (dead ones hold none), each process
    counted once under its own label, by label."""
    parts: dict[str, float] = {}
    for pid in process_tree(server_pid):
        mb = rss_bytes(pid) / MB
        if mb > 0:
            label = process_label(pid)
            parts[label] = parts.get(label, 0.0) + mb
    return dict(sorted(parts.items()))


class MemoryWatch:
    """A watcher process sampling `server_pid`'s tree every `every_s` seconds until `stop()`."""

    def __init__(self, server_pid: int, every_s: float):
        self._out = tempfile.NamedTemporaryFile(prefix="polarprune_memory_", suffix=".jsonl", delete=False)
        self._err = tempfile.TemporaryFile()
        # where `polarprune` was imported from (a checkout's root or site-packages), whatever the cwd
        importable = str(Path(sys.modules["polarprune"].__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (importable, os.environ.get("PYTHONPATH", "")) if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "polarprune.serving.server_memory", str(server_pid), repr(float(every_s))],
            stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL, env=env)

    def stop(self, since: float) -> list[dict]:
        """The samples, oldest first, as {"t": seconds after the monotonic time `since`, "by_process", "total_mb"};
        the watcher takes one last sample as it stops. Samples from before `since` are left out."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._out.close()
        # 0: stopped by SIGTERM or the server's end; -SIGTERM: stopped before its handler was set; -SIGKILL: stuck
        if self._process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
            self._err.seek(0)
            tail = self._err.read().decode(errors="replace").strip().splitlines()[-3:]
            warnings.warn(f"the memory watcher exited with code {self._process.returncode}: "
                          f"{' / '.join(tail) or 'no message'}", RuntimeWarning, stacklevel=2)
        self._err.close()
        path = Path(self._out.name)
        try:
            lines = path.read_text().splitlines()
        finally:
            path.unlink(missing_ok=True)
        samples = []
        for line in lines:
            try:
                sample = json.loads(line)
            except ValueError:  # a line cut short by the kill of a stuck watcher
                continue
            if sample["monotonic"] >= since:
                samples.append({"t": sample["monotonic"] - since, "by_process": sample["by_process"],
                                "total_mb": sum(sample["by_process"].values())})
        return samples


class _Stop(Exception):
    pass


def _stop(_signum, _frame) -> None:
    raise _Stop


def main(argv: list[str]) -> int:
    """The watcher: one JSON line per sample on stdout until SIGTERM (then one last sample), the server's
    exit or its parent's."""
    server_pid, every_s = int(argv[0]), float(argv[1])
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _stop)

    def sample() -> None:
        line = json.dumps({"monotonic": time.monotonic(), "by_process": memory_by_process(server_pid)})
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        while Path(f"/proc/{server_pid}").exists() and os.getppid() == parent:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a line is written whole
            sample()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a SIGTERM that came meanwhile: _Stop
            time.sleep(every_s)
    except _Stop:
        if Path(f"/proc/{server_pid}").exists():
            sample()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
