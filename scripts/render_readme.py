"""Render the result tables of README.md and docs/{accuracy,compare}.md from docs/results/*.json, between markers.

    python -m scripts.render_readme            # rewrite the documents in place
    python -m scripts.render_readme --check    # exit 1 if a document differs from what the files render

A block is `<!-- results:NAME -->` ... `<!-- /results:NAME -->`; its body is generated from
docs/results/NAME.json (tests/test_readme_results.py fails when it was edited by hand). Each table ends
with the command, commit, date and machine that produced its numbers. A missing file renders as a line
saying which command produces it, never as old numbers.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from polarprune.bench.compare_report import EQUAL_MACS, summary_table, verdicts
from polarprune.common.atomicio import write_text
from polarprune.common.results import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCUMENTS = (README, *(REPO_ROOT / "docs" / f"{name}.md"
                       for name in ("accuracy", "compare", "speed", "reliability")))  # with blocks
RESULTS_DIR = REPO_ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
PRODUCERS = {  # what to run when a file is missing
    "default-run": "`make train export`, then `make results`",
    "vit-run": "`make train export RUN=fmnist_vit`, `python -m bench.speedup --run runs/fmnist_vit --out "
               "reports/fmnist_vit/speedup.json`, then `python -m scripts.collect_results --only vit_run`",
    "export": "`make export`, then `make results`",
    "serving": "`make serve`, then `make results`",
    "compare": "`make compare`, then `make results`",
    "seeds": "the seed runs, then `python -m bench.seeds`",
    "seeds-amd": "the seed runs on an AMD machine, then `python -m bench.seeds --out docs/results/seeds_amd.json`",
    "seeds-tiers": "the seed runs of the tiered target term, then `python -m bench.seeds --out "
                   "docs/results/seeds_tiers.json`",
    "seeds-restart": "the seed runs with the learning rate restarted at the freeze, then `python -m bench.seeds "
                     "--out docs/results/seeds_restart.json`",
    "seeds-ramp": "the seed runs of the longer ramp, then `python -m bench.seeds --out docs/results/seeds_ramp.json`",
    "seeds-choices": "the runs of the fine-tune learning rate and target-0.3 study, then `python -m bench.seeds "
                     "--out docs/results/seeds_choices.json`",
    "seeds-finetune": "the runs of the fine-tune study, then `python -m bench.seeds --dense "
                      "'runs/study3/dense8_seed{seed}' --out docs/results/seeds_finetune.json`",
    "latency-target": "`python -m bench.latency_target`",
    "block-shock": "`python -m bench.block_shock --run <a finished dense run>`",
    "reliability": "`python -m serving soak`, `python -m serving faults` and `python -m tests.corrupt_inputs "
                   "--out reports/corrupt_inputs.json`, then `make results`",
}
PRODUCERS["reliability-summary"] = PRODUCERS["reliability"]
PRODUCERS["seeds-ceiling"] = ("the runs of the fine-tune's ceiling study, then `python -m bench.seeds --dense "
                              "'runs/study5/dense8_seed{seed}' --seeds 0,1,2,3,4 "
                              "--out docs/results/seeds_ceiling.json`")
PRODUCERS["seeds-split"] = ("the runs of the fine-tune's split study, then `python -m bench.seeds --dense "
                             "'runs/study6/dense8_seed{seed}' --seeds 0,1,2,3,4 --out docs/results/seeds_split.json`")
PRODUCERS["seeds-vit"] = ("the ViT runs of three seeds, then `python -m bench.seeds --dense "
                          "'runs/study5/vit_dense_seed{seed}' --out docs/results/seeds_vit.json`")
PRODUCERS["seeds-vit-b64"] = ("the ViT runs at batch 64, then `python -m bench.seeds --dense "
                              "'runs/study6/vit_dense_b64_seed{seed}' --out docs/results/seeds_vit_b64.json`")


class RenderError(Exception):
    """A marker names no known table, or a result file cannot be read."""


# blocks that render another block's file; a "-val" block is the validation view of its study's file
BLOCK_FILES = {"reliability-summary": "reliability.json"}


def study(block: str) -> str:
    """The block whose result file and producer a block shares: itself, or the study of a "-val" view."""
    return block.removesuffix("-val")


def file_name(block: str) -> str:
    block = study(block)
    return BLOCK_FILES.get(block, block.replace("-", "_") + ".json")


def provenance_line(document: dict, path: str) -> str:
    parts = []
    for stamp in document.get("sources", {}).values():
        machine = stamp["machine"]
        dirty = ", uncommitted changes" if stamp.get("dirty") else ""
        part = (f"`{stamp['command']}` (commit {str(stamp['commit'])[:10]}{dirty}, {stamp['date'][:10]}, "
                f"{machine['cpu']}, {machine['cores']} cores)")
        if part not in parts:
            parts.append(part)
    return f"Source: [`{path}`]({path}), from " + "; ".join(parts) + "."


def units(row: dict) -> str:
    closed = ", ".join(row["removed_blocks"]) or "none"
    narrowed = ", ".join(f"{unit} at {kept} of {width}" for unit, (kept, width) in row["narrowed"].items())
    return closed + (f" (+ {narrowed})" if narrowed else "")


def default_run_table(document: dict) -> list[str]:
    lines = ["| run | method | epochs | test accuracy | kept MACs | kept params | removed blocks | training s |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for row in document["rows"]:
        lines.append(f"| `{row['run']}` | {row['method']} | {row['epochs']} | {row['test_accuracy']:.4f} "
                     f"| {row['flops_ratio']:.3f} ({row['pruned_flops'] / 1e6:.2f}M) | {row['params_ratio']:.3f} "
                     f"({row['pruned_params'] / 1e3:.1f}k) | {units(row)} | {row['train_seconds']:.0f} |")
    dense = next((r for r in document["rows"] if r["role"] == "dense"), None)
    ours = next((r for r in document["rows"] if r["role"] == "polarized"), None)
    if dense and ours:
        gap = 100 * (dense["test_accuracy"] - ours["test_accuracy"])
        lines += ["", f"Accuracy gap to dense: {gap:.2f} points (one seed)."]
    return lines


def vit_run_table(document: dict) -> list[str]:
    """The transformer run: default_run_table's rows, what it kept, and its onnxruntime speed-up."""
    lines = default_run_table(document)
    heads = ", ".join(f"{name.removesuffix('.attn.qkv')} {kept}/{width}" for name, (width, kept) in document["heads"].items())
    widths = ", ".join(f"{name.removesuffix('.mlp.fc1')} {kept}/{width}" for name, (width, kept) in document["mlp_widths"].items())
    closed = [name for name, state in document["branches"].items() if state == "closed"]
    speed = document["speedup"]
    lines += ["", f"Heads kept: {heads}. MLP hidden widths kept: {widths}. Branches removed: "
                  f"{', '.join(closed) or 'none'} (of {len(document['branches'])}).",
              "", "| onnxruntime CPU, batch | dense ms | pruned ms | speed-up | efficiency |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['dense']:.3f} | {r['pruned']:.3f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} |"
              for r in speed["results"]]
    lines += ["", f"Speed-up measured by `python -m bench.speedup` ({speed['threads']} threads, {speed['cpu']}); "
                  "efficiency = speed-up / (dense MACs / pruned MACs)."]
    return lines


