"""Turn probe results into `serving.json`, `serving.md`, `serving_raw.json` and two PNG plots.

Speed-ups are written so that > 1 means the pruned model is faster: dense/pruned for latency,
pruned/dense for throughput. `speedup_efficiency_p50` = speedup_p50 * flops_ratio (1.0 = the latency
gain matches the FLOPs cut). The load test and energy sections come from serving/loadtest.py; energy
is labelled ESTIMATE whenever it was estimated from CPU time rather than read from RAPL/NVML counters.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from polarprune.common.atomicio import atomic_path, write_json, write_text  # noqa: E402
from polarprune.common.results import provenance  # noqa: E402
from polarprune.serving.probes import ROLES  # noqa: E402
from polarprune.serving.run_artifacts import RunArtifacts  # noqa: E402


def _ratio(numerator, denominator):
    return float(numerator) / float(denominator) if numerator and denominator else None


def summarize(results: dict, run: RunArtifacts, mode: str) -> dict:
    """The serving.json document (raw latency samples stay in serving_raw.json)."""
    protocols = list(results["latency"])
    headline = results["settings"]["protocols"][0]
    sweep = results["throughput"]
    main_batch = min(r["batch_size"] for r in sweep) if sweep else None
    summary = {"run": run.name, "dataset": run.dataset, "mode": mode, "headline_protocol": headline,
               "endpoints": results["endpoints"], "models": results["models"]}
    for role in ROLES:
        latency = {p: results["latency"][p]["summary"][role] for p in protocols}
        mine = [r for r in sweep if r["role"] == role]
        by_batch = {}
        for r in mine:
            by_batch.setdefault(str(r["batch_size"]), {})[str(r["concurrency"])] = r["infer_per_s"]
        summary[role] = {
            "model": results["models"][role],
            **{k: latency[headline].get(k) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")},
            "throughput": by_batch.get(str(main_batch), {}),
            "throughput_batch_size": main_batch,
            "throughput_by_batch": by_batch,
            "peak_throughput": max((r["infer_per_s"] for r in mine), default=None),
            "accuracy": results["accuracy"][role],
            "latency": latency,
        }
    dense, pruned = summary["dense"], summary["pruned"]
    summary["speedup_p50"] = _ratio(dense["p50_ms"], pruned["p50_ms"])
    summary["speedup_p50_by_protocol"] = {
        p: _ratio(dense["latency"][p].get("p50_ms"), pruned["latency"][p].get("p50_ms")) for p in protocols}
    summary["paired_speedup_median"] = {p: results["latency"][p]["paired_speedup_median"] for p in protocols}
    summary["speedup_throughput"] = _ratio(pruned["peak_throughput"], dense["peak_throughput"])
    summary["flops_ratio"] = run.flops_ratio
    summary["speedup_efficiency_p50"] = (summary["speedup_p50"] * run.flops_ratio
                                         if summary["speedup_p50"] else None)
    summary["top1_agreement"] = results["accuracy"]["top1_agreement"]
    summary["accuracy_samples"] = results["accuracy"]["samples"]
    summary["correctness"] = results["correctness"]
    summary["throughput_sweep"] = sweep
    summary["perf_analyzer"] = results["perf_analyzer"]
    summary["load_test"] = summarize_load_test(results["load_test"])
    summary["energy"] = summarize_energy(results["energy"])
    return summary


def summarize_load_test(load: dict) -> dict:
    """Per model and level: counts, p50/p99, req/s, RSS; plus steady memory and the first errors."""
    levels = [{key: level[key] for key in ("role", "model", "concurrency", "requests", "failures",
                                           "requests_per_s", "stuck_clients", "rss_start_mb", "rss_end_mb",
                                           "rss_growth_mb", "rss_peak_mb")}
              | {"p50_ms": level["latency"].get("p50_ms"), "p99_ms": level["latency"].get("p99_ms")}
              for level in load["levels"]]
    first_errors = [f"{level['role']} at concurrency {level['concurrency']}: {error}"
                    for level in load["levels"] for error in level["errors"]][:5]
    return {key: load[key] for key in ("protocol", "batch_size", "seconds_per_level", "request_timeout_s",
                                       "concurrencies", "requests", "failures", "memory")} | {
        "levels": levels, "first_errors": first_errors}


def summarize_energy(energy: dict) -> dict:
    """The energy probe without its per-window detail (that stays in serving_raw.json)."""
    if "unavailable" in energy:
        return energy
    return {key: value for key, value in energy.items() if key not in ROLES} | {
        role: {k: v for k, v in energy[role].items() if k != "windows"} for role in ROLES}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(summary: dict) -> str:
    dense, pruned, headline = summary["dense"], summary["pruned"], summary["headline_protocol"]
    rows = [("| metric | dense | pruned | pruned speed-up |"), "|---|---:|---:|---:|",
            f"| top-1 accuracy ({summary['accuracy_samples']} test images) | {_fmt(dense['accuracy'], 4)} "
            f"| {_fmt(pruned['accuracy'], 4)} | agreement {_fmt(summary['top1_agreement'], 4)} |"]
    for protocol in dense["latency"]:
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            d, p = dense["latency"][protocol].get(key), pruned["latency"][protocol].get(key)
            rows.append(f"| {key[:3]} latency, {protocol}, batch 1 (ms) | {_fmt(d)} | {_fmt(p)} "
                        f"| {_fmt(_ratio(d, p), 2)}x |")
    batch = dense["throughput_batch_size"]
    for concurrency, d in dense["throughput"].items():
        p = pruned["throughput"].get(concurrency)
        rows.append(f"| throughput, {headline}, batch {batch}, concurrency {concurrency} (inf/s) "
                    f"| {_fmt(d, 0)} | {_fmt(p, 0)} | {_fmt(_ratio(p, d), 2)}x |")
    rows.append(f"| peak throughput over the sweep (inf/s) | {_fmt(dense['peak_throughput'], 0)} "
                f"| {_fmt(pruned['peak_throughput'], 0)} | {_fmt(summary['speedup_throughput'], 2)}x |")
    lines = [f"# Serving: dense vs pruned ({summary['run']}, {summary['dataset']})", "",
             f"Models `{dense['model']}` and `{pruned['model']}` on Triton at "
             f"{summary['endpoints']['http_url']} (HTTP) / {summary['endpoints']['grpc_url']} (gRPC); "
             f"{summary['mode']} mode. FLOPs ratio pruned/dense {_fmt(summary['flops_ratio'])}; "
             f"p50 speed-up {_fmt(summary['speedup_p50'], 2)}x ({headline}), speed-up efficiency "
             f"{_fmt(summary['speedup_efficiency_p50'], 2)}.", "", *rows, ""]

    checks = []
    for role in ROLES:
        entry = summary["correctness"].get(role, {})
        if "skipped" in entry:
            checks.append(f"{role}: skipped ({entry['skipped']})")
        else:
            diffs = ", ".join(f"{p} max|diff| {entry[p]['max_abs_diff']:.2e}" for p in dense["latency"])
            checks.append(f"{role}: {'OK' if entry['ok'] else 'MISMATCH'} ({diffs}; tolerance "
                          f"{entry['tolerance']:.2e}, {entry.get('tolerance_basis', 'cpu/fp32')})")
    lines += ["Correctness vs onnxruntime on the same ONNX: " + "; ".join(checks) + ".", ""]

    lines += ["Server side per request (model statistics): queue / compute in microseconds, mean "
              "executed batch.", "", "| model | batch | concurrency | inf/s | client p50 ms | queue us "
              "| compute us | exec batch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["throughput_sweep"]:
        lines.append(f"| {r['role']} | {r['batch_size']} | {r['concurrency']} | {r['infer_per_s']:.0f} "
                     f"| {_fmt(r['latency'].get('p50_ms'))} | {r['server_queue_us']:.0f} "
                     f"| {r['server_compute_us']:.0f} | {r['avg_execution_batch']:.1f} |")
    failed = [r for r in summary["throughput_sweep"] if r["failures"]]
    for r in failed:
        lines.append(f"\n{r['role']} batch {r['batch_size']} concurrency {r['concurrency']}: "
                     f"{r['failures']} failed request(s), e.g. {r['errors'][0]}")
    lines.append("")

    analyzer = summary["perf_analyzer"]
    if "rows" in analyzer:
        lines += [f"perf_analyzer ({analyzer['version']}), batch 1, {headline}:", "",
                  "| model | concurrency | inf/s | p50 us | p99 us | server queue us | server infer us |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in analyzer["rows"]:
            if "error" in r:
                reason = r["error"].replace("|", "/")
                lines.append(f"| {r['role']} | {r['concurrency']} | error: {reason} | | | | |")
            else:
                lines.append(f"| {r['role']} | {r['concurrency']} | {_fmt(r['infer_per_s'], 0)} "
                             f"| {_fmt(r['p50_us'], 0)} | {_fmt(r['p99_us'], 0)} "
                             f"| {_fmt(r['server_queue_us'], 0)} | {_fmt(r['server_compute_infer_us'], 0)} |")
    else:
        lines.append(f"perf_analyzer: {analyzer.get('skipped', 'skipped')}")
    lines += ["", *render_load_test(summary["load_test"]), "", *render_energy(summary["energy"]), "",
              "Dense and pruned were measured in one process, interleaved; on a shared machine "
              "absolute times drift 15-25% between runs, so compare the ratios."]
    return "\n".join(lines) + "\n"


def render_load_test(load: dict) -> list[str]:
    lines = ["## Load test", "",
             f"{load['protocol']}, batch {load['batch_size']}, closed-loop clients, "
             f"{load['seconds_per_level']:g} s per model and level, every request with a "
             f"{load['request_timeout_s']:g} s deadline: {load['requests']} requests, "
             f"**{load['failures']} failed**. RSS is the whole server process tree, sampled before and after "
             "each model's window. With many clients on a small machine the Python client itself limits "
             "req/s.", "",
             "| model | clients | requests | failures | p50 ms | p99 ms | req/s | RSS start MB | RSS end MB "
             "| RSS growth MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in load["levels"]:
        lines.append(f"| {r['role']} | {r['concurrency']} | {r['requests']} | {r['failures']} "
                     f"| {_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | {_fmt(r['requests_per_s'], 0)} "
                     f"| {_fmt(r['rss_start_mb'], 1)} | {_fmt(r['rss_end_mb'], 1)} "
                     f"| {_fmt(r['rss_growth_mb'], 1)} |")
    memory = load["memory"]
    lines.append("")
    if "unavailable" in memory:
        lines.append(f"Steady memory: unavailable ({memory['unavailable']}).")
    else:
        parts = ", ".join(f"{name} {mb:.0f}" for name, mb in memory["by_process_end_mb"].items())
        lines.append(
            f"Steady memory, {memory['scope']}: {memory['start_mb']:.1f} MB at the start, "
            f"{memory['after_first_level_mb']:.1f} MB after the first level, {memory['end_mb']:.1f} MB at "
            f"the end (peak {memory['peak_mb']:.1f} MB over {memory['samples']} samples): growth after the "
            f"first level {memory['growth_mb']:+.1f} MB ({memory['growth_pct']:+.1f}%), within the last "
            f"level {memory['last_level_growth_mb']:+.1f} MB (a step when the load first rises is allocator "
            f"arenas and connection buffers; a leak keeps growing at a fixed load). "
            f"At the end, MB by process: {parts}.")
    for error in load["first_errors"]:
        lines.append(f"- {error}")
    return lines


def render_energy(energy: dict) -> list[str]:
    if "unavailable" in energy:
        return ["## Energy per 1,000 inferences", "", f"Unavailable: {energy['unavailable']}."]
    label = "ESTIMATE" if energy["estimated"] else f"measured ({energy['source']})"
    lines = [f"## Energy per 1,000 inferences ({label})", "",
             f"{energy['scope']}, {energy['protocol']} batch {energy['batch_size']}, {energy['concurrency']} "
             f"client(s), {energy['repeats']} windows of {energy['seconds_per_window']:g} s per model, dense "
             f"and pruned interleaved; medians. Source: {energy['source']}.", "",
             "| model | J / 1,000 inferences | server CPU ms / inference | inferences | failures |",
             "|---|---:|---:|---:|---:|"]
    for role in ROLES:
        e = energy[role]
        lines.append(f"| {role} | {_fmt(e['joules_per_1000_inferences'], 3)} "
                     f"| {_fmt(e['server_cpu_ms_per_inference'], 3)} | {e['inferences']} | {e['failures']} |")
    lines += ["", f"Pruned / dense energy per inference: {_fmt(energy['pruned_over_dense'], 3)}.",
              *[f"- {note}" for note in energy["assumptions"]]]
    return lines


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_latency(results: dict, path: Path) -> None:
    """Batch-1 latency distributions, dense and pruned side by side, one panel per protocol."""
    protocols = list(results["latency"])
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.5 * len(protocols), 4), squeeze=False,
                             layout="constrained")
    for ax, protocol in zip(axes[0], protocols):
        samples = results["latency"][protocol]["samples_ms"]
        ax.boxplot([samples[r] for r in ROLES], whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(ROLES) + 1), ROLES)
        for x, role in enumerate(ROLES, start=1):
            p50 = results["latency"][protocol]["summary"][role].get("p50_ms")
            if p50 is not None:
                ax.annotate(f"p50 {p50:.2f}", (x, p50), xytext=(8, 0), textcoords="offset points",
                            fontsize=8, va="center")
        ax.set_title(f"{protocol}, batch 1 (whiskers p1-p99)")
        ax.set_ylabel("round trip (ms)")
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_throughput(results: dict, path: Path) -> None:
    """Inferences/s vs client concurrency, dense and pruned, one panel per batch size."""
    sweep = results["throughput"]
    batches = sorted({r["batch_size"] for r in sweep})
    fig, axes = plt.subplots(1, max(len(batches), 1), figsize=(4.5 * max(len(batches), 1), 4),
                             squeeze=False, layout="constrained")
    for ax, batch in zip(axes[0], batches):
        for role, marker in zip(ROLES, "os"):
            points = sorted((r["concurrency"], r["infer_per_s"]) for r in sweep
                            if r["role"] == role and r["batch_size"] == batch)
            ax.plot([c for c, _ in points], [v for _, v in points], marker=marker, label=role)
        ax.set_xscale("log", base=2)
        concurrencies = sorted({r["concurrency"] for r in sweep})
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_ylim(bottom=0)
        ax.set_title(f"batch {batch}, {sweep[0]['protocol']}")
        ax.set_xlabel("client concurrency")
        ax.set_ylabel("inferences / s")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def write_report(results: dict, run: RunArtifacts, report_dir: Path, mode: str) -> tuple[dict, str]:
    """Write every report file; returns (serving.json document, Markdown text)."""
    report_dir = Path(report_dir)
    summary = {**summarize(results, run, mode), "provenance": provenance()}
    markdown = render_markdown(summary)
    write_json(report_dir / "serving.json", summary)
    write_json(report_dir / "serving_raw.json", results)
    write_text(report_dir / "serving.md", markdown)
    plot_latency(results, report_dir / "latency.png")
    plot_throughput(results, report_dir / "throughput.png")
    return summary, markdown
