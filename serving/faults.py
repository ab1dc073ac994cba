"""Faults injected under load, each measured as a user would see it.

    python -m serving faults --run runs/<name> [--dense-run runs/<name>_dense] [--repository DIR]
                             [--export-kills 10] [--seed 0] [--report-dir reports/<name>]

- **stub kill**: SIGKILL of one model's python-backend stub while both models are under the soak's load;
  counts each model's failed requests and the time until the killed model serves again (the soak's
  supervisor reloads it: Triton 2.51 does not restart a dead stub).
- **server kill**: SIGKILL of tritonserver under a running `python -m serving soak`, once attached with
  --url and once with the server it started itself: its exit code, how long it took, its stderr, and
  whether any process it started is left.
- **export kill**: `python -m export` SIGKILLed at random points (half of them anywhere in its run, half
  while it writes the new version into the repository) while a server serves that repository; after each
  kill the server reloads both models, and every version it has READY is checked to be complete; then an
  export must complete and be served.

The server and the exports work on copies (a temporary repository and run folders): the run's own files
and `--repository` are only read. Test suites call the same functions on tiny models.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from polarprune.common.energy import process_tree
from polarprune.serving.admin import TritonAdmin
from polarprune.serving.client import TritonClassifier
from polarprune.serving.errors import ServingStageError
from polarprune.serving.server import LocalTriton, LocalTritonConfig
from polarprune.serving.server_memory import process_label
from polarprune.serving.soak import ServerGone, SoakSettings, soak, summarize

ROOT = Path(__file__).resolve().parents[1]


class FaultSetupError(ServingStageError):
    """A fault experiment could not be set up (e.g. the export it kills does not run at all): exit 1."""
STAGING_PREFIX = ".polarprune-tmp-"


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits for its parent to read its status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stub_pid(server_pid: int, model: str) -> int | None:
    for pid in process_tree(server_pid)[1:]:
        if process_label(pid).startswith(f"{model} v") and _alive(pid):
            return pid
    return None


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_WAIT_POLICY": "PASSIVE"}


# ---- stub kill -----------------------------------------------------------------------------------------
def kill_stub_under_load(server: LocalTriton, models: dict[str, str], images: np.ndarray, *, role: str = "dense",
                         seconds: float = 24.0, kill_after_s: float = 8.0, clients: int = 16,
                         log=print) -> dict:
    """SIGKILL `role`'s stub `kill_after_s` into a soak of `seconds`; what each model's clients saw."""
    endpoints = server.endpoints
    settings = SoakSettings(seconds=seconds, clients=clients, interval_s=seconds / 4, memory_every_s=1.0)
    killed: dict = {}

    def kill() -> None:
        pid = _stub_pid(server.pid, models[role])
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, at=time.monotonic())

    timer = threading.Timer(kill_after_s, kill)
    timer.start()
    try:
        raw = soak({"http": endpoints.http_url, "grpc": endpoints.grpc_url}, models, images, settings,
                   server.pid, server.process, log=log)
    except ServerGone as gone:  # the server's own last words say more than its exit status
        raise ServerGone(f"{gone}\ntritonserver log:\n{server.log_excerpt(errors_only=False)}") from None
    finally:
        timer.cancel()
    summary = summarize(raw, "stub kill", "the bundled tritonserver")
    events = [e for e in raw["events"] if e["role"] == role]
    other = next(r for r in models if r != role)
    recovered = raw["started_monotonic"] + events[0]["reloaded_s"] if events else None
    in_flight_bound = sum(1 for plan in settings.client_plan() if plan[0] == role)
    last = summary["intervals"][-1]["roles"]
    return {"killed_model": models[role], "other_model": models[other], "killed_pid": killed.get("pid"),
            "clients": clients, "clients_of_killed_model": in_flight_bound, "seconds": raw["seconds"],
            "kill_after_s": kill_after_s,
            "failed_killed_model": summary["totals"][role]["failures"],
            "failed_other_model": summary["totals"][other]["failures"],
            "requests_killed_model": summary["totals"][role]["requests"],
            "requests_other_model": summary["totals"][other]["requests"],
            "failures_by_reason": summary["failures_by_reason"],
            "recovery_s": (recovered - killed["at"]) if recovered and killed else None,
            "reloads": len(events),
            "served_after": {"killed_model": last[role]["requests"], "other_model": last[other]["requests"]},
            "only_in_flight_failed": summary["totals"][role]["failures"] <= in_flight_bound}


# ---- server kill ---------------------------------------------------------------------------------------
class _Lines:
    """A child's stdout, read in a thread (never blocks the caller)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout_s: float, process: subprocess.Popen) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(line.startswith(prefix) for line in self.lines):
                return True
            if process.poll() is not None:
                return False
            time.sleep(0.05)
        return False


