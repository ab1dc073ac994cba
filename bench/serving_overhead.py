"""Where a served request's time goes: direct onnxruntime, Triton's own accounting, the client's round trip.

    python -m bench.serving_overhead --run runs/<name> [--quick] [--requests N] [--repeats N]
                                     [--instances N] [--threads N] [--max-queue-delay-us N]
                                     [--out docs/results/serving_overhead.json]

The run's served ONNX files (export_report.json's Triton versions) are written into a temporary model
repository with the Triton options export writes by default (`TritonModelOptions`; `--instances`,
`--threads` and `--max-queue-delay-us` try others) and served by the bundled Triton (serving.server).
At batch 1 and 16, dense and pruned interleaved in this one process (bench.timing), each repeat measures:
  client       round trips over HTTP and gRPC, each with and without system shared memory;
  server       Triton's statistics per request: whole time in the server, queue, compute;
  onnxruntime  the same ONNX files in this process, with the server's thread count and no spinning,
               each run right before one of the server-timed requests (same machine load).
Then peak throughput over a concurrency sweep (gRPC, repeated; per-point medians). The server's per-request times come from reading
Triton's statistics around single requests, so medians can be quoted for it too. Server overhead = the
server's median time per batch-1 request (queue + compute, request in to response out) - onnxruntime's
median. Speed-ups are dense / pruned medians. Absolute times on a shared machine move with its load: read the ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from polarprune.bench.timing import cpu_name, interleaved, ort_session, session_settings, summarize
from polarprune.common.atomicio import write_json
from polarprune.export.triton_repo import TritonModelOptions, write_model_versions
from polarprune.serving.client import TritonClassifier
from polarprune.serving.errors import ServerError
from polarprune.serving.probes import ProbeSettings, probe_throughput, server_delta
from polarprune.serving.run_artifacts import RunArtifactsMissing, load_run
from polarprune.serving.server import LocalTriton, LocalTritonConfig

ROLES = ("dense", "pruned")
BATCHES = (1, 16)
MODES = {"http": ("http", False), "http_shm": ("http", True), "grpc": ("grpc", False), "grpc_shm": ("grpc", True)}
# requests and server_samples are per model, mode and repeat at batch 1; larger batches get proportionally
# fewer (at least a quarter) so that every batch size takes about the same time.
FULL = {"requests": 300, "server_samples": 100, "warmup": 20, "repeats": 3, "point_seconds": 1.5,
        "concurrencies": (1, 4, 16), "throughput_batches": (16, 64)}
QUICK = {"requests": 30, "server_samples": 10, "warmup": 5, "repeats": 1, "point_seconds": 0.5,
         "concurrencies": (1, 4), "throughput_batches": (16,)}
GOALS = {"server_overhead_ms_b1": 0.15, "client_over_ort_speedup_b1": 0.8, "throughput_over_flops": 0.9}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TritonModelOptions()
    parser = argparse.ArgumentParser(prog="python -m bench.serving_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="exported run (export_report.json, test_samples.npz)")
    parser.add_argument("--quick", action="store_true", help="a few requests only (smoke runs, not results)")
    parser.add_argument("--requests", type=int, help="interleaved requests per model, mode, batch and repeat")
    parser.add_argument("--repeats", type=int, help="passes over all modes (spreads machine drift over them)")
    parser.add_argument("--instances", type=int, default=defaults.instance_count, help="Triton instances per model")
    parser.add_argument("--threads", type=int, default=defaults.intra_op_threads,
                        help="onnxruntime intra-op threads per instance (0 = onnxruntime decides)")
    parser.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us)
    parser.add_argument("--out", type=Path, default=Path("docs/results/serving_overhead.json"))
    args = parser.parse_args(argv)
    if min(args.instances, args.threads + 1, args.max_queue_delay_us + 1) < 1:
        parser.error("--instances >= 1, --threads >= 0, --max-queue-delay-us >= 0")
    return args


def served_onnx(run_dir: Path) -> dict[str, Path]:
    """The model.onnx of each served version export recorded for the run."""
    import json

    versions = json.loads((run_dir / "export_report.json").read_text())["triton"]["versions"]
    paths = {role: Path(versions[role]) / "model.onnx" for role in ROLES}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RunArtifactsMissing(f"served ONNX not found: {', '.join(missing)} (re-run the export)")
    return paths


SERVER_KEYS = ("server_total_us", "server_queue_us", "server_compute_us", "server_compute_infer_us")


def one_request_in_server(client: TritonClassifier, batch: np.ndarray, before: dict) -> tuple[dict, dict]:
    """Triton's statistics for exactly one request: (its times in us, the reading after it). Triton may
    count a request a moment after its response left, so the reading is repeated until it shows up."""
    client.infer_once(batch)
    for _ in range(50):
        after = client.statistics()
        if after["success_count"] > before["success_count"]:
            break
    delta = server_delta(before, after)
    return ({key: delta[key] for key in SERVER_KEYS} if delta["requests"] == 1 else None), after


def client_block(clients: dict, ort_runners: dict, batch: np.ndarray, settings: dict) -> tuple[dict, dict, dict]:
    """One interleaved dense/pruned block: (client seconds, server times in us, onnxruntime seconds), per
    request. The client is timed in a pass of back-to-back requests. A second pass alternates a direct
    onnxruntime run with one served request whose server time is read from Triton's statistics, so that
    both are medians over the same minutes of machine load."""
    runners = {role: (lambda c=client: c.infer_once(batch)) for role, client in clients.items()}
    interleaved(runners, settings["warmup"], warmup=0)
    seconds = interleaved(runners, settings["requests"], warmup=0)
    server, ort_seconds = {role: [] for role in clients}, {role: [] for role in clients}
    readings = {role: client.statistics() for role, client in clients.items()}
    for index in range(settings["server_samples"]):
        for role in (ROLES if index % 2 == 0 else ROLES[::-1]):
            ort_seconds[role] += interleaved({role: ort_runners[role]}, 1, warmup=0)[role]
            sample, readings[role] = one_request_in_server(clients[role], batch, readings[role])
            if sample is not None:
                server[role].append(sample)
    return seconds, server, ort_seconds


def server_summary(samples: list[dict]) -> dict:
    """Median (and mean) per-request server times in ms."""
    out = {"requests": len(samples)}
    for key in SERVER_KEYS:
        values = np.asarray([s[key] for s in samples]) / 1e3
        out[key.replace("_us", "_ms")] = float(np.median(values))
        out[key.replace("_us", "_mean_ms")] = float(values.mean())
    return out


def measure_batch(endpoints, models: dict, sessions: dict, images: np.ndarray, batch_size: int,
                  settings: dict) -> dict:
    """All paths at one batch size, `repeats` passes, every pass over onnxruntime and every client mode."""
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:])))
    scale = min(batch_size, 4)
    settings = {**settings, **{k: max(settings[k] // scale, 5) for k in ("requests", "server_samples", "warmup")}}
    ort_runners = {role: (lambda s=session: s.run(None, {s.get_inputs()[0].name: batch}))
                   for role, session in sessions.items()}
    ort_times = {role: [] for role in ROLES}
    client_times = {mode: {role: [] for role in ROLES} for mode in MODES}
    server_samples = {mode: {role: [] for role in ROLES} for mode in MODES}
    clients = {mode: {role: TritonClassifier(endpoints.url(protocol), models[role], protocol, shared_memory=shm)
                      for role in ROLES} for mode, (protocol, shm) in MODES.items()}
    try:
        interleaved(ort_runners, rounds=0, warmup=settings["warmup"])
        for _ in range(settings["repeats"]):
            for mode in MODES:
                seconds, server, ort_seconds = client_block(clients[mode], ort_runners, batch, settings)
                for role in ROLES:
                    client_times[mode][role] += seconds[role]
                    server_samples[mode][role] += server[role]
                    ort_times[role] += ort_seconds[role]
    finally:
        for pair in clients.values():
            for client in pair.values():
                client.close()
    result = {"onnxruntime": {role: summarize(ort_times[role]) for role in ROLES}, "client": {}, "server": {}}
    for mode in MODES:
        result["client"][mode] = {role: summarize(client_times[mode][role]) for role in ROLES}
        result["server"][mode] = {role: server_summary(server_samples[mode][role]) for role in ROLES}
    result["server"]["all_modes"] = {role: server_summary([x for mode in MODES for x in server_samples[mode][role]])
                                     for role in ROLES}
    ort, server = result["onnxruntime"], result["server"]["all_modes"]
    result["speedup"] = {
        "onnxruntime": ort["dense"]["median_ms"] / ort["pruned"]["median_ms"],
        "server": server["dense"]["server_total_ms"] / server["pruned"]["server_total_ms"],
        "server_compute_infer": server["dense"]["server_compute_infer_ms"] / server["pruned"]["server_compute_infer_ms"],
        "client_p50": {mode: c["dense"]["median_ms"] / c["pruned"]["median_ms"] for mode, c in result["client"].items()}}
    # Medians on both sides: a shared machine's spikes move means far more than the typical request.
    result["server_overhead_ms"] = {role: server[role]["server_total_ms"] - ort[role]["median_ms"] for role in ROLES}
    result["server_compute_overhead_ms"] = {role: server[role]["server_compute_ms"] - ort[role]["median_ms"]
                                            for role in ROLES}
    result["fastest_client_mode"] = min(MODES, key=lambda m: sum(result["client"][m][r]["median_ms"] for r in ROLES))
    return result


def peak_throughput(endpoints, models: dict, images: np.ndarray, settings: dict) -> dict:
    """Inferences/s over batch x concurrency (gRPC), the sweep repeated: each point's median over the
    repeats, then each model's best point. One stalled 2-second window then cannot make a peak."""
    probe = ProbeSettings(protocols=("grpc",), batch_sizes=settings["throughput_batches"],
                          concurrencies=settings["concurrencies"], point_seconds=settings["point_seconds"])
    by_point: dict[tuple, list[dict]] = {}
    for _ in range(settings["repeats"]):
        for record in probe_throughput(endpoints, models, images, "grpc", probe):
            by_point.setdefault((record["role"], record["batch_size"], record["concurrency"]), []).append(record)
    points = [{"role": role, "batch_size": batch, "concurrency": concurrency,
               "infer_per_s": float(np.median([r["infer_per_s"] for r in records])),
               "infer_per_s_each": [r["infer_per_s"] for r in records],
               "failures": sum(r["failures"] for r in records),
               "avg_execution_batch": float(np.median([r["avg_execution_batch"] for r in records]))}
              for (role, batch, concurrency), records in by_point.items()]
    peak = {role: max((p for p in points if p["role"] == role), key=lambda p: p["infer_per_s"]) for role in ROLES}
    rate = {(p["role"], p["batch_size"], p["concurrency"]): p["infer_per_s"] for p in points}
    per_point = [rate[("pruned", b, c)] / rate[("dense", b, c)] for (role, b, c) in rate if role == "dense"]
    return {"protocol": "grpc", "repeats": settings["repeats"], "points": points,
            "median_point_speedup": float(np.median(per_point)),  # pruned / dense at the same load point
            "peak": {role: {k: peak[role][k] for k in ("batch_size", "concurrency", "infer_per_s")} for role in ROLES},
            "speedup": peak["pruned"]["infer_per_s"] / peak["dense"]["infer_per_s"]}


