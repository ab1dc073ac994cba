"""The corrupt-input table (tests/corrupt_inputs.py): every file a stage reads x every way it can be wrong,
each refused by the command that reads it with one line naming the file, exit 2, nothing written.

Plus the one file that is never refused: the latency cache is derived data, so a damaged one is noted
(naming it) and rebuilt, and the rebuilt file replaces it whole."""
from __future__ import annotations

import json
import re

import pytest

from corrupt_inputs import BYTE_DAMAGE, CASES, DAMAGE_KINDS, damage_kind, run_case
from export_fixtures import single_torch_thread  # noqa: F401 (autouse fixture)


def test_the_table_covers_every_file_and_damage_the_issue_names():
    files = {case.file for case in CASES}
    assert len(CASES) >= 60 and len({case.id for case in CASES}) == len(CASES)
    for file in ("config YAML", "checkpoint.pt", "network.pt", "mask.json", "program .pt2", "model.onnx", "config.pbtxt",
                 "result metrics.json", "image folder PNG"):
        assert file in files
        assert {c.damage for c in CASES if c.file == file} >= set(BYTE_DAMAGE), file
    kinds = {damage_kind(case.damage) for case in CASES}  # every case is of a named kind
    assert kinds == set(DAMAGE_KINDS), kinds


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_corrupt_input_is_refused_with_one_line_naming_the_file(case, tmp_path):
    outcome = run_case(case, tmp_path)
    assert outcome.clean, (outcome.problems, outcome.stderr)


@pytest.fixture(scope="module")
def latency_scene():
    from polarprune.training.graph import trace_network
    from polarprune.training.latency import LatencySettings
    from polarprune.training.networks import NetworkInfo, build_network
    info = NetworkInfo("resnet20", 1, 10, (16, 16))
    return trace_network(build_network(info), info.example_input()), LatencySettings


LATENCY_CASES = {**{name: damage for name, damage in BYTE_DAMAGE.items()},
                 "wrong shape (a list)": lambda data: b"[]",
                 "wrong version": lambda data: re.sub(rb'"version": \d+', b'"version": 99', data, count=1),
                 "NaN value": lambda data: data.replace(b'"dense_ms": ', b'"dense_ms": NaN, "was": ', 1)}


@pytest.mark.parametrize("damage", LATENCY_CASES)
def test_damaged_latency_cache_is_named_and_rebuilt_whole(latency_scene, damage, tmp_path, monkeypatch):
    from polarprune.training import latency
    graph, settings_class = latency_scene
    settings = settings_class(cache=str(tmp_path / "cache"))
    calls = []
    real_measure = latency.LatencyTable

    def measure(graph, round_to, settings):  # a stand-in table: timing the layers takes a minute
        calls.append(1)
        return real_measure(latency.table_key(graph, round_to, settings), {}, 0.1, 1.0, 0.9, 0.0)
    monkeypatch.setattr(latency, "measure_table", measure)
    table, source = latency.load_or_measure(graph, 16, settings, log=lambda message: None)
    path = latency.cache_path(settings, table.key)
    good = path.read_bytes()
    path.write_bytes(LATENCY_CASES[damage](good))
    notes = []
    rebuilt, source = latency.load_or_measure(graph, 16, settings, log=notes.append)
    assert source == "measured" and len(calls) == 2
    assert notes[0].startswith(f"latency table cache: {path}: ") and "measuring it again" in notes[0], notes
    assert json.loads(path.read_text()) == json.loads(good)  # replaced whole, by the new table
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
