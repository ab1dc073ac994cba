"""Run the Triton server bundled in the nvidia-pytriton wheel directly, or attach to a running one.

`LocalTriton` (a context manager) starts `tritonserver` on loopback ports with only the python backend,
loads the named models (explicit model control), waits for readiness, and on exit stops it with
SIGTERM (SIGKILL after a timeout), leaving no process and no /dev/shm region behind. A model that fails
to load is reported with Triton's own reason. `RemoteTriton` checks an existing server (e.g. NVIDIA's
container on a GPU machine) instead. Both expose the same `Endpoints`.

`reload_model` (and `LocalTriton.reload`) picks up a version exported while the server runs: Triton loads
the new version next to the old one, switches unversioned requests to it once it is ready, and unloads
the old one after its in-flight requests finish; a version that fails to load leaves the old one serving.

pytriton is located with importlib's finder only: importing it would pull in far more than we need.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")


class ServerError(RuntimeError):
    """The server could not be found, started, reached or made ready."""


class TritonNotFound(ServerError):
    """The pytriton wheel (and so the tritonserver binary) is not installed."""


class PortRace(ServerError):
    """An auto-picked port was taken by someone else between picking and binding it."""


@dataclass(frozen=True)
class Endpoints:
    """Where a ready server answers (host:port, no scheme, as tritonclient wants)."""

    http_url: str
    grpc_url: str

    def url(self, protocol: str) -> str:
        return self.http_url if protocol == "http" else self.grpc_url


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


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(taken: set[int] = frozenset()) -> int:
    """A port the OS calls free now; `taken` avoids handing the same one out twice."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port


def _http_json(url: str, method: str = "GET", timeout: float = 2.0):
    """(status, parsed body or None); status 0 when nothing answers. Error bodies are parsed too
    (Triton puts its reason in {"error": ...})."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
            return response.status, (json.loads(body) if body else None)
    except urllib.error.HTTPError as failed:
        try:
            return failed.code, json.loads(failed.read() or b"null")
        except ValueError:
            return failed.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
        return 0, None


def _index_entries(http_url: str) -> list[dict]:
    status, index = _http_json(f"http://{http_url}/v2/repository/index", method="POST")
    if status != 200:
        detail = "nothing answers" if status == 0 else f"HTTP {status}"
        raise ServerError(f"repository index unavailable at {http_url} ({detail})")
    return index or []


def ready_versions(http_url: str, model: str) -> list[str]:
    """Versions of `model` the server has READY, ascending."""
    return sorted((e["version"] for e in _index_entries(http_url)
                   if e["name"] == model and e.get("state") == "READY" and str(e.get("version")).isdigit()),
                  key=int)


@dataclass(frozen=True)
class ReloadResult:
    model: str
    versions_before: tuple[str, ...]    # READY before the load call
    versions_after: tuple[str, ...]     # READY once the new version serves and the old ones are gone
    served_version: str                 # what an unversioned request now gets (the highest READY)
    seconds: float


def reload_model(http_url: str, model: str, version: str | None = None,
                 timeout_s: float = 120.0) -> ReloadResult:
    """Ask the server (explicit model control) to re-read `model` from its repository and wait until the
    new version serves: `version` when given, else the highest one the server has READY afterwards.

    Triton's load call returns once the new version is ready; the old one is unloaded after its
    in-flight requests finish, so we also wait for it to leave the READY list (bounded by `timeout_s`).
    The default version policy (latest 1) is what makes the old version go; other policies keep it and
    we then only wait for the new one. ServerError carries Triton's reason when the load fails (the
    previously loaded version then keeps serving).
    """
    start = time.monotonic()
    before = tuple(ready_versions(http_url, model))
    status, body = _http_json(f"http://{http_url}/v2/repository/models/{model}/load", method="POST",
                              timeout=timeout_s)
    if status != 200:
        reason = body.get("error") if isinstance(body, dict) else None
        reason = reason or (f"no answer within {timeout_s:.0f} s" if status == 0 else "no reason given")
        still = f"; still serving version(s) {list(before)}" if before else ""
        raise ServerError(f"reload of {model!r} failed (HTTP {status}): {reason.strip()}{still}")
    _, config = _http_json(f"http://{http_url}/v2/models/{model}/config")
    policy = (config or {}).get("version_policy") or {"latest": {"num_versions": 1}}  # Triton's default
    keep = int(policy["latest"].get("num_versions", 1)) if "latest" in policy else None
    deadline = start + timeout_s
    while True:
        after = ready_versions(http_url, model)
        target = str(version) if version is not None else (after[-1] if after else None)
        served = bool(after) and after[-1] == target
        if (served and (keep is None or len(after) <= keep)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not served:
        raise ServerError(f"{model!r} version {target} not serving {timeout_s:.0f} s after the reload "
                          f"(READY: {after})")
    return ReloadResult(model, before, tuple(after), after[-1], time.monotonic() - start)


def _model_problems(http_url: str, models: tuple[str, ...]) -> dict[str, str]:
    """Triton's reason for every requested model that is not READY (empty when all are)."""
    status, index = _http_json(f"http://{http_url}/v2/repository/index", method="POST")
    if status != 200:
        return {m: f"repository index unavailable (HTTP {status})" for m in models}
    state = {}
    for entry in index or []:
        if entry.get("state") == "READY" or entry["name"] not in state:
            state[entry["name"]] = entry
    problems = {}
    for model in models:
        entry = state.get(model)
        if entry is None:
            problems[model] = "not in the server's model repository"
        elif entry.get("state") != "READY":
            problems[model] = f"{entry.get('state', 'UNKNOWN')}: {entry.get('reason', '').strip()}"
        else:
            continue
        if entry is None or not entry.get("reason", "").strip():
            # The index keeps no reason for a config that does not parse or a model without versions;
            # one explicit load attempt returns it (a server in another control mode refuses: keep ours).
            status, body = _http_json(f"http://{http_url}/v2/repository/models/{model}/load", method="POST",
                                      timeout=30.0)
            if status not in (0, 200) and isinstance(body, dict) and body.get("error"):
                problems[model] = f"{problems[model].rstrip(': ')}: {body['error'].strip()}"
    return problems