def row(label: str, dense: float, pruned: float, extra: str = "") -> str:
    return f"  {label:<34} {dense:>9.3f} {pruned:>9.3f} {dense / pruned:>8.2f}x {extra}"


def print_batch(batch: int, r: dict) -> None:
    print(f"batch {batch}: {'':<27} {'dense ms':>9} {'pruned':>9} {'speed-up':>9}")
    ort = r["onnxruntime"]
    print(row("onnxruntime direct (median)", ort["dense"]["median_ms"], ort["pruned"]["median_ms"],
              f"mean {ort['dense']['mean_ms']:.3f} / {ort['pruned']['mean_ms']:.3f}"))
    s = r["server"]["all_modes"]
    print(row("server: whole request (median)", s["dense"]["server_total_ms"], s["pruned"]["server_total_ms"],
              f"overhead {r['server_overhead_ms']['dense']:.3f} / {r['server_overhead_ms']['pruned']:.3f} ms"))
    print(row("server: compute (median)", s["dense"]["server_compute_ms"], s["pruned"]["server_compute_ms"],
              f"queue {s['dense']['server_queue_ms']:.3f} / {s['pruned']['server_queue_ms']:.3f} ms"))
    for mode, c in r["client"].items():
        print(row(f"client {mode} p50 (p99)", c["dense"]["median_ms"], c["pruned"]["median_ms"],
                  f"p99 {c['dense']['p99_ms']:.3f} / {c['pruned']['p99_ms']:.3f}"))


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("requests", "repeats"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    options = dataclasses.replace(TritonModelOptions(), instance_count=args.instances,
                                  intra_op_threads=args.threads, max_queue_delay_us=args.max_queue_delay_us)
    try:
        run = load_run(args.run)
        onnx = served_onnx(args.run)
    except (RunArtifactsMissing, ValueError, KeyError) as problem:
        print(f"error: {args.run}: {problem}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    threads = options.intra_op_threads or os.cpu_count() or 1  # what onnxruntime picks for 0 here
    sessions = {role: ort_session(onnx[role], threads) for role in ROLES}
    with tempfile.TemporaryDirectory(prefix="serving_overhead_") as repository:
        write_model_versions(repository, [(run.model_names[role], onnx[role], options) for role in ROLES])
        try:
            with LocalTriton(LocalTritonConfig(Path(repository), tuple(run.model_names.values()))) as endpoints:
                by_batch = {}
                for batch in BATCHES:
                    print(f"measuring batch {batch} ...", flush=True)
                    by_batch[batch] = measure_batch(endpoints, run.model_names, sessions, run.images, batch, settings)
                    print_batch(batch, by_batch[batch])
                print("peak throughput (gRPC) ...", flush=True)
                throughput = peak_throughput(endpoints, run.model_names, run.images, settings)
        except ServerError as problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    b1 = by_batch[1]
    flops_speedup = 1.0 / run.flops_ratio
    headline_mode = b1["fastest_client_mode"]
    ort_b1, client_b1 = b1["speedup"]["onnxruntime"], b1["speedup"]["client_p50"][headline_mode]
    overhead_b1 = float(np.mean(list(b1["server_overhead_ms"].values())))
    report = {
        "command": "python -m bench.serving_overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "load": {"loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                 "note": "machine shared with other agents; ratios from interleaved runs, absolute times drift"},
        "run": run.name, "mode": "quick" if args.quick else "full", "settings": settings,
        "triton_options": dataclasses.asdict(options), "onnxruntime_session": session_settings(sessions["dense"]),
        "flops_ratio": run.flops_ratio, "flops_speedup": flops_speedup,
        "ort_speedup_b1": ort_b1, "server_speedup_b1": b1["speedup"]["server"],
        "client_speedup_b1": client_b1, "client_mode_b1": headline_mode,
        "server_overhead_ms_b1": overhead_b1,
        "client_speedup_over_ort_b1": client_b1 / ort_b1,
        "peak_throughput_speedup": throughput["speedup"],
        "peak_throughput_over_flops": throughput["speedup"] / flops_speedup,
        "goals": {"server_overhead_ms_b1 <= 0.15": overhead_b1 <= GOALS["server_overhead_ms_b1"],
                  "client_speedup_b1 >= 0.8 x ort_speedup_b1": client_b1 >= GOALS["client_over_ort_speedup_b1"] * ort_b1,
                  "peak_throughput_speedup >= 0.9 x flops_speedup":
                      throughput["speedup"] >= GOALS["throughput_over_flops"] * flops_speedup},
        "by_batch": {str(b): r for b, r in by_batch.items()}, "throughput": throughput,
    }
    print(f"peak throughput: dense {throughput['peak']['dense']['infer_per_s']:.0f}/s, pruned "
          f"{throughput['peak']['pruned']['infer_per_s']:.0f}/s, speed-up {throughput['speedup']:.2f}x "
          f"(FLOPs {flops_speedup:.2f}x; median over load points {throughput['median_point_speedup']:.2f}x)")
    print(f"batch 1: onnxruntime {ort_b1:.2f}x, server {b1['speedup']['server']:.2f}x, client ({headline_mode}) "
          f"{client_b1:.2f}x = {client_b1 / ort_b1:.2f} of onnxruntime's; server overhead {overhead_b1:.3f} ms")
    for goal, met in report["goals"].items():
        print(f"  goal {goal}: {'met' if met else 'NOT met'}")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
