"""Cross-check of the benchmark harnesses: a plain interleaved onnxruntime measurement of the same ONNX files.

    python bench/check_timing.py --speedup reports/<run>/speedup.json --run runs/<run>
                                 [--compare reports/compare/compare.json] [--threads 2] [--rounds 300]
                                 [--out docs/results/timing_check.json]

Deliberately independent of bench/timing.py (it imports only onnxruntime and numpy): two or more sessions
with the same options (ORT_ENABLE_ALL, `--threads` intra-op threads, no spinning), one fixed random batch,
A B A B ... rounds, medians. It then sets the speed-ups the harness reported (speedup.json from
`make bench`, compare.json from `make compare`) beside its own and says whether each agrees within
`--tolerance` (5%). Speed-ups, not absolute times, are compared: times drift 15-25% between processes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCHES = (1, 64)


def plain_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def plain_medians(paths: dict[str, Path], threads: int, batch: int, rounds: int, warmup: int = 10) -> dict:
    """Median, min and p95 ms per model, all models run once per round in a fixed order."""
    sessions = {name: plain_session(path, threads) for name, path in paths.items()}
    feeds = {}
    for name, session in sessions.items():
        model_input = session.get_inputs()[0]
        shape = (batch, *model_input.shape[1:])
        feeds[name] = {model_input.name: np.random.default_rng(1).standard_normal(shape, dtype=np.float32)}
    times = {name: [] for name in sessions}
    for index in range(warmup + rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            if index >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)),
                   "p95_ms": float(np.percentile(t, 95)), "n": len(t)} for name, t in times.items()}


def agreement(harness: float, plain: float, tolerance: float) -> dict:
    return {"harness": harness, "plain": plain, "ratio": harness / plain,
            "agrees": abs(harness / plain - 1) <= tolerance}


def check_speedup(report_path: Path, run_dir: Path, threads: int, rounds: int, tolerance: float) -> dict:
    """make bench's onnxruntime rows against the plain measurement of the run's dense/pruned ONNX."""
    report = json.loads(report_path.read_text())
    paths = {"dense": run_dir / "dense.onnx", "pruned": run_dir / "pruned.onnx"}
    rows = {r["batch"]: r for r in report["results"] if r["engine"] == "onnxruntime"}
    out = {"report": str(report_path), "onnx": {k: str(v) for k, v in paths.items()}, "by_batch": {}}
    for batch in BATCHES:
        plain = plain_medians(paths, threads, batch, rounds)
        row = rows[batch]
        out["by_batch"][str(batch)] = {
            "plain": plain,
            "harness": {role: {k: row[role][k] for k in ("median_ms", "min_ms", "p95_ms")} for role in paths},
            "speedup": agreement(row["speedup"], plain["dense"]["median_ms"] / plain["pruned"]["median_ms"],
                                 tolerance)}
    return out


def check_compare(report_path: Path, threads: int, rounds: int, tolerance: float) -> dict:
    """make compare's latencies: each run's speed-up over its seed's dense run, harness vs plain (the runs
    of one seed timed together, as the harness did). Keyed by run folder."""
    report = json.loads(report_path.read_text())
    out = {"report": str(report_path), "onnx": {},
           "by_batch": {str(batch): {"plain": {}, "speedup": {}} for batch in BATCHES}}
    for seed in sorted({row["seed"] for row in report["rows"]}):
        rows = [row for row in report["rows"] if row["seed"] == seed]
        paths = {row["run"]: Path(row["run"]) / "pruned.onnx" for row in rows}
        dense = next(row["run"] for row in rows if row["method"] == "dense")
        out["onnx"].update({run: str(path) for run, path in paths.items()})
        for batch in BATCHES:
            plain = plain_medians(paths, threads, batch, rounds)
            entry = out["by_batch"][str(batch)]
            entry["plain"].update(plain)
            for row in rows:
                if row["method"] != "dense":
                    entry["speedup"][row["run"]] = agreement(
                        row["speedup"][str(batch)], plain[dense]["median_ms"] / plain[row["run"]]["median_ms"],
                        tolerance)
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "commit": commit or None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/check_timing.py", description=__doc__.split("\n")[0])
    parser.add_argument("--speedup", type=Path, help="speedup.json written by bench/speedup.py (make bench)")
    parser.add_argument("--run", type=Path, help="with --speedup: the run folder holding dense/pruned.onnx")
    parser.add_argument("--compare", type=Path, help="compare.json written by bench/compare.py (make compare)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default: print only)")
    args = parser.parse_args(argv)
    if not args.speedup and not args.compare:
        parser.error("give --speedup (with --run) and/or --compare")
    if args.speedup and not args.run:
        parser.error("--speedup needs --run runs/<name> (the folder whose ONNX files it timed)")
    for path in (args.speedup, args.compare):
        if path is not None and not path.is_file():
            print(f"error: {path} not found: run make bench / make compare first", file=sys.stderr)
            return 2
    given = sys.argv[1:] if argv is None else argv
    result = {"command": " ".join(["python bench/check_timing.py", *given]),
              **machine(), "threads": args.threads, "rounds": args.rounds, "tolerance": args.tolerance}
    if args.speedup:
        result["bench"] = check_speedup(args.speedup, args.run, args.threads, args.rounds, args.tolerance)
        for batch, entry in result["bench"]["by_batch"].items():
            s = entry["speedup"]
            print(f"make bench, batch {batch}: harness {s['harness']:.3f}x, plain {s['plain']:.3f}x, "
                  f"ratio {s['ratio']:.3f} ({'agrees' if s['agrees'] else 'DISAGREES'})")
    if args.compare:
        result["compare"] = check_compare(args.compare, args.threads, args.rounds, args.tolerance)
        for batch, entry in result["compare"]["by_batch"].items():
            for run, s in entry["speedup"].items():
                print(f"make compare, batch {batch}, {run}: harness {s['harness']:.3f}x, plain {s['plain']:.3f}x, "
                      f"ratio {s['ratio']:.3f} ({'agrees' if s['agrees'] else 'DISAGREES'})")
    result["load_average_at_end"] = list(os.getloadavg())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.out)  # atomic; common.atomicio not imported to keep this script independent
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
