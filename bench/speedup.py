"""Dense vs pruned inference speed of one run: onnxruntime CPU (and torch eager for reference).

    python -m bench.speedup --run runs/<name> [--quick] [--threads 2] [--rounds N] [--out PATH]
                            [--served host:port] [--no-torch]
    python -m bench.speedup --baseline-fixture [--write-baseline] [--backend cpu|cuda|tensorrt]

Batch 1 latency and batch 64 throughput (median, with min and p95), dense and pruned interleaved in this one process.
Speed-up = dense time / pruned time; efficiency = speed-up / (dense MACs / pruned MACs).
`--baseline-fixture` measures the fixed pair of the latency regression test instead of a run, and with
`--write-baseline` records it in bench/baseline.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from polarprune.bench import BenchError, fixture
from polarprune.bench.timing import (cpu_name, efficiency, measure_pair, ort_runner, ort_session,
                          session_settings, speedup, torch_runner)
from polarprune.common.atomicio import write_json
from polarprune.common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.training.mask import load_mask
from polarprune.training.networks import NetworkInfo, build_network
from polarprune.common.results import provenance

PROG = "python -m bench.speedup"
BATCHES = (1, 64)
FULL = {"rounds": 300, "warmup": 5, "budget_s": 20.0}   # per engine and batch size
QUICK = {"rounds": 20, "warmup": 1, "budget_s": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("python -m bench.speedup", __doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="run folder holding mask.json, dense.onnx and pruned.onnx")
    parser.add_argument("--quick", action="store_true", help="a few rounds only (smoke runs)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads, onnxruntime and torch (the baseline fixture pins its own)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per engine and batch size")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default reports/<run>/speedup.json)")
    parser.add_argument("--no-torch", action="store_true", help="onnxruntime only")
    parser.add_argument("--served", metavar="HOST:PORT", default=None,
                        help="also time the served pair on this running Triton (HTTP) with serving's probe")
    parser.add_argument("--baseline-fixture", action="store_true",
                        help="measure the latency regression test's fixed pair instead of a run")
    parser.add_argument("--write-baseline", action="store_true",
                        help="with --baseline-fixture: update bench/baseline.json")
    parser.add_argument("--backend", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                        help="with --baseline-fixture: onnxruntime CPU or CUDA, or TensorRT engines")
    parser.add_argument("--attempts", type=int, default=3,
                        help="with --write-baseline: measurements to take the median of")
    args = parser.parse_args(argv)
    if not args.baseline_fixture and args.run is None:
        parser.error("give --run runs/<name> (or --baseline-fixture)")
    if args.write_baseline and not args.baseline_fixture:
        parser.error("--write-baseline needs --baseline-fixture")
    return args


def load_pair(run_dir: Path) -> dict:
    """The run's ONNX paths, and its MACs and network description from mask.json."""
    document, _ = load_mask(run_dir / "mask.json")
    onnx_paths = {role: run_dir / f"{role}.onnx" for role in ("dense", "pruned")}
    missing = [str(p) for p in onnx_paths.values() if not p.is_file()]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run the export first (make export)")
    return {"onnx": onnx_paths, "flops": (float(document["dense_flops"]), float(document["pruned_flops"])),
            "network": NetworkInfo.from_dict(document["network"])}


def measure_run(run_dir: Path, pair: dict, threads: int, settings: dict, with_torch: bool) -> tuple[list, dict]:
    dense_flops, pruned_flops = pair["flops"]
    sessions = {role: ort_session(path, threads) for role, path in pair["onnx"].items()}
    results = [{"engine": "onnxruntime", **r} for r in
               measure_pair(ort_runner, sessions["dense"], sessions["pruned"], BATCHES, dense_flops, pruned_flops,
                            **settings)]
    if with_torch:
        torch.set_num_threads(threads)
        from polarprune.export.surgery import PRUNED_FILE, load_pruned  # what ships: the exported architecture

        shape = pair["network"].input_shape
        dense_model = build_network(pair["network"]).eval()
        pruned_model = load_pruned(run_dir / PRUNED_FILE)
        results += [{"engine": "torch", **r} for r in
                    measure_pair(lambda model, batch: torch_runner(model, shape, batch), dense_model, pruned_model,
                                 BATCHES, dense_flops, pruned_flops, **settings, timing_torch=True)]
    return results, session_settings(sessions["dense"])


