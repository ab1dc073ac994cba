"""What `make compare` (bench/compare.py) writes: its rows, the summary over seeds, compare.md and compare.png.

Light on purpose (no torch): scripts/render_readme.py renders the README's comparison table with
`summary_table` from the summary stored in docs/results/compare.json.
"""
from __future__ import annotations

import io
import statistics
from pathlib import Path

from polarprune.common.atomicio import write_bytes, write_json, write_text

BATCH_KEYS = ("1", "64")  # the timed batch sizes, as JSON keys
EQUAL_MACS = 0.02  # a Torch-Pruning row is at equal MACs within this of the polarized run it matches


def row_for(identity: dict, metrics: dict, latency: dict, dense_latency: dict, dense_accuracy: float,
            matched_flops_ratio: float | None = None) -> dict:
    """One run of the comparison. `identity`: method, label, target, seed and run folder. Keys a method
    does not report take the dense-shaped meaning: every weight is a parameter, training runs the full
    network. `matched_flops_ratio`: the kept MACs of the polarized run a Torch-Pruning row prunes to; the
    row is at equal MACs when within EQUAL_MACS of it."""
    kept_params = metrics.get("nonzero_params", metrics["pruned_params"])
    return {
        **identity, "test_accuracy": metrics["test_accuracy"],
        "gap_points": 100 * (dense_accuracy - metrics["test_accuracy"]),  # below the same seed's dense run
        "flops_ratio": metrics["flops_ratio"], "pruned_flops": metrics["pruned_flops"],
        "kept_params": kept_params, "params_ratio": kept_params / metrics["dense_params"],
        "weight_sparsity": metrics.get("weight_sparsity"),
        "train_seconds": metrics["train_seconds"], "train_flops_ratio": metrics.get("train_flops_ratio", 1.0),
        "train_seconds_ratio_vs_dense_pace": metrics.get("train_seconds_ratio_vs_dense_pace"),
        "train_energy": metrics.get("train_energy"),
        "latency_ms": {batch: stats["median_ms"] for batch, stats in latency.items()},
        "latency": latency,
        "speedup": {batch: dense_latency[batch]["median_ms"] / stats["median_ms"] for batch, stats in latency.items()},
        "torch_pruning": metrics.get("torch_pruning"),
        "matched_flops_ratio": matched_flops_ratio,
        "equal_macs": None if matched_flops_ratio is None
        else abs(metrics["flops_ratio"] - matched_flops_ratio) <= EQUAL_MACS,
        "val_accuracy": metrics.get("val_accuracy"),
        # polarized: the ratio the gates learned before any move into the band, and the share of dense MACs moved
        "learned_flops_ratio": (metrics.get("projection") or {}).get("learned_flops_ratio"),
        "flipped_flops_share": (metrics.get("projection") or {}).get("flipped_flops_share"),
    }


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1); one value has no spread (std None)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per method and target (in the rows' order), over its seeds: spread of accuracy, of the gap to the
    same seed's dense run (points), of kept FLOPs and params, training time, latency and speed-up; for a
    Torch-Pruning row also whether every seed sat at equal MACs and how polarized fared against it."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["target"]), []).append(row)

    def over(group: list[dict], key: str) -> dict:
        return spread([row[key] for row in group])

    summary = [{"method": method, "label": group[0]["label"], "target": target, "seeds": [r["seed"] for r in group],
                **{key: over(group, key) for key in ("test_accuracy", "gap_points", "flops_ratio", "params_ratio",
                                                     "train_seconds")},
                "latency_ms": {b: spread([r["latency_ms"][b] for r in group]) for b in BATCH_KEYS},
                "speedup": {b: spread([r["speedup"][b] for r in group]) for b in BATCH_KEYS}}
               for (method, target), group in groups.items()]
    for entry in summary:
        group = groups[(entry["method"], entry["target"])]
        if all(row["equal_macs"] is not None for row in group):
            entry["equal_macs"] = all(row["equal_macs"] for row in group)
            entry["polarized_vs"] = versus(groups.get(("polarized", entry["target"]), []), group)
    return summary


def versus(ours: list[dict], theirs: list[dict]) -> dict | None:
    """Polarized against a peer at one target, seed by seed: the accuracy difference (points, ours minus
    theirs) and the verdict. A win or a loss only when the mean difference exceeds the spread: the sample
    standard deviation of the per-seed differences and of each side's accuracy; else a tie."""
    theirs_by_seed = {row["seed"]: row for row in theirs}
    pairs = [(row, theirs_by_seed[row["seed"]]) for row in ours if row["seed"] in theirs_by_seed]
    if not pairs:
        return None
    differences = [100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in pairs]
    diff = spread(differences)
    widest = max([diff["std"] or 0.0,
                  *(100 * (spread([r["test_accuracy"] for r in side])["std"] or 0.0)
                    for side in ([a for a, _ in pairs], [b for _, b in pairs]))])
    verdict = "tie" if len(pairs) < 2 or abs(diff["mean"]) <= widest else ("win" if diff["mean"] > 0 else "loss")
    return {"seeds": [a["seed"] for a, _ in pairs], "difference_points": diff, "spread_points": widest,
            "verdict": verdict}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, accuracy) points no other point beats on both (lower cost, higher accuracy), by cost."""
    front = []
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((cost, accuracy))
    return front


def target_text(target: float | None) -> str:
    return "-" if target is None else f"{target:g}"


def plus_minus(stat: dict, digits: int) -> str:
    text = f"{stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {stat['std']:.{digits}f}"


def summary_table(summary: list[dict]) -> list[str]:
    """Per method and target: accuracy and gap to dense as mean ± standard deviation over seeds (no ± for
    one seed), the rest as means; for a Torch-Pruning row, polarized's lead over it and the verdict."""
    lines = ["| method | target | seeds | test acc | gap to dense (points) | kept FLOPs | kept params | train s "
             "| batch 1 ms (speed-up) | batch 64 ms (speed-up) | polarized minus this (points) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for entry in summary:
        lat, gain = entry["latency_ms"], entry["speedup"]
        lines.append(f"| {entry['label']} | {target_text(entry['target'])} | {len(entry['seeds'])} "
                     f"| {plus_minus(entry['test_accuracy'], 4)} | {plus_minus(entry['gap_points'], 2)} "
                     f"| {entry['flops_ratio']['mean']:.3f}{'' if entry.get('equal_macs', True) else ' (not equal)'} "
                     f"| {entry['params_ratio']['mean']:.2f} | {entry['train_seconds']['mean']:.0f} "
                     f"| {lat['1']['mean']:.3f} ({gain['1']['mean']:.2f}x) "
                     f"| {lat['64']['mean']:.2f} ({gain['64']['mean']:.2f}x) | {versus_text(entry)} |")
    return lines


def verdicts(summary: list[dict]) -> list[str]:
    """In words, per Torch-Pruning row: where polarized wins, ties or loses beyond the seed spread, and
    where the two were not at equal MACs."""
    lines = []
    for entry in summary:
        against = entry.get("polarized_vs")
        if against is None:
            continue
        lead = f"{against['difference_points']['mean']:+.2f} points (spread {against['spread_points']:.2f})"
        if not entry["equal_macs"]:
            text = f"no verdict: not at equal MACs (kept {entry['flops_ratio']['mean']:.3f}); polarized {lead}"
        else:
            text = {"win": "polarized wins", "loss": "polarized loses", "tie": "a tie"}[against["verdict"]] + f", {lead}"
        lines.append(f"- against {entry['label']} at target {target_text(entry['target'])}: {text}.")
    return lines


def versus_text(entry: dict) -> str:
    against = entry.get("polarized_vs")
    if against is None:
        return "-"
    verdict = against["verdict"] if entry["equal_macs"] else "not at equal MACs"
    return f"{plus_minus(against['difference_points'], 2)}: {verdict}"


def runs_table(rows: list[dict]) -> list[str]:
    lines = ["| method | target | seed | test acc | gap to dense (points) | kept FLOPs | learned / flipped "
             "| kept params | train s | train J | train FLOPs | batch 1 ms (speed-up) | batch 1 min / p95 "
             "| batch 64 ms (speed-up) | batch 64 min / p95 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        params = f"{row['kept_params'] / 1e3:.1f}k ({row['params_ratio']:.2f})"
        joules = f"{row['train_energy']['joules']:.0f}" if row["train_energy"] else "n/a"
        learned = (f"{row['learned_flops_ratio']:.3f} / {row['flipped_flops_share']:.3f}"
                   if row.get("flipped_flops_share") is not None else "-")
        lines.append(f"| {row['label']} | {target_text(row['target'])} | {row['seed']} | {row['test_accuracy']:.4f} "
                     f"| {row['gap_points']:.2f} | {row['flops_ratio']:.3f} | {learned} | {params} "
                     f"| {row['train_seconds']:.0f} "
                     f"| {joules} | {row['train_flops_ratio']:.3f} | {latency_cells(row, '1', 3)} "
                     f"| {latency_cells(row, '64', 2)} |")
    return lines


def latency_cells(row: dict, batch: str, digits: int) -> str:
    """`median (speed-up) | min / p95` of one batch size, in ms."""
    stats = row["latency"][batch]
    return (f"{stats['median_ms']:.{digits}f} ({row['speedup'][batch]:.2f}x) "
            f"| {stats['min_ms']:.{digits}f} / {stats['p95_ms']:.{digits}f}")


def run_name(row: dict) -> str:
    target = "" if row["target"] is None else f", target {row['target']:g}"
    return f"{row['label']}{target}, seed {row['seed']}"


def notes(report: dict) -> list[str]:
    rows, epochs = report["rows"], report["budget"]["epochs"]
    lines = [
        "- target: the kept-FLOPs target of polarized and the Torch-Pruning rows. Activation density and FlipOut are "
        "baselines with their own knobs (activation density sizes layers by their measured activation density, "
        f"FlipOut zeroes {report['budget']['final_sparsity']:.0%} of the weights): they run once per seed, not "
        "per target (-).",
        "- Torch-Pruning rows (training/methods/torch_pruning.py; recipes after its CIFAR benchmark): iterative "
        "Taylor (first-order Taylor group importance, 4 cuts spread over the first half), group-SL (GroupNormPruner, "
        "its group regulariser 5e-4 until one cut at the midpoint) and one-shot L1 (one cut at the midpoint); each "
        "fine-tunes for the rest. Each prunes to the kept MACs the polarized run reached at the same target and "
        f"seed; a row within {EQUAL_MACS:g} of it is at equal MACs, the others are marked not equal (widths "
        "are multiples of 16 and it cannot close blocks, so it cannot go as low). Its network is cut and exported "
        "by the same code as polarized's, so no export artefact costs one side only.",
        "- polarized minus this: polarized's test accuracy minus the row's, per seed, mean ± sd in points; a win "
        "or a loss only when the mean exceeds the spread (the sd of the differences and of either side's "
        "accuracy), else a tie.",
        "- gap to dense: the same seed's dense accuracy minus the row's, in points (negative: above dense).",
        "- kept FLOPs: conv + linear MACs of the exported network / dense. kept params: parameters of the exported "
        "network; for FlipOut the non-zero ones (its network keeps the dense shape, so its FLOPs stay 1).",
        "- train FLOPs: forward MACs x examples x 3 summed over training, relative to dense. Only activation density "
        "trains a smaller network as it goes (and Torch-Pruning after its cuts); the others train a dense-shaped "
        "one (gates and masks multiply zeros).",
        "- train J: energy of the training steps (metrics.json `train_energy`: RAPL/NVML where readable, "
        "else an estimate from CPU time; its assumptions are in compare.json).",
        "- train s: the loop's training time. Runs of one seed ran one after another (with --jobs, seeds side by "
        "side), so machine load moves them. Latencies of one seed were timed in one call, interleaved, and are comparable; "
        "different seeds were timed in different calls.",
    ]
    for row in rows:
        if row["train_seconds_ratio_vs_dense_pace"] is not None:
            lines.append(f"- {run_name(row)}: its training took {row['train_seconds_ratio_vs_dense_pace']:.2f}x the "
                         "time its own dense epochs (before the first resize) would have taken, measured in one run.")
    for row in (r for r in rows if r.get("torch_pruning")):
        cuts = row["torch_pruning"]["cuts"]
        at = ", ".join(f"{cut['progress']:.2f}" for cut in cuts)
        matched = row["matched_flops_ratio"] if row["matched_flops_ratio"] is not None else cuts[-1]["target_flops_ratio"]
        lines.append(f"- {run_name(row)}: {len(cuts)} cut(s) at {at} of the steps, last global ratio "
                     f"{cuts[-1]['pruning_ratio']:.2f}, kept MACs {row['flops_ratio']:.3f} against {matched:.3f}"
                     f"{' (not at equal MACs)' if row['equal_macs'] is False else ''}.")
    for row in (r for r in rows if r["weight_sparsity"] is not None):
        lines.append(f"- {run_name(row)}: {row['weight_sparsity']:.1%} of conv/linear weights are zero, in dense "
                     "kernels: onnxruntime does every MAC, so no speed-up is expected or claimed.")
    return lines


def markdown(report: dict) -> str:
    budget, seeds = report["budget"], report["budget"]["seeds"]
    lines = [
        "# Pruning methods side by side",
        "",
        f"{budget['dataset']}, {budget['model']}, {budget['epochs']} epochs, train_subset {budget['train_subset']}; "
        f"targets {', '.join(f'{t:g}' for t in budget['targets'])}; seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(str(s) for s in seeds)}{' (--quick: a smoke run, not a result)' if report['quick'] else ''}. "
        f"Latency: onnxruntime CPU ({report['timing']['threads']} threads, {report['cpu']}), exported pruned "
        "ONNX, median over interleaved rounds (the models of one seed in one call); speed-up against the same "
        "seed's dense run in brackets; min / p95 beside.",
        "",
    ]
    if len(seeds) > 1:
        lines += [f"## Over {len(seeds)} seeds", "",
                  "Mean ± sample standard deviation over the seeds for accuracy and gap; means for the rest.", "",
                  *summary_table(report["summary"]), "", *verdicts(report["summary"]), "", "## Every run", ""]
    lines += [*runs_table(report["rows"]), "", *notes(report)]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy against kept FLOPs and against batch-1 latency: a curve per method across its targets
    (error bars: standard deviation over seeds), dense as a star, the Pareto front dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, seeds = report["summary"], len(report["budget"]["seeds"])
    panels = (("flops_ratio", "kept FLOPs (exported / dense)", "accuracy vs FLOPs"),
              ("latency_ms", "onnxruntime CPU latency, batch 1 (ms, median)", "accuracy vs measured latency"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"wspace": 0.25})
    for axis, (key, xlabel, title) in zip(axes, panels):
        def x_of(entry: dict, key: str = key) -> dict:  # the spread plotted on this axis
            return entry[key]["1"] if key == "latency_ms" else entry[key]

        by_method: dict[str, list[dict]] = {}
        for entry in summary:
            by_method.setdefault(entry["method"], []).append(entry)
        for method, entries in by_method.items():
            entries = sorted(entries, key=lambda e: x_of(e)["mean"])
            xs, ys = [x_of(e)["mean"] for e in entries], [e["test_accuracy"]["mean"] for e in entries]
            xerr = [x_of(e)["std"] or 0.0 for e in entries] if seeds > 1 else None
            yerr = [e["test_accuracy"]["std"] or 0.0 for e in entries] if seeds > 1 else None
            if method == "dense":
                axis.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="*", color="black", markersize=14, capsize=3,
                              label="dense (reference)", zorder=3)
                axis.axhline(ys[0], color="black", linewidth=0.6, linestyle=":")
                continue
            axis.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-", capsize=3, label=entries[0]["label"])
            for entry, x, y in zip(entries, xs, ys):
                if entry["target"] is not None:
                    axis.annotate(f"{entry['target']:g}", (x, y), textcoords="offset points", xytext=(5, -11),
                                  fontsize=7)
        front = pareto_front([(x_of(e)["mean"], e["test_accuracy"]["mean"]) for e in summary])
        axis.step([x for x, _ in front], [y for _, y in front], where="post", color="grey", linestyle="--",
                  linewidth=1, label="Pareto front")
        axis.set(xlabel=xlabel, ylabel="test accuracy", title=title)
        axis.grid(alpha=0.3)
        axis.margins(x=0.1, y=0.1)
    spread_note = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(f"{report['budget']['model']} on {report['budget']['dataset']}, {spread_note}; "
                 "numbers beside the points: kept-FLOPs targets", fontsize=10)
    handles, labels = axes[1].get_legend_handles_labels()  # below the panels: no curve hidden under it
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def write_report(report: dict, out: Path) -> None:
    write_json(out / "compare.json", report)
    write_text(out / "compare.md", markdown(report))
    plot(report, out / "compare.png")