def kill_server_under_soak(run_dir: Path, repository: Path, models: tuple[str, ...], *, attach: bool,
                           load_s: float = 4.0, limit_s: float = 10.0, report_dir: Path | None = None) -> dict:
    """SIGKILL tritonserver under `python -m serving soak` (attached with --url when `attach`, else the
    server the tool started) once its clients have run `load_s`; how the tool ended."""
    scratch = None if report_dir else Path(tempfile.mkdtemp(prefix="polarprune-faults-"))
    report_dir = report_dir or scratch
    command = [sys.executable, "-m", "polarprune.serving", "soak", "--run", str(run_dir), "--minutes", "5", "--interval", "30",
               "--clients", "16", "--report-dir", str(report_dir)]
    own = None
    if attach:
        own = LocalTriton(LocalTritonConfig(repository, models))
        endpoints = own.start()
        command += ["--url", endpoints.http_url, "--grpc-url", endpoints.grpc_url]
    else:
        command += ["--repository", str(repository)]
    tool = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    stdout = _Lines(tool.stdout)
    try:
        if not stdout.wait_for("soak: ", 120.0, tool):
            raise FaultSetupError(f"the soak did not start: {stdout.lines[-5:]} "
                                  f"{tool.stderr.read() if tool.poll() is not None else ''}")
        time.sleep(load_s)
        if attach:
            server_pid, started = own.pid, []
        else:
            server_pid = next(pid for pid in process_tree(tool.pid) if process_label(pid) == "tritonserver")
            started = [pid for pid in process_tree(tool.pid) if pid != tool.pid]
        stubs = [pid for pid in process_tree(server_pid)[1:]]
        os.kill(server_pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = tool.wait(timeout=limit_s + 20)
        except subprocess.TimeoutExpired:
            tool.kill()
            code = None
        seconds = time.monotonic() - killed
        stderr = tool.stderr.read()
        time.sleep(0.2)
        left = [pid for pid in started if _alive(pid)]
        stubs_outlived_server = [pid for pid in stubs if _alive(pid)]
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
        if own is not None:
            own.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {"mode": "attached (--url)" if attach else "server started by the tool", "exit_code": code,
            "seconds_to_exit": seconds, "stderr_lines": len(lines), "message": lines[0] if lines else "",
            "traceback": "Traceback" in stderr, "processes_left": len(left),
            "stubs_outlived_the_server": len(stubs_outlived_server),
            "ok": code == 1 and seconds <= limit_s and len(lines) == 1 and not left and "Traceback" not in stderr}


# ---- export kill ---------------------------------------------------------------------------------------
def version_problems(version_dir: Path) -> list[str]:
    """Why a version folder is not a complete cpu-target version (model.py + a loadable model.onnx)."""
    import onnxruntime as ort
    problems = [f"{version_dir.name}/{name} missing" for name in ("model.onnx", "model.py")
                if not (version_dir / name).is_file()]
    if not problems:
        try:
            ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        except Exception as error:  # truncated or garbage: onnxruntime's own reason
            problems.append(f"{version_dir.name}/model.onnx does not load ({type(error).__name__})")
    return problems


def _check_served(http_url: str, repository: Path, models: tuple[str, ...]) -> dict:
    """Reload every model, then: which versions are READY, any READY one incomplete, and a request each."""
    result = {"reload_failures": [], "partial_loads": [], "ready": {}, "request_failures": []}
    with TritonAdmin(http_url, timeout_s=60.0) as admin:
        for model in models:
            try:
                admin.load(model)
            except Exception as error:
                result["reload_failures"].append(f"{model}: {error}")
            ready = admin.ready_versions(model)
            result["ready"][model] = ready
            for version in ready:
                problems = version_problems(repository / model / version)
                if problems:
                    result["partial_loads"].append(f"{model} v{version}: {'; '.join(problems)}")
            try:
                with TritonClassifier(http_url, model, timeout_s=30.0) as client:  # whatever version serves
                    client.logits(np.zeros((2, *client.spec.input_dims), client.spec.dtype))
            except Exception as error:
                result["request_failures"].append(f"{model}: {error}")
    return result


def _staging(repository: Path, models: tuple[str, ...]) -> set[str]:
    """Staging folders in the models' folders (a killed export's stay until the next write sweeps them)."""
    found = set()
    for model in models:
        try:
            found |= {f"{model}/{e.name}" for e in os.scandir(repository / model) if e.name.startswith(STAGING_PREFIX)}
        except FileNotFoundError:
            pass
    return found


def _watch_for_staging(repository: Path, models: tuple[str, ...], process: subprocess.Popen,
                       timeout_s: float) -> bool:
    """Wait until the export starts a new version folder (a staging folder that was not there before)."""
    before = _staging(repository, models)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if _staging(repository, models) - before:
            return True
        time.sleep(0.002)
    return False


def kill_exports(export_args: list[str], repository: Path, models: tuple[str, ...], *,
                 kills: int = 10, seed: int = 0, while_writing_only: bool = False, log=print) -> dict:
    """`python -m export <export_args> --repository <repository>` under a live server of `models`: one
    complete export (its duration sets the random kill points), `kills` SIGKILLs, then one that must
    complete. Every other kill lands at a random point of the run, the others while the repository is being
    written (`while_writing_only`: all of them, and no export is spent on measuring the duration). An
    export that finishes before its kill point does not count as a kill; another one is started (at most
    3 x `kills` attempts), with the kill points drawn from the latest complete export's duration."""
    rng = random.Random(seed)
    command = [sys.executable, "-m", "polarprune.export", *export_args, "--repository", str(repository)]

    def export(kill_at=None, during_write=False) -> dict:
        began = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        point = None
        if during_write:
            if _watch_for_staging(repository, models, process, timeout_s=600):
                time.sleep(rng.uniform(0.0, 0.03))
                point = "while writing the repository"
        elif kill_at is not None:
            try:
                process.wait(timeout=kill_at)
            except subprocess.TimeoutExpired:
                point = f"{kill_at:.2f} s into the export"
        if point is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        else:
            point = None  # it finished before the kill could land
        _, err = process.communicate(timeout=600)
        return {"seconds": time.monotonic() - began, "code": process.returncode, "killed_at": point,
                "stderr": err.decode(errors="replace").strip().splitlines()[-1:] if err else []}

    server = LocalTriton(LocalTritonConfig(repository, models))
    server.start()
    attempts, partial, reload_failures, request_failures = [], 0, 0, 0
    try:
        duration = None
        if not while_writing_only:
            first = export()
            if first["code"] != 0:
                raise FaultSetupError(f"the export to measure failed: {' '.join(first['stderr'])}")
            duration = first["seconds"]
            log(f"export kill: a complete export takes {duration:.1f} s; {kills} kills follow")
        landed, index = 0, 0
        while landed < kills and index < 3 * kills:  # an export that ends before its kill point is tried again
            during_write = while_writing_only or landed % 2 == 1
            index += 1
            attempt = export(kill_at=None if during_write else rng.uniform(0.05, 0.95) * duration,
                             during_write=during_write)
            if attempt["killed_at"]:
                landed += 1
            elif attempt["code"] == 0:
                duration = attempt["seconds"]  # exports get faster or slower with the machine's load
            leftovers = sorted(_staging(repository, models))
            served = _check_served(server.endpoints.http_url, repository, models)
            partial += len(served["partial_loads"])
            reload_failures += len(served["reload_failures"])
            request_failures += len(served["request_failures"])
            attempts.append({**attempt, "staging_left": leftovers, **served})
            log(f"export kill {landed}/{kills} (attempt {index}): {attempt['killed_at'] or 'finished before the kill'}; "
                f"READY {served['ready']}, partial loads {len(served['partial_loads'])}")
        final = export()
        served = _check_served(server.endpoints.http_url, repository, models)
    finally:
        server.stop()
    landed = [a for a in attempts if a["killed_at"]]
    return {"kills_requested": kills, "kills": len(landed), "kills_while_writing": sum(a["killed_at"] == "while writing the repository"
                                                            for a in landed),
            "finished_before_the_kill": len(attempts) - len(landed), "export_seconds": duration,
            "partial_loads": partial, "reload_failures": reload_failures, "request_failures": request_failures,
            "next_export_code": final["code"], "next_export_served": served["ready"],
            "next_export_partial_loads": len(served["partial_loads"]), "attempts": attempts,
            "ok": len(landed) == kills and partial == 0 and final["code"] == 0 and not served["partial_loads"] and reload_failures == 0
                  and not served["request_failures"] and not served["reload_failures"]}


def copy_models(repository: Path, models: tuple[str, ...], into: Path) -> Path:
    """A private copy of `models` (with their manifests) from `repository`."""
    for model in models:
        shutil.copytree(repository / model, into / model, symlinks=False)
    return into
