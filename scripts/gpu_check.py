"""The GPU path, step by step: one PASS/FAIL/SKIP line each, every result in one JSON file.

Run through scripts/gpu_check.sh, which makes the GPU venv first (the CUDA stack the driver runs:
scripts/gpu_stack.py). Steps: preconditions (Python against TensorRT's wheels, polygraphy, docker access, disk
space; one line per problem, naming the fix), gpu (driver, torch's CUDA, onnxruntime providers, TensorRT; one
small CUDA onnxruntime session and one TensorRT build), train (short CUDA run), export (target gpu, TensorRT
engines), tensorrt_vs_onnxruntime (engines and onnxruntime-CUDA against onnxruntime-CPU on real test images, bounds from
common/tolerance.py), triton (the GPU repository served by a tritonserver binary on PATH or by the Triton
container image when either is present; SKIP otherwise), latency (dense vs pruned, interleaved, on
onnxruntime-CUDA and TensorRT at batch 1 and 64). A step whose inputs are missing is skipped with the
reason. The latency step reports speed-ups; it does not judge them (tests/test_latency_regression.py does).
The 8-minute budget covers the steps' work: `--pull` (before the steps) and the engine warm-up while Triton
loads the models are timed apart and reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from scripts import gpu_stack

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
RUN_NAME = "gpu_check"
TRAIN = {"device": "cuda", "epochs": 2, "train_subset": 8192, "test_subset": 2000, "progress": "false"}
LATENCY_BATCHES = (1, 64)
POLYGRAPHY_MIN = (0, 53)      # older ones look for libcudart on system paths only, not in the venv
WORK_FREE_GIB = 2             # the run, two ONNX files, engines and logs
TRITON_IMAGE_FREE_GIB = 25    # estimate for pulling and unpacking the Triton container image
WARMUP_TIMEOUT_S = 600        # Triton builds each model's TensorRT engines (batch 1 and 64) while loading


class Skip(Exception):
    """The step cannot run here; the message says why."""


class Problems(Exception):
    """Several independent failures of one step, each one line naming its fix."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


def polygraphy_problem() -> str | None:
    try:
        installed = version("polygraphy")
    except PackageNotFoundError:
        return "polygraphy is not installed: make venv GPU=1 installs it"
    if tuple(int(n) for n in installed.split(".")[:2]) < POLYGRAPHY_MIN:
        return (f"polygraphy {installed} finds libcudart only on system paths, not in the venv: "
                f"pip install 'polygraphy>={'.'.join(map(str, POLYGRAPHY_MIN))}' (make venv GPU=1 does)")
    return None


def docker_state(docker: str | None) -> tuple[str | None, str | None]:
    """(docker's data root when this user can use docker, why not); (None, None) when docker is absent."""
    if docker is None:
        return None, None
    try:
        done = subprocess.run([docker, "info", "--format", "{{.DockerRootDir}}"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"docker info did not answer ({error}): check the docker daemon (systemctl status docker)"
    if done.returncode == 0 and done.stdout.strip():
        return done.stdout.strip(), None
    said = (done.stderr or done.stdout).strip().splitlines()
    said = said[-1] if said else f"exit {done.returncode}"
    if "permission denied" in said.lower():
        return None, (f"docker: permission denied on the docker socket ({said}): add yourself to the docker group "
                      "(sudo usermod -aG docker $USER, then log in again) or run the check as root")
    return None, f"docker info failed ({said}): start the docker daemon (sudo systemctl start docker)"


def free_gib(path: str | Path) -> float:
    return shutil.disk_usage(path).free / 2**30


def cuda_build_problem(torch_version: str, torch_cuda: str | None, driver: str,
                       stack: gpu_stack.CudaStack) -> str | None:
    """Why this torch cannot use the GPU on this driver (the build, not the hardware), or None."""
    if torch_cuda is None:
        return f"torch {torch_version} is a CPU build: make venv GPU=1 installs the CUDA one ({stack.requirements})"
    if int(torch_cuda.split(".")[0]) > int(stack.cuda.split(".")[0]):
        return (f"torch {torch_version} is a CUDA {torch_cuda} build, but NVIDIA driver {driver} runs the CUDA "
                f"{stack.cuda} stack at most: make venv GPU=1 (installs {stack.requirements}), or update the driver "
                f"to {gpu_stack.version_text(gpu_stack.STACKS[0].min_driver)} or newer")
    return None


def run(command: list[str], timeout_s: float, log: Path) -> None:
    """Run a stage CLI; its output goes to `log`, and a failure quotes the log's tail."""
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[1:4])} ... exited {done.returncode} (log {log}):\n{tail}")


