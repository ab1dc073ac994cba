"""README result tables are generated from docs/results/*.json: a hand edit, a stampless source or a
table with no file behind it fails here (regenerate with `make results`)."""
from __future__ import annotations

import json
import re

import pytest

from polarprune.common.results import REPO_ROOT, ResultError, command_line, provenance, read_source, write_result
from scripts import render_readme
from scripts.collect_results import collect

STAMP = {"command": "python -m training --config configs/fmnist_resnet20.yaml", "commit": "0123456789abcdef",
         "dirty": False, "date": "2026-12-01T12:00:00+00:00", "machine": {"cpu": "Test CPU", "cores": 2}}


def readme() -> str:
    return render_readme.README.read_text()


@pytest.mark.parametrize("document", render_readme.DOCUMENTS, ids=lambda path: path.name)
def test_result_tables_are_what_the_result_files_render(document):
    text = document.read_text()
    assert render_readme.BLOCK.search(text), f"{document.name} has no <!-- results:NAME --> blocks"
    assert render_readme.render(text) == text, (
        f"{document.name}'s result tables differ from docs/results/*.json: numbers are never edited by hand; "
        "re-run the command that measures them, then `make results`")


def test_a_hand_edited_number_is_caught():
    text = readme()
    blocks = [m for m in render_readme.BLOCK.finditer(text) if re.search(r"\d\.\d", m.group("body"))]
    assert blocks, "no rendered table with numbers in README.md"
    body = blocks[0].group("body")
    digit = re.search(r"\d\.(\d)", body)
    changed = body[:digit.start(1)] + str((int(digit.group(1)) + 1) % 10) + body[digit.end(1):]
    edited = text.replace(body, changed, 1)
    assert edited != text and render_readme.render(edited) != edited


def test_every_result_file_has_a_block_and_every_block_a_table():
    names = {m.group("name") for document in render_readme.DOCUMENTS
             for m in render_readme.BLOCK.finditer(document.read_text())}
    assert names <= set(render_readme.TABLES)
    # Files written by `make results` (they carry "sources"); benchmarks may keep other result files here.
    collected = {p.name for p in (REPO_ROOT / "docs" / "results").glob("*.json")
                 if "sources" in json.loads(p.read_text())}
    assert collected <= {render_readme.file_name(name) for name in names}, "a result file no document shows"


def test_missing_result_file_says_how_to_produce_it(tmp_path):
    text = "a\n<!-- results:serving -->\nold numbers 1.23\n<!-- /results:serving -->\nb\n"
    rendered = render_readme.render(text, tmp_path)
    assert "old numbers" not in rendered and "Not measured yet" in rendered and "make serve" in rendered


@pytest.mark.parametrize("block", sorted(render_readme.TABLES))
def test_every_block_names_its_producer_when_its_file_is_missing(tmp_path, block):
    rendered = render_readme.render_block(block, tmp_path)
    assert rendered.startswith("*Not measured yet") and render_readme.file_name(block) in rendered, rendered


def test_unknown_block_is_refused():
    with pytest.raises(render_readme.RenderError, match="results:nonsense"):
        render_readme.render("<!-- results:nonsense -->\n<!-- /results:nonsense -->\n")


def test_source_without_provenance_is_refused(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"test_accuracy": 0.9}))
    with pytest.raises(ResultError, match=r"metrics\.json: no provenance"):
        read_source(path)
    with pytest.raises(ResultError, match="not found"):
        read_source(tmp_path / "absent.json")


def test_provenance_names_command_commit_date_and_machine():
    stamp = provenance()
    assert set(stamp) >= {"command", "commit", "dirty", "date", "machine"}
    assert stamp["machine"]["cores"] >= 1 and stamp["machine"]["cpu"]
    assert command_line([str(REPO_ROOT / "training" / "__main__.py"), "--set", "a=b c"]) == \
        "python -m training --set 'a=b c'"
    assert command_line([str(REPO_ROOT / "bench" / "compare.py"), "--quick"]) == "python -m bench.compare --quick"


def metrics(method: str, accuracy: float, kept: dict, removed: list[str]) -> dict:
    return {"method": method, "epochs": 4, "test_accuracy": accuracy, "dense_flops": 1000, "pruned_flops": 500,
            "flops_ratio": 0.5, "dense_params": 100, "pruned_params": 60, "params_ratio": 0.6,
            "removed_blocks": removed, "train_seconds": 12.0, "kept_channels": kept, "provenance": STAMP}


