"""Run the Triton server bundled in the nvidia-pytriton wheel directly, or attach to a running one.

`LocalTriton` (a context manager) starts `tritonserver` on loopback ports with only the python backend,
loads the named models (explicit model control), waits for readiness, and on exit stops it with
SIGTERM (SIGKILL after a timeout), leaving no process and no /dev/shm region behind. A model that fails
to load is reported with Triton's own reason. `RemoteTriton` checks an existing server (e.g. NVIDIA's
container on a GPU machine) instead. Both expose the same `Endpoints`. Their parts: serving/
triton_install.py (where the binary is), ports.py, admin.py (health and repository calls), reload.py
(new versions while serving), shm.py (shared-memory cleanup).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from polarprune.serving.admin import TritonAdmin, model_problems
from polarprune.serving.errors import PortRace, ServerError, ServerInputError
from polarprune.serving.ports import free_port, port_is_free
from polarprune.serving.reload import ReloadResult, reload_model
from polarprune.serving.shm import remove_shm_regions
from polarprune.serving.triton_install import assemble_backend_dir, find_triton_install


@dataclass(frozen=True)
class Endpoints:
    """Where a ready server answers (host:port, no scheme, as tritonclient wants)."""

    http_url: str
    grpc_url: str

    def url(self, protocol: str) -> str:
        return self.http_url if protocol == "http" else self.grpc_url


def config_problem(config_path: Path) -> str | None:
    """Why Triton could not use this config.pbtxt (protobuf's line:column message), or None."""
    from polarprune.common.model_repository import ModelConfigError, RepositoryError, parse_config  # torch-free: export's own check
    try:
        config = parse_config(config_path.read_text(errors="replace"), config_path.parent.name)
    except ModelConfigError as error:
        return f"{config_path}: not a valid model config ({error.detail})"
    except RepositoryError as error:  # parses, but is no usable config (empty, another model's, no output)
        return f"{config_path}: not a valid model config ({error})"
    if config.backend == "python":  # our model.py runs <version>/model.onnx: a damaged one fails the load
        return onnx_problem(config_path.parent)
    return None


def onnx_problem(model_dir: Path) -> str | None:
    """Why the newest version's model.onnx cannot be a model (missing, not ONNX protobuf), or None. Only the
    protobuf is parsed here (fast); whether onnxruntime can run it is Triton's load to find out."""
    from onnx import ModelProto  # protobuf only; serving imports no torch
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if model_dir.is_dir() else []
    if not versions:
        return None  # Triton names a model without versions itself
    path = model_dir / str(versions[-1]) / "model.onnx"
    if not path.is_file():
        return None  # model.py names a missing file itself (test_malformed_inputs)
    data = path.read_bytes()
    model = ModelProto()
    try:
        model.ParseFromString(data)
        usable = bool(data) and len(model.graph.input) > 0 and len(model.graph.output) > 0
    except Exception:  # protobuf's DecodeError
        usable = False
    if not usable:
        return f"{path}: not an ONNX model ({len(data)} bytes that do not parse as one); export the model again"
    return None


def _set_parent_death_signal() -> None:
    """Runs in the child before exec: if our process dies without cleanup, the server gets SIGTERM."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class LocalTritonConfig:
    repository: Path
    models: tuple[str, ...]           # loaded explicitly; other folders in the repository are ignored
    http_port: int = 0                # 0 = pick a free port
    grpc_port: int = 0
    startup_timeout_s: float = 90.0
    shutdown_timeout_s: float = 20.0
    log_verbose: int = 0


class LocalTriton:
    """Start/stop the bundled tritonserver; use as `with LocalTriton(cfg) as endpoints: ...`."""

    def __init__(self, config: LocalTritonConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self.endpoints: Endpoints | None = None
        self.shm_prefix = f"polarprune_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._workdir: Path | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Endpoints:
        """Start and wait until every model is ready; a port race on auto-picked ports is retried."""
        for attempt in range(3):
            try:
                return self._start_once()
            except PortRace:
                if attempt == 2 or self.config.http_port or self.config.grpc_port:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> Endpoints:
        cfg = self.config
        repository = Path(cfg.repository).resolve()
        missing = [m for m in cfg.models if not (repository / m / "config.pbtxt").is_file()]
        if missing:
            raise ServerInputError(f"model(s) {missing} not found in {repository} (run make export first)")
        unreadable = {m: why for m in cfg.models if (why := config_problem(repository / m / "config.pbtxt"))}
        if unreadable:  # Triton itself would only say "failed to poll from model repository"
            detail = "; ".join(why for why in unreadable.values())  # each names its file: one line
            raise ServerInputError(f"model(s) Triton could not load: {detail}")
        install = find_triton_install()
        for port in (cfg.http_port, cfg.grpc_port):
            if port and not port_is_free(port):
                raise ServerInputError(f"port {port} on 127.0.0.1 is already in use; pick another or pass 0")
        http_port = cfg.http_port or free_port()
        grpc_port = cfg.grpc_port or free_port({http_port})

        self._workdir = Path(tempfile.mkdtemp(prefix="polarprune-triton-"))
        backends = assemble_backend_dir(install, self._workdir)
        command = [
            str(install.binary), f"--model-repository={repository}", f"--backend-directory={backends}",
            "--model-control-mode=explicit", *[f"--load-model={m}" for m in cfg.models],
            "--http-address=127.0.0.1", f"--http-port={http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
            "--allow-metrics=false",           # statistics come from the inference API; one port fewer
            "--exit-on-error=false",           # stay up so the repository index can say why a load failed
            "--strict-readiness=true", "--exit-timeout-secs=5", f"--log-verbose={cfg.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        env = dict(os.environ)
        # The python backend stub runs whatever `python` it finds first: it must be ours (numpy, ORT).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(install.libs), sysconfig.get_config_var("LIBDIR") or "", env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_set_parent_death_signal)
        finally:
            log.close()
        self.endpoints = Endpoints(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
        try:
            self._wait_ready()
        except BaseException as failed:
            excerpt = self.log_excerpt()  # read before stop() removes the log
            self.stop()
            if isinstance(failed, ServerError) and "already in use" in excerpt.lower():
                raise PortRace(f"a port was taken while tritonserver started:\n{excerpt}") from None
            raise
        return self.endpoints

    @property
    def pid(self) -> int | None:
        """The tritonserver process (its python-backend stubs are its children)."""
        return self.process.pid if self.process is not None else None

    def reload(self, model: str, version: str | None = None, timeout_s: float = 120.0) -> ReloadResult:
        """Pick up a version written into the repository while serving; see `reload_model`."""
        if self.endpoints is None or self.process is None:
            raise ServerError("the server is not running")
        return reload_model(self.endpoints.http_url, model, version, timeout_s)

    @property
    def log_path(self) -> Path:
        return self._workdir / "tritonserver.log"

    def log_excerpt(self, lines: int = 30, errors_only: bool = True) -> str:
        """Error lines of the server log (the CUDA/NVML/DCGM noise of a CPU machine filtered out); with
        `errors_only=False` its last lines whatever they are (how a crash ended: a signal, an abort)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        noise = ("CudaDriverHelper", "NVML", "DCGM", "cuda", "CUDA")
        kept = [l for l in text if not any(n in l for n in noise)]
        errors = [l for l in kept if l.startswith("E") or l.startswith("error")] if errors_only else []
        return "\n".join((errors or kept)[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        with TritonAdmin(self.endpoints.http_url) as admin:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was "
                                      f"ready:\n{self.log_excerpt()}")
                if admin.is_ready():
                    return
                if admin.is_live():
                    # Live means startup loading has finished (endpoints open after it): anything not ready
                    # failed to load.
                    problems = model_problems(admin, self.config.models)
                    if problems:
                        detail = "\n".join(f"  {m}: {why}" for m, why in problems.items())
                        raise ServerError(f"model(s) failed to load in tritonserver:\n{detail}")
                time.sleep(0.1)
        raise ServerError(f"tritonserver not ready after {self.config.startup_timeout_s:.0f} s:\n"
                          f"{self.log_excerpt()}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after the timeout; then sweep our process group and shm regions."""
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is not None:  # the server died on its own: its stubs are orphans now
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.config.shutdown_timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._reap_group(process.pid)
        remove_shm_regions(self.shm_prefix)  # only now that every process using them is gone
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _reap_group(self, group: int) -> None:
        """Backend stubs share the server's (new) process group: wait for them, SIGKILL stragglers."""
        for escalation in (None, signal.SIGKILL):
            if escalation is not None:
                try:
                    os.killpg(group, escalation)
                except ProcessLookupError:
                    return
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)
        warnings.warn(f"processes of group {group} still listed after SIGKILL (unreaped zombies?)")


class RemoteTriton:
    """An already running server: checks it is reachable and the models are ready; stops nothing."""

    def __init__(self, http_url: str, grpc_url: str | None, models: tuple[str, ...],
                 timeout_s: float = 30.0):
        http_url = http_url.split("://", 1)[-1].rstrip("/")
        if grpc_url is None:  # Triton's default layout: gRPC on the HTTP port + 1
            host, _, port = http_url.rpartition(":")
            if not port.isdigit():
                raise ServerInputError(f"--url must be host:port, got {http_url!r}")
            grpc_url = f"{host}:{int(port) + 1}"
        self.endpoints = Endpoints(http_url, grpc_url.split("://", 1)[-1].rstrip("/"))
        self.models = models
        self.timeout_s = timeout_s

    def __enter__(self) -> Endpoints:
        deadline = time.monotonic() + self.timeout_s
        with TritonAdmin(self.endpoints.http_url) as admin:
            while not admin.is_live():
                if time.monotonic() > deadline:
                    raise ServerError(f"no Triton server answers at {self.endpoints.http_url}")
                time.sleep(0.2)
            not_ready = [m for m in self.models if not admin.is_model_ready(m)]
            if not_ready:
                problems = model_problems(admin, tuple(not_ready))
                detail = "\n".join(f"  {m}: {problems.get(m, 'not ready')}" for m in not_ready)
                raise ServerError(f"model(s) not ready on {self.endpoints.http_url}:\n{detail}")
        return self.endpoints

    def __exit__(self, *exc) -> None:
        pass