def export_table(document: dict) -> list[str]:
    onnx, macs = document["max_abs_diff_onnx"], document["onnx_macs"]
    return ["| check | value |", "|---|---:|",
            f"| max abs logit difference: pruned vs gated network / onnxruntime vs torch, dense / pruned | "
            f"{document['max_abs_diff_surgery']:.2g} / {onnx['dense']:.2g} / {onnx['pruned']:.2g} |",
            f"| MACs in the ONNX graphs, dense / pruned (training's mask.json: pruned) | {macs['dense']:,} / "
            f"{macs['pruned']:,} ({document['mask_pruned_flops']:,}) |",
            f"| kept MACs / kept params of the exported networks | {document['flops_ratio']:.3f} / "
            f"{document['params_ratio']:.3f} |"]


def ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def serving_table(document: dict) -> list[str]:
    dense, pruned = document["dense"], document["pruned"]
    lines = ["| metric | dense | pruned | pruned speed-up |", "|---|---:|---:|---:|",
             f"| top-1 accuracy ({document['accuracy_samples']} test images) | {number(dense['accuracy'], 4)} "
             f"| {number(pruned['accuracy'], 4)} | agreement {number(document['top1_agreement'], 4)} |"]
    for protocol, latency in dense["latency"].items():
        for key in ("p50_ms", "p99_ms"):
            d, p = latency.get(key), pruned["latency"].get(protocol, {}).get(key)
            lines.append(f"| {key[:3]} latency, {protocol}, batch 1 (ms) | {number(d)} | {number(p)} | {ratio(d, p)} |")
    lines.append(f"| peak throughput (inf/s) | {number(dense['peak_throughput'], 0)} "
                 f"| {number(pruned['peak_throughput'], 0)} | {ratio(pruned['peak_throughput'], dense['peak_throughput'])} |")
    load = document["load_test"]
    if load.get("requests") is not None:
        lines.append(f"| load test: requests / failed (both models) | | | {load['requests']} / {load['failures']} |")
    return lines