class GpuCheck:
    def __init__(self, work: Path):
        self.work = work
        self.run_dir = work / "runs" / RUN_NAME
        self.repository = work / "model_repository"
        self.steps: dict[str, dict] = {}
        self.docker = shutil.which("docker")
        self.docker_root, self.docker_problem = docker_state(self.docker)
        self.seconds_apart = {"docker_pull": 0.0, "engine_warmup": 0.0}   # timed, but not against the budget

    def step(self, name: str, action, needs: tuple[str, ...] = ()) -> None:
        started = time.monotonic()
        missing = [n for n in needs if self.steps.get(n, {}).get("status") != "PASS"]
        try:
            if missing:
                raise Skip(f"needs step(s) {', '.join(missing)}")
            detail, data = action()
            status = "PASS"
        except Skip as reason:
            status, detail, data = "SKIP", str(reason), {}
        except Problems as found:
            status, detail, data = "FAIL", str(found), {"problems": found.lines}
        except Exception as error:  # one broken step must not hide the others' results
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
            data = {"traceback": traceback.format_exc()}
        self.steps[name] = {"status": status, "seconds": round(time.monotonic() - started, 1),
                            "detail": detail, **data}
        for line in data.get("problems", [detail]):
            print(f"{status} {name}: {line}", flush=True)

    # ---- steps ---------------------------------------------------------------------------------
    def preconditions(self, pull: bool):
        from polarprune.common.model_repository import TRITON_RELEASE

        python = sys.version_info[:2]
        problems = [p for p in (gpu_stack.tensorrt_python_problem(python), polygraphy_problem(), self.docker_problem)
                    if p]
        space = {str(self.work): free_gib(self.work)}
        if space[str(self.work)] < WORK_FREE_GIB:
            problems.append(f"{space[str(self.work)]:.1f} GiB free under {self.work}, the check needs about "
                            f"{WORK_FREE_GIB} GiB: free some space or pass --work <folder on a larger disk>")
        if pull and self.docker_root and not self.image_present():
            space[self.docker_root] = free_gib(self.docker_root)
            if space[self.docker_root] < TRITON_IMAGE_FREE_GIB:
                problems.append(f"{space[self.docker_root]:.1f} GiB free under docker's {self.docker_root}, pulling "
                                f"{TRITON_RELEASE.image} needs about {TRITON_IMAGE_FREE_GIB} GiB: free some space "
                                "(docker system prune) or leave out --pull")
        if problems:
            raise Problems(problems)
        docker = ("docker usable" if self.docker_root else "no docker (the triton step needs a tritonserver binary "
                  "on PATH)")
        return (f"Python {python[0]}.{python[1]}, polygraphy {version('polygraphy')}, {docker}, "
                + ", ".join(f"{gib:.0f} GiB free under {path}" for path, gib in space.items()),
                {"python": f"{python[0]}.{python[1]}", "polygraphy": version("polygraphy"),
                 "docker_root": self.docker_root, "free_gib": space})

    def image_present(self) -> bool:
        from polarprune.common.model_repository import TRITON_RELEASE

        return bool(self.docker_root) and subprocess.run(
            [self.docker, "image", "inspect", TRITON_RELEASE.image], capture_output=True).returncode == 0

    def pull_image(self) -> None:
        """`--pull`: fetch the Triton image before the budgeted steps; its time is reported apart."""
        from polarprune.common.model_repository import TRITON_RELEASE

        if not self.docker_root or self.image_present():
            return
        started = time.monotonic()
        done = subprocess.run([self.docker, "pull", TRITON_RELEASE.image], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        self.seconds_apart["docker_pull"] = round(time.monotonic() - started, 1)
        said = done.stderr.strip().splitlines()
        print(f"{'PASS' if done.returncode == 0 else 'FAIL'} pull: docker pull {TRITON_RELEASE.image} "
              + (f"took {self.seconds_apart['docker_pull']:.0f} s (not counted in the budget)" if done.returncode == 0
                 else f"failed: {said[-1] if said else done.returncode}"), flush=True)

    def gpu(self):
        import numpy as np
        import onnxruntime as ort
        import torch

        from polarprune.bench.timing import ort_session
        from polarprune.export import tensorrt_build
        from polarprune.export.onnx_export import INPUT_NAME, export_onnx

        try:
            driver = gpu_stack.read_driver_version()
            stack = gpu_stack.choose_stack(driver)
        except gpu_stack.StackError as error:
            raise Problems([str(error)]) from None
        providers = ort.get_available_providers()
        data = {"driver": driver, "stack": stack.name, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "onnxruntime": ort.__version__, "providers": providers}
        problems = []
        if problem := cuda_build_problem(torch.__version__, torch.version.cuda, driver, stack):
            problems.append(problem)
        elif not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device on driver "
                            f"{driver}: check that nvidia-smi lists the GPU and CUDA_VISIBLE_DEVICES")
        if "CUDAExecutionProvider" not in providers:
            problems.append(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({', '.join(providers)}): "
                            f"make venv GPU=1 installs onnxruntime-gpu ({stack.requirements})")
        if reason := tensorrt_build.unavailable_reason():
            problems.append(reason)
        if problems:
            raise Problems(problems)
        # One small CUDA onnxruntime session and one TensorRT build: a missing CUDA, cuDNN or TensorRT library
        # shows here, not halfway through the run.
        probe = self.work / "gpu_probe"
        probe.mkdir(exist_ok=True)
        tiny = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
        export_onnx(tiny, probe / "tiny.onnx", (1, 8, 8))
        images = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
        ort_session(probe / "tiny.onnx", 1, "cuda").run(None, {INPUT_NAME: images})  # refuses a CPU fallback
        data.update(tensorrt_build.build_facts())
        plan = tensorrt_build.plan_build(data["tensorrt_version"], want_fp16=False, fp16_converter_installed=False)
        data["tensorrt_probe"] = tensorrt_build.build_and_check(
            probe / "tiny.onnx", probe / "tiny.plan", images, tensorrt_build.batch_profile(8), plan,
            probe / "timing.cache", 1 << 28)
        return (f"driver {driver} (CUDA {stack.cuda} stack), {data['gpu']} (compute capability "
                f"{data['compute_capability']}); torch {torch.__version__} CUDA {torch.version.cuda}; onnxruntime "
                f"{ort.__version__} [{', '.join(providers)}]; TensorRT {data['tensorrt_version']}; a CUDA onnxruntime "
                "session ran and a TensorRT engine built", data)

    def train(self):
        command = [sys.executable, "-m", "polarprune.training", "--config", "configs/fmnist_resnet20.yaml",
                   *[f"--set={k}={v}" for k, v in {**TRAIN, "out_dir": self.work / "runs", "name": RUN_NAME}.items()]]
        run(command, 300, self.work / "train.log")
        metrics = json.loads((self.run_dir / "metrics.json").read_text())
        if not str(metrics.get("device", "")).startswith("cuda"):
            raise RuntimeError(f"the run trained on {metrics.get('device')!r}, not CUDA")
        data = {k: metrics.get(k) for k in ("device", "test_accuracy", "flops_ratio", "train_seconds")}
        return (f"{TRAIN['epochs']} epochs on {metrics['device']}: test accuracy {metrics['test_accuracy']:.3f}, "
                f"kept FLOPs {metrics['flops_ratio']:.3f}", data)

    def export(self):
        command = [sys.executable, "-m", "polarprune.export", "--run", str(self.run_dir), "--target", "gpu", "--engine",
                   "--repository", str(self.repository)]
        run(command, 300, self.work / "export.log")
        report = json.loads((self.run_dir / "export_report.json").read_text())
        engine = report["engine"]
        if not engine.get("built"):
            raise RuntimeError(f"no TensorRT engine built: {engine.get('reason')}")
        data = {"engine": {k: engine.get(k) for k in ("tensorrt_version", "compute_capability", "gpu", "precision",
                                                      "note", "models")},
                "flops_ratio": report["flops_ratio"], "triton": report["triton"]}
        return (f"{engine['precision']} engines by TensorRT {engine['tensorrt_version']} on compute capability "
                f"{engine['compute_capability']}; repository {self.repository} (onnxruntime + TensorRT "
                "accelerator)", data)

    def outputs(self):
        import numpy as np
        import onnxruntime as ort
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from polarprune.common.tolerance import allowed_difference, tolerance

        precision = self.steps["export"]["engine"]["precision"]
        images = np.load(self.run_dir / "test_samples.npz")["images"][:256]
        results, failures = {}, []
        for role in ("dense", "pruned"):
            onnx_path = str(self.run_dir / f"{role}.onnx")
            cpu = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            reference = cpu.run(None, {"input": images})[0]
            cuda = ort.InferenceSession(onnx_path, providers=["CUDAExecutionProvider"])
            if cuda.get_providers()[0] != "CUDAExecutionProvider":
                raise RuntimeError(f"onnxruntime fell back to {cuda.get_providers()[0]}")
            got = {"onnxruntime_cuda": (cuda.run(None, {"input": images})[0], "fp32")}
            with TrtRunner(EngineFromBytes(BytesFromPath(str(self.run_dir / f"{role}.plan")))) as engine:
                got["tensorrt"] = (np.concatenate([np.array(engine.infer({"input": images[i:i + 64]})["logits"])
                                                   for i in range(0, len(images), 64)]), precision)
            scale = float(np.abs(reference).max())
            for runtime, (logits, computed_in) in got.items():
                diff = float(np.abs(logits.astype(np.float32) - reference).max())
                bound = allowed_difference(tolerance("gpu", computed_in), scale)
                top1 = float((logits.argmax(1) == reference.argmax(1)).mean())
                results[f"{role}/{runtime}"] = {"max_abs_diff_vs_onnxruntime_cpu": diff, "bound": bound,
                                                "precision": computed_in, "top1_agreement": top1}
                if diff > bound:
                    failures.append(f"{role} {runtime} differs by {diff:.3g} > {bound:.3g}")
        if failures:
            raise RuntimeError("; ".join(failures))
        worst = max(r["max_abs_diff_vs_onnxruntime_cpu"] for r in results.values())
        return f"{len(results)} comparisons on {len(images)} test images within bounds (worst {worst:.2g})", \
            {"comparisons": results}

    def triton(self):
        from polarprune.common.model_repository import ENGINE_CACHE_DIR, TRITON_RELEASE
        from polarprune.serving.container import container_command, tritonserver_args

        names = self.steps["export"]["triton"]["model_names"]
        models = (names["dense"], names["pruned"])
        http, grpc, metrics = free_ports(3)
        binary = shutil.which("tritonserver")
        if binary:
            how = f"tritonserver binary {binary}"
            # The configs' engine cache folder, made before both models load (in parallel) and race to make it.
            Path(ENGINE_CACHE_DIR).mkdir(exist_ok=True)
            command = [binary, f"--model-repository={self.repository}", f"--http-port={http}",
                       f"--grpc-port={grpc}", f"--metrics-port={metrics}", *tritonserver_args(models)]
            stop = None
        elif self.image_present():
            how = f"container {TRITON_RELEASE.image}"
            container = f"polarprune-gpu-check-{os.getpid()}"
            engine_cache = self.work / "trt_engine_cache"   # mounted at the configs' engine cache folder
            engine_cache.mkdir(exist_ok=True)
            command = [self.docker, *container_command(self.repository, models, engine_cache, (http, grpc, metrics),
                                                       name=container)[1:]]
            stop = [self.docker, "stop", container]
        elif self.docker_problem:
            raise Skip("no tritonserver binary on PATH, and docker is not usable (see preconditions)")
        else:
            raise Skip(f"no tritonserver binary on PATH and no local image {TRITON_RELEASE.image} "
                       f"(docker pull {TRITON_RELEASE.image}, or pass --pull, to include this step)")
        log_path = self.work / "tritonserver.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.seconds_apart["engine_warmup"] = wait_until_loaded(server, f"localhost:{http}", log_path)
            run([sys.executable, "-m", "polarprune.serving", "--repository", str(self.repository), "--run", str(self.run_dir),
                 "--url", f"localhost:{http}", "--grpc-url", f"localhost:{grpc}", "--quick", "--no-perf-analyzer",
                 "--startup-timeout", "60", "--report-dir", str(self.work / "serving")], 300,
                self.work / "serving.log")
        finally:
            if stop:
                subprocess.run(stop, capture_output=True)
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        summary = json.loads((self.work / "serving" / "serving.json").read_text())
        return (f"{how} loaded both models (engine warm-up {self.seconds_apart['engine_warmup']:.0f} s, not counted "
                "in the budget) and served them; correctness and load test passed",
                {"server": how, "correctness": summary.get("correctness")})

    def latency(self):
        from polarprune.bench.engines import engine_runner, open_engines
        from polarprune.bench.timing import measure_pair, ort_runner, ort_session, session_settings

        exported = self.steps["export"]
        dense_flops, pruned_flops = 1.0, exported["flops_ratio"]  # only their ratio matters
        results = {}
        with ExitStack() as stack:
            sessions = {role: ort_session(self.run_dir / f"{role}.onnx", 1, "cuda") for role in ("dense", "pruned")}
            results["onnxruntime_cuda"] = {
                "settings": session_settings(sessions["dense"]),
                "by_batch": measure_pair(ort_runner, sessions["dense"], sessions["pruned"], LATENCY_BATCHES,
                                         dense_flops, pruned_flops, rounds=300, warmup=20, budget_s=15.0)}
            engines = open_engines({role: self.run_dir / f"{role}.plan" for role in ("dense", "pruned")}, stack)
            results["tensorrt"] = {
                "settings": {"precision": exported["engine"]["precision"], "runner": "polygraphy TrtRunner"},
                "by_batch": measure_pair(engine_runner, engines["dense"], engines["pruned"], LATENCY_BATCHES,
                                         dense_flops, pruned_flops, rounds=300, warmup=20, budget_s=15.0)}
        line = "; ".join(f"{backend} " + ", ".join(f"batch {r['batch']} {r['speedup']:.2f}x" for r in entry["by_batch"])
                         for backend, entry in results.items())
        return f"pruned speed-up (dense/pruned median, interleaved): {line}", {"latency": results}