def config_problem(config_path: Path) -> str | None:
    """Why Triton could not use this config.pbtxt (protobuf's line:column message), or None."""
    from export.triton_repo import ConfigError, parse_config  # torch-free: the exporter's own check
    try:
        parse_config(config_path.read_text(errors="replace"))
    except ConfigError as error:
        return f"{config_path}: not a valid model config ({error.detail})"
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
            raise ServerError(f"model(s) {missing} not found in {repository} (run make export first)")
        unreadable = {m: why for m in cfg.models if (why := config_problem(repository / m / "config.pbtxt"))}
        if unreadable:  # Triton itself would only say "failed to poll from model repository"
            detail = "\n".join(f"  {m}: {why}" for m, why in unreadable.items())
            raise ServerError(f"model config(s) that Triton cannot parse:\n{detail}")
        install = find_triton_install()
        for port in (cfg.http_port, cfg.grpc_port):
            if port and not port_is_free(port):
                raise ServerError(f"port {port} on 127.0.0.1 is already in use; pick another or pass 0")
        http_port = cfg.http_port or free_port()
        grpc_port = cfg.grpc_port or free_port({http_port})

        self._workdir = Path(tempfile.mkdtemp(prefix="polarprune-triton-"))
        backends = self._assemble_backend_dir(install)
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

    def _assemble_backend_dir(self, install: TritonInstall) -> Path:
        """A backend directory holding python/ with the backend library, utils and our Python's stub."""
        python_dir = self._workdir / "backends" / "python"
        python_dir.mkdir(parents=True)
        for source in [*install.python_backend.iterdir(), install.python_stub]:
            if source.is_file():
                (python_dir / source.name).symlink_to(source)
        return python_dir.parent

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

    def log_excerpt(self, lines: int = 30) -> str:
        """Error lines of the server log (the CUDA/NVML/DCGM noise of a CPU machine filtered out)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        noise = ("CudaDriverHelper", "NVML", "DCGM", "cuda", "CUDA")
        errors = [l for l in text if (l.startswith("E") or l.startswith("error"))
                  and not any(n in l for n in noise)]
        return "\n".join((errors or text)[-lines:])

    def _wait_ready(self) -> None:
        base = f"http://{self.endpoints.http_url}"
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was "
                                  f"ready:\n{self.log_excerpt()}")
            if _http_json(f"{base}/v2/health/ready")[0] == 200:
                return
            if _http_json(f"{base}/v2/health/live")[0] == 200:
                # Live means startup loading has finished (endpoints open after it): anything not ready
                # failed to load.
                problems = _model_problems(self.endpoints.http_url, self.config.models)
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
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=self.config.shutdown_timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._reap_group(process.pid)
        for region in leftover_shm_regions(self.shm_prefix):
            region.unlink(missing_ok=True)  # only after every process using it is gone
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


def leftover_shm_regions(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


class RemoteTriton:
    """An already running server: checks it is reachable and the models are ready; stops nothing."""

    def __init__(self, http_url: str, grpc_url: str | None, models: tuple[str, ...],
                 timeout_s: float = 30.0):
        http_url = http_url.split("://", 1)[-1].rstrip("/")
        if grpc_url is None:  # Triton's default layout: gRPC on the HTTP port + 1
            host, _, port = http_url.rpartition(":")
            if not port.isdigit():
                raise ServerError(f"--url must be host:port, got {http_url!r}")
            grpc_url = f"{host}:{int(port) + 1}"
        self.endpoints = Endpoints(http_url, grpc_url.split("://", 1)[-1].rstrip("/"))
        self.models = models
        self.timeout_s = timeout_s

    def __enter__(self) -> Endpoints:
        base = f"http://{self.endpoints.http_url}"
        deadline = time.monotonic() + self.timeout_s
        while _http_json(f"{base}/v2/health/live")[0] != 200:
            if time.monotonic() > deadline:
                raise ServerError(f"no Triton server answers at {self.endpoints.http_url}")
            time.sleep(0.2)
        not_ready = [m for m in self.models if _http_json(f"{base}/v2/models/{m}/ready")[0] != 200]
        if not_ready:
            problems = _model_problems(self.endpoints.http_url, tuple(not_ready))
            detail = "\n".join(f"  {m}: {problems.get(m, 'not ready')}" for m in not_ready)
            raise ServerError(f"model(s) not ready on {self.endpoints.http_url}:\n{detail}")
        return self.endpoints

    def __exit__(self, *exc) -> None:
        pass