def compare_table(document: dict) -> list[str]:
    """make compare's summary per method and target (bench/compare_report.py's table, from its JSON)."""
    budget, seeds = document["budget"], document["budget"]["seeds"]
    spread = (f"Accuracy and gap: mean ± standard deviation over {len(seeds)} seeds; the rest: means."
              if len(seeds) > 1 else "One seed: no spread.")
    return [f"{budget['dataset']}, {budget['model']}, {budget['epochs']} epochs, train_subset "
            f"{budget['train_subset']}; kept-FLOPs targets {', '.join(f'{t:g}' for t in budget['targets'])}; "
            f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}. onnxruntime CPU, "
            f"{document['timing']['threads']} threads, the exported networks of one seed timed interleaved in one "
            f"process ({document['cpu']}); speed-up against the same seed's dense run.", "",
            *summary_table(document["summary"]), "", *verdicts(document["summary"]), "",
            f"{spread} Each Torch-Pruning row prunes to the kept MACs the polarized run reached at its target and "
            f"seed, and is marked not equal where it stays more than {EQUAL_MACS:g} away; polarized minus this: a win or a loss "
            "only beyond the seed spread. Activation density and FlipOut run once per seed with their own knobs "
            "(target -)."]


def recorded_runs(rows: list[dict]) -> str:
    """The command of the first run that recorded one, and which seeds' runs did not (made before runs
    stamped their metrics.json with their command and commit)."""
    stamped = [row for row in rows if row.get("run")]
    text = (f"`{stamped[0]['run']}` (seed {stamped[0]['seed']}, commit "
            f"{', '.join(sorted({str(row.get('commit'))[:10] for row in stamped}))})" if stamped else "")
    missing = [str(row["seed"]) for row in rows if not row.get("run")]
    if missing:
        text += (" and seed" if stamped else "seed") + f"{'s' if len(missing) > 1 else ''} {', '.join(missing)} " \
                "from before runs recorded their command"
    return text