def wait_until_loaded(server: subprocess.Popen, http_url: str, log_path: Path) -> float:
    """Seconds until the server answers: with explicit model control Triton opens its endpoints after the
    startup loads, and the onnxruntime backend builds each model's TensorRT engines while loading (warm-up)."""
    from polarprune.serving.admin import TritonAdmin

    started = time.monotonic()
    with TritonAdmin(http_url) as admin:
        while not admin.is_live():
            if server.poll() is not None or time.monotonic() - started > WARMUP_TIMEOUT_S:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                state = (f"exited {server.returncode}" if server.poll() is not None
                         else f"not up after {WARMUP_TIMEOUT_S} s")
                raise RuntimeError(f"the Triton server {state} while loading (log {log_path}):\n{tail}")
            time.sleep(0.5)
    return round(time.monotonic() - started, 1)


def budgeted_seconds(elapsed: float, seconds_apart: dict[str, float]) -> float:
    """The steps' time that counts against the budget: the elapsed time less the engine warm-up inside it
    (the docker pull runs before the clock starts)."""
    return round(elapsed - seconds_apart["engine_warmup"], 1)


def free_ports(count: int) -> list[int]:
    ports = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            if probe.getsockname()[1] not in ports:
                ports.append(probe.getsockname()[1])
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu_check" / "gpu_check.json")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run and repository (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--pull", action="store_true", help="docker pull the Triton image when it is missing")
    parser.add_argument("--setup-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from polarprune.common.atomicio import write_json

    work = args.work or Path(tempfile.mkdtemp(prefix="polarprune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = GpuCheck(work)
    check.step("preconditions", lambda: check.preconditions(args.pull))
    if args.pull:
        check.pull_image()
    started = time.monotonic()
    check.step("gpu", check.gpu)
    check.step("train", check.train, needs=("gpu",))
    check.step("export", check.export, needs=("train",))
    check.step("tensorrt_vs_onnxruntime", check.outputs, needs=("export",))
    check.step("triton", check.triton, needs=("export",))
    check.step("latency", check.latency, needs=("export",))
    seconds = budgeted_seconds(time.monotonic() - started, check.seconds_apart)
    failed = [name for name, step in check.steps.items() if step["status"] == "FAIL"]
    result = {"command": "scripts/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": check.steps, "check_seconds": seconds, "seconds_apart": check.seconds_apart,
              "setup_seconds": args.setup_seconds, "budget_seconds": BUDGET_S, "within_budget": seconds <= BUDGET_S,
              "work": str(work), "passed": not failed}
    write_json(args.out, result)
    apart = ", ".join(f"{name.replace('_', ' ')} {value:.0f} s" for name, value in check.seconds_apart.items())
    print(f"{'PASS' if seconds <= BUDGET_S else 'FAIL'} time: checks took {seconds:.0f} s (budget {BUDGET_S} s; "
          f"timed apart: {apart}; venv and data setup {args.setup_seconds:.0f} s before that)")
    print(f"results: {args.out}")
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed or seconds > BUDGET_S else 0


if __name__ == "__main__":
    sys.exit(main())