def probe_served(run_dir: Path, url: str, quick: bool, dense_flops: float, pruned_flops: float) -> dict:
    """Batch-1 latency through a running Triton, by the serving stage's own probe."""
    try:
        from polarprune.serving.errors import ServingStageError
        from polarprune.serving.probes import ProbeSettings, probe_latency
        from polarprune.serving.run_artifacts import load_run
        from polarprune.serving.server import RemoteTriton
    except ImportError as missing:
        return {"skipped": f"the serving stage is not importable ({missing}); use python -m serving"}
    try:
        run = load_run(run_dir)
        settings = ProbeSettings.quick() if quick else ProbeSettings()
        with RemoteTriton(url, None, tuple(run.model_names.values())) as endpoints:
            latency = probe_latency(endpoints, run.model_names, run.images, "http", settings)
    except ServingStageError as problem:
        return {"error": str(problem)}
    summary = latency["summary"]
    gain = speedup(summary["dense"]["p50_ms"], summary["pruned"]["p50_ms"])
    return {"url": url, "protocol": "http", "batch": 1, "summary": summary, "speedup": gain,
            "efficiency": efficiency(gain, dense_flops, pruned_flops)}


def _spread(stats: dict) -> str:
    return f"{stats['median_ms']:.3f}/{stats['min_ms']:.3f}/{stats['p95_ms']:.3f}"


def format_table(results: list[dict], dense_flops: float, pruned_flops: float) -> str:
    lines = [f"MACs: dense {dense_flops / 1e6:.2f}M, pruned {pruned_flops / 1e6:.2f}M, "
             f"FLOPs ratio {pruned_flops / dense_flops:.3f} (ideal speed-up {dense_flops / pruned_flops:.2f}x)",
             f"{'engine':<12} {'batch':>5} {'dense ms med/min/p95':>26} {'pruned ms med/min/p95':>26} "
             f"{'dense img/s':>11} {'pruned img/s':>12} {'speed-up':>8} {'efficiency':>10} {'p95/med':>7} "
             f"{'rounds':>6}"]
    for r in results:
        dense, pruned = r["dense"], r["pruned"]
        spread = max(dense["p95_over_median"], pruned["p95_over_median"])
        lines.append(
            f"{r['engine']:<12} {r['batch']:>5} {_spread(dense):>26} {_spread(pruned):>26} "
            f"{r['images_per_s']['dense']:>11.0f} {r['images_per_s']['pruned']:>12.0f} {r['speedup']:>7.2f}x "
            f"{r['efficiency']:>10.2f} {spread:>7.2f} {dense['n']:>6}")
    return "\n".join(lines)


def run_main(args: argparse.Namespace, settings: dict) -> int:
    pair = load_pair(args.run)
    dense_flops, pruned_flops = pair["flops"]
    results, session = measure_run(args.run, pair, args.threads, settings, not args.no_torch)
    report = {"run": args.run.name, "mode": "quick" if args.quick else "full",
              "flops": {"dense": dense_flops, "pruned": pruned_flops, "ratio": pruned_flops / dense_flops},
              "settings": {**settings, "threads": args.threads, "onnxruntime_session": session,
                           "torch": torch.__version__, "cpu": cpu_name()},
              "results": results, "provenance": provenance()}
    print(format_table(results, dense_flops, pruned_flops))
    if args.served:
        report["served"] = probe_served(args.run, args.served, args.quick, dense_flops, pruned_flops)
        served = report["served"]
        print("served (Triton, HTTP, batch 1): " + (
            f"speed-up {served['speedup']:.2f}x, efficiency {served['efficiency']:.2f}" if "speedup" in served
            else served.get("skipped") or f"error: {served['error']}"))
    else:
        report["served"] = {"skipped": "no --served URL; latency through Triton is measured by python -m serving"}
    out = args.out or Path("reports") / args.run.name / "speedup.json"
    write_json(out, report)
    print(f"wrote {out}")
    return EXIT_OK


def baseline_main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as directory:
        pair = fixture.build_fixture(directory)
        measurements = [fixture.measure_fixture(pair, args.backend)
                        for _ in range(args.attempts if args.write_baseline else 1)]
    for measurement in measurements:
        results = [{"engine": f"fixture-{args.backend}", **r} for r in measurement["by_batch"].values()]
        print(format_table(results, pair.dense_flops, pair.pruned_flops))
    if args.write_baseline:
        baseline = fixture.write_baseline(pair, measurements, args.backend)
        print(f"wrote {fixture.BASELINE_PATH}: speed-up {baseline['speedup'][args.backend]} "
              f"(median of {len(measurements)})")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        settings["rounds"] = args.rounds
    try:
        return baseline_main(args) if args.baseline_fixture else run_main(args, settings)
    except PolarpruneError as error:  # missing artifacts, a bad mask.json, an absent backend
        return fail(PROG, error)


if __name__ == "__main__":
    sys.exit(main())
