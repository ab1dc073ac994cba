"""Copy the figures the README shows from run artifacts into docs/results/*.json, with their provenance.

    python -m scripts.collect_results [--run fmnist_resnet20] [--runs runs] [--reports reports]
    make results [RUN=...]          # collects, then renders the README tables (scripts.render_readme)

Sources, each stamped by the command that wrote it (common.results): runs/<run>/metrics.json and
runs/<run>_dense/metrics.json -> default_run.json; the same of the transformer run (--vit-run), its
pruning.json and reports/<vit-run>/speedup.json (python -m bench.speedup) -> vit_run.json;
runs/<run>/export_report.json -> export.json;
reports/<run>/serving.json -> serving.json; reports/compare/compare.json (make compare: its summary over seeds, rendered, and its rows) -> compare.json; reports/<run>/soak.json
(python -m serving soak), reports/<run>/faults.json (python -m serving faults) and
reports/corrupt_inputs.json (python -m tests.corrupt_inputs) -> reliability.json.
The training and export sources are required; the others are collected when present. A file without a
provenance stamp, or a `--quick` comparison, is refused: it cannot back a published number.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polarprune.common.results import REPO_ROOT, ResultError, read_source, write_result

RESULTS_DIR = REPO_ROOT / "docs" / "results"
RUN_KEYS = ("method", "epochs", "test_accuracy", "dense_flops", "pruned_flops", "flops_ratio", "dense_params",
            "pruned_params", "params_ratio", "removed_blocks", "train_seconds")
COMPARE_ROW_KEYS = ("method", "label", "target", "seed", "test_accuracy", "gap_points", "flops_ratio", "pruned_flops",
                    "kept_params", "params_ratio", "weight_sparsity", "train_seconds", "train_flops_ratio",
                    "latency_ms", "speedup", "matched_flops_ratio", "equal_macs")


def pick(document: dict, keys: tuple[str, ...], source: Path) -> dict:
    missing = [key for key in keys if key not in document]
    if missing:
        raise ResultError(f"{source}: missing {', '.join(missing)} (written by another version of its command?)")
    return {key: document[key] for key in keys}


def default_run(runs: Path, run: str) -> tuple[dict, dict]:
    """The run and its dense reference; narrowed units are those below the dense run's widths."""
    paths = {"polarized": runs / run / "metrics.json", "dense": runs / f"{run}_dense" / "metrics.json"}
    documents, stamps = {}, {}
    for role, path in paths.items():
        documents[role], stamps[str(path)] = read_source(path)
    widths = documents["dense"].get("kept_channels", {})
    rows = []
    for role, document in documents.items():
        row = {"role": role, "run": paths[role].parent.name, **pick(document, RUN_KEYS, paths[role])}
        row["narrowed"] = {unit: [kept, widths[unit]] for unit, kept in document.get("kept_channels", {}).items()
                           if unit in widths and kept < widths[unit] and unit not in row["removed_blocks"]}
        rows.append(row)
    return {"run": run, "rows": rows}, stamps


def export_result(runs: Path, run: str) -> tuple[dict, dict]:
    path = runs / run / "export_report.json"
    report, stamp = read_source(path)
    data = pick(report, ("run", "dense_source", "max_abs_diff_surgery", "max_abs_diff_onnx", "flops_ratio",
                         "params_ratio"), path)
    data["onnx_macs"] = {kind: report[kind]["onnx_macs"] for kind in ("dense", "pruned")}
    data["mask_pruned_flops"] = report["mask_flops"]["pruned_flops"]
    return data, {str(path): stamp}


def transformer_result(runs: Path, reports: Path, run: str) -> tuple[dict, dict]:
    """A transformer run (issue 21) and its dense reference: accuracy, kept MACs, heads, MLP widths and
    branches kept (the run's pruning.json, written beside its stamped metrics.json by the same command), and
    the onnxruntime speed-up at batch 1 and 64 (bench.speedup's report)."""
    data, stamps = default_run(runs, run)
    report_path = runs / run / "pruning.json"
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as error:
        raise ResultError(f"{report_path}: not found or unreadable ({error}); the training run writes it") from None
    groups = report["groups"]
    data["heads"] = {name: g["heads"] for name, g in groups.items() if "heads" in g}
    data["mlp_widths"] = {name: [g["width"], g["kept"]] for name, g in groups.items()
                          if "heads" not in g and not g["pinned"]}
    data["branches"] = report["blocks"]
    speed_path = reports / run / "speedup.json"
    speed, stamps[str(speed_path)] = read_source(speed_path)
    data["speedup"] = {"cpu": speed["settings"]["cpu"], "threads": speed["settings"]["threads"],
                       "results": [{key: r[key] for key in ("batch", "speedup", "efficiency")} |
                                   {role: r[role]["median_ms"] for role in ("dense", "pruned")}
                                   for r in speed["results"] if r["engine"] == "onnxruntime"]}
    return data, stamps


def serving_result(reports: Path, run: str) -> tuple[dict, dict]:
    path = reports / run / "serving.json"
    summary, stamp = read_source(path)
    data = pick(summary, ("run", "headline_protocol", "flops_ratio", "top1_agreement", "accuracy_samples",
                          "speedup_throughput"), path)
    for role in ("dense", "pruned"):
        entry = summary[role]
        data[role] = {"model": entry["model"], "accuracy": entry["accuracy"],
                      "peak_throughput": entry["peak_throughput"],
                      "latency": {protocol: {key: values.get(key) for key in ("p50_ms", "p99_ms")}
                                  for protocol, values in entry["latency"].items()}}
    load = summary.get("load_test") or {}
    data["load_test"] = {"requests": load.get("requests"), "failures": load.get("failures")}
    return data, {str(path): stamp}


