"""The GPU path, step by step: one PASS/FAIL/SKIP line each, every result in one JSON file.

Run through scripts/gpu_check.sh, which makes the GPU venv first. Steps: gpu (CUDA, onnxruntime-gpu and
TensorRT usable), train (short CUDA run), export (target gpu, TensorRT engines), tensorrt_vs_onnxruntime
(engines and onnxruntime-CUDA against onnxruntime-CPU on real test images, bounds from
common/tolerance.py), triton (the GPU repository served by a tritonserver binary on PATH or by the Triton
container image when either is present; SKIP otherwise), latency (dense vs pruned, interleaved, on
onnxruntime-CUDA and TensorRT at batch 1 and 64). A step whose inputs are missing is skipped with the
reason. The latency step reports speed-ups; it does not judge them (tests/test_latency_regression.py does).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
RUN_NAME = "gpu_check"
TRAIN = {"device": "cuda", "epochs": 2, "train_subset": 8192, "test_subset": 2000, "progress": "false"}
LATENCY_BATCHES = (1, 64)


class Skip(Exception):
    """The step cannot run here; the message says why."""


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
        except Exception as error:  # one broken step must not hide the others' results
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
            data = {"traceback": traceback.format_exc()}
        self.steps[name] = {"status": status, "seconds": round(time.monotonic() - started, 1),
                            "detail": detail, **data}
        print(f"{status} {name}: {detail}", flush=True)

    # ---- steps ---------------------------------------------------------------------------------
    def gpu(self):
        import onnxruntime as ort
        import torch

        from export import tensorrt_build

        problems = []
        if not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} sees no CUDA device (a CPU build of torch?)")
        providers = ort.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            problems.append(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({', '.join(providers)})")
        reason = tensorrt_build.unavailable_reason()
        if reason:
            problems.append(reason)
        if problems:
            raise RuntimeError("; ".join(problems))
        facts = tensorrt_build.build_facts()
        data = {**facts, "torch": torch.__version__, "onnxruntime": ort.__version__, "providers": providers}
        return (f"{facts['gpu']} (compute capability {facts['compute_capability']}), TensorRT "
                f"{facts['tensorrt_version']}, onnxruntime {ort.__version__}", data)

    def train(self):
        command = [sys.executable, "-m", "training", "--config", "configs/fmnist_resnet20.yaml",
                   *[f"--set={k}={v}" for k, v in {**TRAIN, "out_dir": self.work / "runs", "name": RUN_NAME}.items()]]
        run(command, 300, self.work / "train.log")
        metrics = json.loads((self.run_dir / "metrics.json").read_text())
        if not str(metrics.get("device", "")).startswith("cuda"):
            raise RuntimeError(f"the run trained on {metrics.get('device')!r}, not CUDA")
        data = {k: metrics.get(k) for k in ("device", "test_accuracy", "flops_ratio", "train_seconds")}
        return (f"{TRAIN['epochs']} epochs on {metrics['device']}: test accuracy {metrics['test_accuracy']:.3f}, "
                f"kept FLOPs {metrics['flops_ratio']:.3f}", data)

    def export(self):
        command = [sys.executable, "-m", "export", "--run", str(self.run_dir), "--target", "gpu", "--engine",
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

        from common.tolerance import allowed_difference, tolerance

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

    def triton(self, pull: bool):
        from common.model_repository import TRITON_RELEASE

        names = self.steps["export"]["triton"]["model_names"]
        models = [names["dense"], names["pruned"]]
        http, grpc, metrics = free_ports(3)
        binary = shutil.which("tritonserver")
        docker = shutil.which("docker")
        image_present = docker and subprocess.run([docker, "image", "inspect", TRITON_RELEASE.image],
                                                  capture_output=True).returncode == 0
        if docker and not image_present and pull:
            subprocess.run([docker, "pull", TRITON_RELEASE.image], check=True)
            image_present = True
        server_args = ["--model-control-mode=explicit", *[f"--load-model={m}" for m in models],
                       "--exit-on-error=false", "--strict-readiness=true"]
        if binary:
            how = f"tritonserver binary {binary}"
            command = [binary, f"--model-repository={self.repository}", f"--http-port={http}",
                       f"--grpc-port={grpc}", f"--metrics-port={metrics}", *server_args]
            stop = None
        elif image_present:
            how = f"container {TRITON_RELEASE.image}"
            container = f"polarprune-gpu-check-{os.getpid()}"
            command = [docker, "run", "--rm", "--name", container, "--gpus=all", "-p", f"{http}:8000",
                       "-p", f"{grpc}:8001", "-p", f"{metrics}:8002",
                       "-v", f"{self.repository.resolve()}:/models:ro", TRITON_RELEASE.image,
                       "tritonserver", "--model-repository=/models", *server_args]
            stop = [docker, "stop", container]
        else:
            raise Skip(f"no tritonserver binary on PATH and no local image {TRITON_RELEASE.image} "
                       f"(docker pull {TRITON_RELEASE.image}, or pass --pull, to include this step)")
        log = open(self.work / "tritonserver.log", "w")
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            # The onnxruntime backend builds each model's TensorRT engine while loading: allow minutes.
            run([sys.executable, "-m", "serving", "--repository", str(self.repository), "--run", str(self.run_dir),
                 "--url", f"localhost:{http}", "--grpc-url", f"localhost:{grpc}", "--quick", "--no-perf-analyzer",
                 "--startup-timeout", "240", "--report-dir", str(self.work / "serving")], 420,
                self.work / "serving.log")
        finally:
            if stop:
                subprocess.run(stop, capture_output=True)
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
        summary = json.loads((self.work / "serving" / "serving.json").read_text())
        return f"{how} served both models; correctness and load test passed", \
            {"server": how, "correctness": summary.get("correctness")}

    def latency(self):
        from bench.engines import engine_runner, open_engines
        from bench.timing import measure_pair, ort_runner, ort_session, session_settings

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

    from common.atomicio import write_json

    work = args.work or Path(tempfile.mkdtemp(prefix="polarprune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    check = GpuCheck(work)
    check.step("gpu", check.gpu)
    check.step("train", check.train, needs=("gpu",))
    check.step("export", check.export, needs=("train",))
    check.step("tensorrt_vs_onnxruntime", check.outputs, needs=("export",))
    check.step("triton", lambda: check.triton(args.pull), needs=("export",))
    check.step("latency", check.latency, needs=("export",))
    seconds = time.monotonic() - started
    failed = [name for name, step in check.steps.items() if step["status"] == "FAIL"]
    result = {"command": "scripts/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": check.steps, "check_seconds": round(seconds, 1), "setup_seconds": args.setup_seconds,
              "budget_seconds": BUDGET_S, "within_budget": seconds <= BUDGET_S, "work": str(work),
              "passed": not failed}
    write_json(args.out, result)
    print(f"{'PASS' if seconds <= BUDGET_S else 'FAIL'} time: checks took {seconds:.0f} s (budget {BUDGET_S} s; "
          f"venv and data setup {args.setup_seconds:.0f} s before that)")
    print(f"results: {args.out}")
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed or seconds > BUDGET_S else 0


if __name__ == "__main__":
    sys.exit(main())