def test_collect_then_render_a_run(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    for name, doc in {"r": metrics("polarized", 0.87, {"layer1.0": 16, "layer2.0": 16}, ["layer1.1"]),
                      "r_dense": metrics("dense", 0.88, {"layer1.0": 16, "layer1.1": 16, "layer2.0": 32}, [])}.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps(doc))
    report = {"run": "r", "dense_source": "dense run", "max_abs_diff_surgery": 1e-6,
              "max_abs_diff_onnx": {"dense": 2e-6, "pruned": 3e-6}, "flops_ratio": 0.5, "params_ratio": 0.6,
              "dense": {"onnx_macs": 1000}, "pruned": {"onnx_macs": 500}, "mask_flops": {"pruned_flops": 500},
              "provenance": STAMP}
    (runs / "r" / "export_report.json").write_text(json.dumps(report))
    written = collect("r", runs, tmp_path / "reports", out)
    assert sorted(p.name for p in written) == ["default_run.json", "export.json"]
    stored = json.loads((out / "default_run.json").read_text())
    assert stored["sources"][str(runs / "r" / "metrics.json")] == STAMP
    assert stored["rows"][0]["narrowed"] == {"layer2.0": [16, 32]}
    table = render_readme.render_block("default-run", out)
    assert "| 0.8700 |" in table and "layer1.1 (+ layer2.0 at 16 of 32)" in table
    assert "Accuracy gap to dense: 1.00 points (one seed). Source:" in table
    assert "commit 0123456789" in table and "Test CPU, 2 cores" in table
    assert "| 1,000 / 500 (500) |" in render_readme.render_block("export", out)


def compare_report(seeds: list[int]) -> dict:
    """compare.json as bench/compare.py writes it (its rows and summary from bench/compare_report.py)."""
    from polarprune.bench.compare_report import row_for, seed_summary

    def latency(ms: float) -> dict:
        return {b: {"median_ms": ms * int(b), "p95_ms": 2 * ms * int(b), "min_ms": ms * int(b)} for b in ("1", "64")}

    rows = []
    for seed in seeds:
        for method, target, accuracy, ms in (("dense", None, 0.9, 1.0), ("polarized", 0.5, 0.88 - 0.02 * seed, 0.5),
                                             ("tp_l1", 0.5, 0.83 - 0.02 * seed, 0.5)):
            metrics = {"test_accuracy": accuracy, "flops_ratio": 1.0 if target is None else 0.49,
                       "pruned_flops": 100, "pruned_params": 80, "dense_params": 100, "train_seconds": 60.0}
            rows.append(row_for({"method": method, "label": method, "target": target, "seed": seed,
                                 "run": f"runs/compare/seed{seed}/{method}"}, metrics, latency(ms), latency(1.0), 0.9,
                                0.49 if method == "tp_l1" else None))
    return {"quick": False, "cpu": "Test CPU", "wall_seconds": 600.0, "provenance": STAMP,
            "timing": {"threads": 2, "batches": [1, 64], "rounds": 300, "warmup": 5},
            "budget": {"dataset": "fashion_mnist", "model": "resnet20", "epochs": 4, "train_subset": 20000,
                       "targets": [0.5], "seeds": seeds},
            "rows": rows, "summary": seed_summary(rows)}


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]], ids=["one seed", "three seeds"])
def test_collect_then_render_the_comparison(tmp_path, seeds):
    from scripts.collect_results import compare_result
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.json").write_text(json.dumps(compare_report(seeds)))
    data, sources = compare_result(tmp_path)
    assert [(row["method"], row["target"], row["seed"]) for row in data["rows"]][:2] == [("dense", None, 0),
                                                                                        ("polarized", 0.5, 0)]
    write_result(tmp_path / "compare.json", data, sources)
    table = render_readme.render_block("compare", tmp_path)
    if len(seeds) == 1:
        assert "| polarized | 0.5 | 1 | 0.8800 | 2.00 | 0.490 | 0.80 | 60 | 0.500 (2.00x) | 32.00 (2.00x) | - |" in table
        assert "One seed: no spread." in table and "0.8800 ±" not in table
        assert "against tp_l1 at target 0.5: a tie, +5.00 points (spread 0.00)" in table  # one seed wins nothing
    else:  # 0.88, 0.86, 0.84: mean 0.86, standard deviation 0.02; gap 4 +- 2 points
        assert "| polarized | 0.5 | 3 | 0.8600 ± 0.0200 | 4.00 ± 2.00 | 0.490 |" in table
        assert "mean ± standard deviation over 3 seeds" in table
        assert "| 5.00 ± 0.00: win |" in table  # 5 points ahead on every seed, each side's spread 2 points
        assert "against tp_l1 at target 0.5: polarized wins, +5.00 points (spread 2.00)" in table
    assert "Source: [`docs/results/compare.json`]" in table


def test_an_old_comparison_without_a_summary_is_refused(tmp_path):
    from scripts.collect_results import compare_result
    old = compare_report([0])
    del old["summary"]
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.json").write_text(json.dumps(old))
    with pytest.raises(ResultError, match="missing summary"):
        compare_result(tmp_path)