def compare_result(reports: Path) -> tuple[dict, dict]:
    path = reports / "compare" / "compare.json"
    report, stamp = read_source(path)
    if report.get("quick"):
        raise ResultError(f"{path}: a --quick smoke run, not a result; run `make compare` at the default budget")
    data = pick(report, ("budget", "cpu", "timing", "summary", "wall_seconds"), path)
    data["timing"] = {key: data["timing"][key] for key in ("threads", "batches", "rounds")}
    data["rows"] = [pick(row, COMPARE_ROW_KEYS, path) for row in report["rows"]]
    return data, {str(path): stamp}


def reliability_result(reports: Path, run: str) -> tuple[dict, dict]:
    """The soak, the injected faults and the corrupt-input table (issue 23)."""
    paths = {"soak": reports / run / "soak.json", "faults": reports / run / "faults.json",
             "corrupt": reports / "corrupt_inputs.json"}
    documents, stamps = {}, {}
    for name, path in paths.items():
        documents[name], stamps[str(path)] = read_source(path)
    soak, faults, corrupt = documents["soak"], documents["faults"], documents["corrupt"]
    data = {"run": run, "soak": pick(soak, ("minutes", "clients", "protocols", "batch_sizes", "interval_s",
                                            "requests", "failures", "failures_by_reason", "p99", "load_average",
                                            "cpu_cores", "ok", "problems"), paths["soak"])}
    memory = soak["memory"]
    data["soak"]["memory"] = {key: memory.get(key) for key in ("after_warmup_mb", "end_mb", "growth_pct", "peak_mb",
                                                               "warmup_s", "leak", "unavailable")}
    data["soak"]["per_interval"] = [
        {"start_s": row["start_s"], "memory_total_mb": row.get("memory_total_mb"),
         **{f"{role}_{key}": row["roles"][role][key] for role in ("dense", "pruned")
            for key in ("requests", "failures", "p50_ms", "p99_ms")}} for row in soak["intervals"]]
    stub, exports = faults["stub_kill"], faults["export_kill"]
    data["faults"] = {
        "stub_kill": {key: stub[key] for key in ("killed_model", "clients", "clients_of_killed_model",
                                                 "failed_killed_model", "failed_other_model", "requests_other_model",
                                                 "recovery_s", "reloads", "only_in_flight_failed")},
        "server_kill": [{key: entry[key] for key in ("mode", "exit_code", "seconds_to_exit", "stderr_lines",
                                                     "message", "processes_left", "stubs_outlived_the_server", "ok")}
                        for entry in faults["server_kill"]],
        "export_kill": {key: exports[key] for key in ("kills", "kills_while_writing", "finished_before_the_kill",
                                                      "export_seconds", "partial_loads", "reload_failures",
                                                      "request_failures", "next_export_code", "ok")},
        "checks": faults["checks"]}
    data["corrupt_inputs"] = pick(corrupt, ("cases", "clean", "files", "damages"), paths["corrupt"])
    data["corrupt_inputs"]["not_clean"] = [f"{r['file']}: {r['damage']}" for r in corrupt["results"] if not r["clean"]]
    return data, stamps


def collect(run: str, runs: Path, reports: Path, out: Path = RESULTS_DIR, only: list[str] | None = None,
            vit_run: str = "fmnist_vit") -> list[Path]:
    """Write every result whose sources exist (or only those named); training and export sources are
    required unless `only` leaves them out."""
    written = []
    jobs = [("default_run", lambda: default_run(runs, run), True),
            ("vit_run", lambda: transformer_result(runs, reports, vit_run), False),
            ("export", lambda: export_result(runs, run), True),
            ("serving", lambda: serving_result(reports, run), False),
            ("compare", lambda: compare_result(reports), False),
            ("reliability", lambda: reliability_result(reports, run), False)]
    unknown = set(only or ()) - {name for name, _, _ in jobs}
    if unknown:
        raise ResultError(f"--only: no result named {', '.join(sorted(unknown))}; known: "
                          f"{', '.join(name for name, _, _ in jobs)}")
    for name, job, required in jobs:
        if only and name not in only:
            continue
        try:
            try:
                data, sources = job()
            except (KeyError, TypeError) as error:  # a source from another version of its command
                raise ResultError(f"{name}: a source lacks the entry {error} (re-run the command that wrote it)") from None
        except ResultError as error:
            if required or "not found" not in str(error):
                raise
            print(f"{name}: skipped ({error})")
            continue
        write_result(out / f"{name}.json", data, sources)
        written.append(out / f"{name}.json")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.collect_results", description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="fmnist_resnet20", help="the run the README reports")
    parser.add_argument("--vit-run", default="fmnist_vit", help="the transformer run the README reports")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run folders")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="folder of serving/compare reports")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="result files go here")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="collect only this result (repeatable): default_run, vit_run, export, serving, "
                             "compare, reliability")
    args = parser.parse_args(argv)
    try:
        written = collect(args.run, args.runs, args.reports, args.out, args.only, args.vit_run)
    except ResultError as error:
        print(f"collect_results: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