def seeds_table(document: dict) -> list[str]:
    seeds = [row["seed"] for row in document["dense"]["seeds"]]
    rows = ["| training | accuracy (mean) | gap to dense, points | seed: gap | val accuracy (mean) | kept MACs "
            "| learned kept MACs | projection flipped | frozen (progress) | mask overlap | epochs of compute "
            "| train s (mean) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    runs = []

    def per_seed(arm: dict, key: str, fmt: str) -> str:
        values = [row.get(key) for row in arm["seeds"]]
        return "/".join(format(v, fmt) for v in values if v is not None) or "-"

    for arm in document["arms"]:
        spread = f" ± {arm['stdev_gap_points']:.2f}" if arm["stdev_gap_points"] is not None else ""
        vals = [row["val_accuracy"] for row in arm["seeds"] if row.get("val_accuracy") is not None]
        frozen = "/".join(f"{row['freeze']['progress']:.2f}{'' if row['freeze']['reason'] == 'in band' else '*'}"
                          for row in arm["seeds"] if row.get("freeze")) or "-"
        overlap = arm.get("mask_overlap")
        rows.append(f"| {arm['label']} | {arm['mean_accuracy']:.4f} | {arm['mean_gap_points']:.2f}{spread} | "
                    + ", ".join(f"{row['seed']}: {row['gap_points']:.2f}" for row in arm["seeds"])
                    + (f" | {statistics.fmean(vals):.4f}" if vals else " | -")
                    + f" | {arm['mean_flops_ratio']:.3f} | {per_seed(arm, 'learned_flops_ratio', '.3f')} | "
                    + f"{per_seed(arm, 'flipped_flops_share', '.3f')} | {frozen} | "
                    + (f"{overlap:.2f}" if overlap is not None else "-") + " | "
                    + "/".join("unknown" if e is None else str(e) for e in arm["compute_epochs"])
                    + f" | {arm['mean_train_seconds']:.0f} |")
        runs.append(f"{arm['label']}: {recorded_runs(arm['seeds'])}")
    rows += ["", learned_target_goal(document)]
    dense = document["dense"]
    overlaps = [f"{o['label']}: {o['jaccard']:.2f} (`{o['runs'][0]}` and `{o['runs'][1]}`)"
                for o in document.get("overlaps", [])]
    rows += ["", "Mask overlap (Jaccard) " + "; ".join(overlaps) + "."] if overlaps else []
    return rows + ["", f"Seeds {', '.join(map(str, seeds))}; gap: mean ± standard deviation over the seeds. Per-seed "
                       "columns list the seeds in order; a freeze marked * came at freeze_fraction, the latest, "
                       "not when the learned ratio held the band. Mask overlap: mean Jaccard index of the kept "
                       "channels and blocks over every pair of seeds. Dense "
                       f"reference: mean accuracy {dense['mean_accuracy']:.4f}, {recorded_runs(dense['seeds'])}. "
                       "The runs: " + "; ".join(runs) + "."]


def seeds_validation_table(document: dict) -> list[str]:
    """Per-seed validation accuracy of every arm of a seeds file (what choices are made on) and the mean
    training accuracy over each run's last epoch ("-": a seed the arm did not run, or a run without a log)."""
    seeds = [row["seed"] for row in document["dense"]["seeds"]]
    fitted = any(row.get("train_accuracy") is not None
                 for arm in document["arms"] + [document["dense"]] for row in arm["seeds"])
    rows = ["| training | " + " | ".join(f"val, seed {seed}" for seed in seeds) + " | val (mean) |"
            + (" training accuracy, last epoch (mean) |" if fitted else ""),
            "|---|" + "---:|" * (len(seeds) + 1 + fitted)]

    def mean(values: list[float | None], fmt: str) -> str:
        known = [v for v in values if v is not None]
        return format(statistics.fmean(known), fmt) if known else "-"

    dense = {"label": "the dense reference", "seeds": document["dense"]["seeds"]}
    for arm in document["arms"] + ([dense] if any("val_accuracy" in row for row in dense["seeds"]) else []):
        by_seed = {row["seed"]: row for row in arm["seeds"]}
        vals = [by_seed.get(seed, {}).get("val_accuracy") for seed in seeds]
        rows.append(f"| {arm['label']} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals)
                    + f" | {mean(vals, '.4f')} |"
                    + (f" {mean([row.get('train_accuracy') for row in arm['seeds']], '.3f')} |" if fitted else ""))
    return rows + ["", "Validation: the training images each run holds out (`val_size`). The arms and their "
                       "commands are those of the table above (same result file)."]


def block_shock_table(document: dict) -> list[str]:
    rows = ["| blocks closed | branch output zero (a closed block) | branch output its per-channel mean |",
            "|---|---:|---:|",
            f"| none (the trained network) | {document['intact_val_accuracy']:.4f} | - |"]
    rows += [f"| {', '.join(row['blocks'])} | {row['zero']:.4f} | {row['mean']:.4f} |"
             for row in document["single"] + document["sets"]]
    return rows + ["", f"Validation accuracy of `{document['run']}` on its {document['val_images']:,} validation "
                       f"images, in eval mode, before any training step; the means over {document['mean_images']:,} "
                       "training images."]


LEARNED_WITHIN, FLIPPED_AT_MOST = 0.03, 0.03  # issue 19's goal for every polarized run


def learned_target_goal(document: dict) -> str:
    """Whether the gates learned the target in every polarized run: the learned ratio at the freeze within
    LEARNED_WITHIN of the target, and the projection flipping at most FLIPPED_AT_MOST of the dense MACs."""
    runs = [(arm["label"], row) for arm in document["arms"] for row in arm["seeds"]
            if row.get("learned_flops_ratio") is not None and row.get("target_flops_ratio") is not None]
    missed = [f"{label}, seed {row['seed']} (learned {row['learned_flops_ratio']:.3f}, flipped "
              f"{row['flipped_flops_share']:.3f})" for label, row in runs
              if abs(row["learned_flops_ratio"] - row["target_flops_ratio"]) > LEARNED_WITHIN
              or row["flipped_flops_share"] > FLIPPED_AT_MOST]
    cpus = sorted({row["cpu"] for _, row in runs if row.get("cpu")})
    return (f"Learned target (learned ratio within {LEARNED_WITHIN} of the target, projection flipping at most "
            f"{FLIPPED_AT_MOST:.0%} of the dense MACs): met in {len(runs) - len(missed)} of {len(runs)} polarized "
            "runs" + (f"; missed: {'; '.join(missed)}" if missed else "") + "."
            + (f" CPU of the runs: {', '.join(cpus)}." if cpus else ""))


def latency_target_table(document: dict) -> list[str]:
    rows = ["| run | target | test accuracy | kept MACs | predicted latency ratio | measured latency ratio |",
            "|---|---|---:|---:|---:|---:|"]
    for key, label, target in (("flops", "FLOPs-targeted", f"kept MACs {document['target_flops_ratio']:.3f}"),
                               ("latency", "latency-targeted", f"latency {document['target_latency_ratio']:.4f}")):
        run = document["runs"][key]
        rows.append(f"| {label} | {target} | {run['test_accuracy']:.4f} | {run['flops_ratio']:.3f} | "
                    f"{run['predicted_latency_ratio']:.3f} | {run['measured_latency_ratio']:.3f} |")
    in_run = document["runs"]["latency"].get("in_run_latency") or {}
    note = (f" The latency run measured {in_run['measured_ratio']:.3f} itself at its end ({in_run['rounds']} rounds)."
            if in_run else "")
    return rows + ["", f"onnxruntime CPU, batch {document['batch']}, {document['threads']} threads, "
                       f"{document['rounds']} interleaved rounds (medians); the latency target is the FLOPs run's "
                       f"first measured ratio.{note}"]


def reliability_table(document: dict) -> list[str]:
    soak, faults, corrupt = document["soak"], document["faults"], document["corrupt_inputs"]
    memory, p99 = soak["memory"], soak["p99"]
    stub, exports = faults["stub_kill"], faults["export_kill"]
    servers = faults["server_kill"]
    growth = ("-" if memory.get("growth_pct") is None else
              f"{memory['growth_pct']:+.2f}% ({memory['after_warmup_mb']:.1f} -> {memory['end_mb']:.1f} MB)")
    ratios = " / ".join("-" if p99[role]["last_over_first"] is None else f"{p99[role]['last_over_first']:.2f}x "
                        f"({p99[role]['first_ms']:.1f} -> {p99[role]['last_ms']:.1f} ms)" for role in ("dense", "pruned"))
    load = soak.get("load_average") or {}
    lines = ["| what | measured | goal |", "|---|---|---|",
             f"| soak: {soak['minutes']:.1f} min, {soak['clients']} clients ({' + '.join(soak['protocols'])}, batch "
             f"{'/'.join(map(str, soak['batch_sizes']))}) on dense and pruned | {soak['requests']:,} requests, "
             f"**{soak['failures']} failed** | 0 failed |",
             f"| memory growth after the warm-up minute (server + stubs) | {growth} | < 5% |",
             f"| p99, last minute over first, dense / pruned | {ratios} | <= 1.5x |",
             f"| stub kill: `{stub['killed_model']}`'s stub SIGKILLed under {stub['clients']} clients | "
             f"{stub['failed_killed_model']} failed (in flight; {stub['clients_of_killed_model']} clients), other model "
             f"{stub['failed_other_model']} failed of {stub['requests_other_model']:,}; serving again after "
             f"{stub['recovery_s']:.1f} s | only in-flight fail, < 30 s, other 0 |",
             "| server kill under `python -m serving soak` | "
             + "; ".join(f"{entry['mode']}: exit {entry['exit_code']} after {entry['seconds_to_exit']:.1f} s, "
                         f"{entry['stderr_lines']} line, {entry['processes_left']} processes left" for entry in servers)
             + " | exit 1, one line, < 10 s, none left |",
             f"| export kill: `python -m export` SIGKILLed {exports['kills']} times ({exports['kills_while_writing']} while "
             f"writing the repository) under a live server | **{exports['partial_loads']} partial versions loaded**; "
             f"next export exit {exports['next_export_code']} | 0 partial loads |",
             f"| corrupt inputs: {len(corrupt['files'])} files x {', '.join(corrupt['damages'])} | "
             f"**{corrupt['clean']} of {corrupt['cases']}** refused with one line naming the file, exit 2, nothing "
             f"written | >= 60, all |"]
    note = (f"Machine load average (1 min) {load['start'][0]:.1f} at the soak's start and {load['end'][0]:.1f} at its "
            f"end, on {soak['cpu_cores']} shared cores (its 64 client threads included)." if load else "")
    verdict = "The soak's own checks: " + ("all passed." if soak["ok"] else "; ".join(soak["problems"]) + ".")
    return lines + ["", f"{note} {verdict}".strip()]


def reliability_summary(document: dict) -> list[str]:
    """The README's few lines of reliability.json (docs/reliability.md has the table)."""
    soak, faults, corrupt = document["soak"], document["faults"], document["corrupt_inputs"]
    stub, exports = faults["stub_kill"], faults["export_kill"]
    growth = soak["memory"].get("growth_pct")
    ratios = " / ".join("-" if soak["p99"][r]["last_over_first"] is None else f"{soak['p99'][r]['last_over_first']:.2f}x"
                        for r in ("dense", "pruned"))
    servers = " / ".join(f"exit {e['exit_code']} in {e['seconds_to_exit']:.1f} s, {e['processes_left']} left"
                         for e in faults["server_kill"])
    return [f"- Soak, {soak['minutes']:.0f} min, {soak['clients']} clients: {soak['requests']:,} requests, "
            f"**{soak['failures']} failed**; memory {'-' if growth is None else f'{growth:+.2f}%'} after the warm-up; "
            f"p99 last minute over first {ratios} (dense / pruned).",
            f"- Stub SIGKILLed: {stub['failed_killed_model']} in-flight requests failed, serving again after "
            f"{stub['recovery_s']:.1f} s, the other model {stub['failed_other_model']} failed. Server SIGKILLed under "
            f"the soak: {servers} (attached / own server).",
            f"- Export SIGKILLed {exports['kills']} times under a live server: **{exports['partial_loads']} partial "
            f"versions loaded**. Corrupt inputs: **{corrupt['clean']} of {corrupt['cases']}** refused cleanly."]


TABLES = {"default-run": default_run_table, "vit-run": vit_run_table, "export": export_table, "serving": serving_table,
          "compare": compare_table, "seeds": seeds_table, "seeds-amd": seeds_table, "seeds-tiers": seeds_table,
          "seeds-restart": seeds_table, "seeds-choices": seeds_table, "seeds-ramp": seeds_table,
          "seeds-finetune": seeds_table, "seeds-ceiling": seeds_table, "seeds-split": seeds_table,
          "seeds-vit": seeds_table, "seeds-vit-b64": seeds_table, "block-shock": block_shock_table,
          "latency-target": latency_target_table, "reliability": reliability_table,
          "reliability-summary": reliability_summary}
# every seed study has a validation view of the same file
TABLES.update({f"{name}-val": seeds_validation_table for name, table in list(TABLES.items()) if table is seeds_table})


def render_block(name: str, results_dir: Path = RESULTS_DIR) -> str:
    if name not in TABLES:
        raise RenderError(f"README marker results:{name} names no table; known: {', '.join(TABLES)}")
    path = results_dir / file_name(name)
    shown = f"docs/results/{path.name}"
    if not path.is_file():
        return f"*Not measured yet: `{shown}` does not exist; {PRODUCERS[study(name)]} writes it.*\n"
    try:
        document = json.loads(path.read_text())
        lines = TABLES[name](document)
        source = provenance_line(document, shown)
        if lines[-2] == "" and not lines[-1].startswith("|"):  # a closing sentence: the source joins it
            lines[-1] += " " + source
        else:
            lines += ["", source]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RenderError(f"{path}: cannot render table {name} ({type(error).__name__}: {error}); "
                          "re-create it with make results") from None
    return "\n".join(lines) + "\n"


def render(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """`text` with every results block regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name"), results_dir) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.render_readme", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when a document is stale")
    parser.add_argument("--readme", type=Path, action="append",
                        help="a document to render (repeatable; default: README.md, docs/accuracy.md, docs/compare.md)")
    args = parser.parse_args(argv)
    stale = []
    for document in args.readme or DOCUMENTS:
        try:
            text = document.read_text()
            rendered = render(text)
        except (OSError, RenderError) as error:
            print(f"render_readme: error: {error}", file=sys.stderr)
            return 2
        if rendered == text:
            continue
        if args.check:
            stale.append(document)
        else:
            write_text(document, rendered)
            print(f"rewrote the result tables in {document}")
    for document in stale:
        print(f"{document}: result tables differ from docs/results/ (run make results)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