def test_collect_refuses_incomplete_sources_and_a_quick_comparison(tmp_path):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    for name in ("r", "r_dense"):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps(metrics("dense", 0.9, {}, [])))
    (runs / "r" / "export_report.json").write_text(json.dumps({"provenance": STAMP}))
    with pytest.raises(ResultError, match=r"export_report\.json: missing run, dense_source"):
        collect("r", runs, reports, tmp_path / "out")
    (reports / "compare").mkdir(parents=True)
    (reports / "compare" / "compare.json").write_text(json.dumps({"quick": True, "provenance": STAMP}))
    with pytest.raises(ResultError, match="--quick"):
        from scripts.collect_results import compare_result
        compare_result(reports)


def test_write_result_is_atomic_and_keeps_sources(tmp_path):
    document = write_result(tmp_path / "x.json", {"value": 1}, {"a.json": STAMP})
    assert json.loads((tmp_path / "x.json").read_text()) == document == {"value": 1, "sources": {"a.json": STAMP}}
    assert not list(tmp_path.glob(".x.json.*"))


def test_collect_then_render_reliability(tmp_path):
    """reports/<run>/soak.json, faults.json and reports/corrupt_inputs.json -> reliability.json -> the
    docs/reliability.md table and the README's summary."""
    from scripts.collect_results import reliability_result
    reports = tmp_path / "reports"
    (reports / "r").mkdir(parents=True)
    role = {"requests": 10, "failures": 0, "p50_ms": 1.0, "p99_ms": 2.0}
    soak = {"minutes": 10.0, "clients": 64, "protocols": ["http", "grpc"], "batch_sizes": [1, 4, 16],
            "interval_s": 60.0, "requests": 1234567, "failures": 0, "failures_by_reason": {},
            "p99": {r: {"first_ms": 2.0, "last_ms": 2.4, "last_over_first": 1.2} for r in ("dense", "pruned")},
            "load_average": {"start": [3.0, 2, 1], "end": [4.0, 3, 2]}, "cpu_cores": 2, "ok": True, "problems": [],
            "memory": {"after_warmup_mb": 200.0, "end_mb": 201.0, "growth_pct": 0.5, "peak_mb": 202.0,
                       "warmup_s": 60.0, "leak": False},
            "intervals": [{"start_s": 0, "memory_total_mb": 200.0, "roles": {"dense": role, "pruned": role}}],
            "provenance": STAMP}
    faults = {"stub_kill": {"killed_model": "r_dense", "clients": 64, "clients_of_killed_model": 32,
                            "failed_killed_model": 7, "failed_other_model": 0, "requests_other_model": 5000,
                            "recovery_s": 2.5, "reloads": 1, "only_in_flight_failed": True},
              "server_kill": [{"mode": m, "exit_code": 1, "seconds_to_exit": s, "stderr_lines": 1, "message": "x",
                               "processes_left": 0, "stubs_outlived_the_server": 0, "ok": True}
                              for m, s in (("attached (--url)", 3.3), ("server started by the tool", 1.8))],
              "export_kill": {"kills": 10, "kills_while_writing": 5, "finished_before_the_kill": 0,
                              "export_seconds": 30.0, "partial_loads": 0, "reload_failures": 0, "request_failures": 0,
                              "next_export_code": 0, "ok": True},
              "checks": {"stub kill": True}, "provenance": STAMP}
    corrupt = {"cases": 61, "clean": 61, "files": ["a", "b"], "damages": ["truncated", "NaN"],
               "results": [{"file": "a", "damage": "truncated", "clean": True}], "provenance": STAMP}
    for path, document in ((reports / "r" / "soak.json", soak), (reports / "r" / "faults.json", faults),
                           (reports / "corrupt_inputs.json", corrupt)):
        path.write_text(json.dumps(document))
    data, sources = reliability_result(reports, "r")
    assert len(sources) == 3 and data["corrupt_inputs"]["not_clean"] == []
    write_result(tmp_path / "reliability.json", data, sources)
    table = render_readme.render_block("reliability", tmp_path)
    assert "| 1,234,567 requests, **0 failed** | 0 failed |" in table
    assert "+0.50% (200.0 -> 201.0 MB)" in table and "1.20x (2.0 -> 2.4 ms) / 1.20x" in table
    assert "7 failed (in flight; 32 clients), other model 0 failed of 5,000; serving again after 2.5 s" in table
    assert "**0 partial versions loaded**" in table and "**61 of 61**" in table
    assert "| corrupt inputs: 2 files x truncated, NaN |" in table
    assert "load average (1 min) 3.0 at the soak's start" in table and "Source: [`docs/results/reliability.json`]" in table
    summary = render_readme.render_block("reliability-summary", tmp_path)
    assert "1,234,567 requests, **0 failed**; memory +0.50% after the warm-up" in summary
    assert "exit 1 in 3.3 s, 0 left / exit 1 in 1.8 s, 0 left" in summary
    (reports / "corrupt_inputs.json").unlink()
    with pytest.raises(ResultError, match="corrupt_inputs.json: not found"):
        reliability_result(reports, "r")
