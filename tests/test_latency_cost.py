"""cost: latency: the per-layer latency table, its cache, its interpolation, its gradient, its config
errors, and a short run that reports predicted beside measured latency. No assertion on absolute times."""
import copy
import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from polarprune.training.checkpoint import load_checkpoint
from polarprune.training.config import ConfigError, make_config
from polarprune.training.gating import GatedNetwork, costed_layers, group_units, mask_cost
from polarprune.training.graph import Layer, trace_network
from polarprune.training.latency import (LatencyCost, LatencySettings, LatencyTable, graphs_to_time, axis_widths,
                                         cache_path, calibration_masks, grid_value, layer_bytes, load_or_measure,
                                         table_key)
from polarprune.training.loop import train
from polarprune.training.mask import Mask, kept_widths
from polarprune.training.methods import RunContext, make_method
from polarprune.training.methods.polarized import PolarizedSettings
from polarprune.training.networks import NetworkInfo, build_network
from polarprune.training.onnx_graph import network_graph
from user_networks import MobileNetV2

INFO = NetworkInfo("resnet20", 1, 10, (8, 8))
INFO_28 = NetworkInfo("resnet20", 1, 10, (28, 28))  # Fashion-MNIST's
QUICK_TIMING = dict(rounds=30, budget_s=3.0)  # tests check structure, not numbers: few rounds


@pytest.fixture(scope="module")
def graph():
    return trace_network(build_network(INFO), INFO.example_input())


@pytest.fixture(scope="module")
def built(graph, tmp_path_factory):
    settings = LatencySettings(cache=str(tmp_path_factory.mktemp("latency_cache")), **QUICK_TIMING)
    table, source = load_or_measure(graph, 16, settings, log=lambda _: None)
    return settings, table, source


def test_table_prices_every_costed_layer_on_its_round_to_grid(graph, built):
    settings, table, source = built
    assert source == "measured"
    assert set(table.layers) == set(costed_layers(graph))
    assert table.layers["layer3.0.conv1"]["out_widths"] == [16, 32, 48, 64]   # a prunable output: round_to steps
    assert table.layers["layer3.0.conv1"]["in_widths"] == [32]                # the residual stream: full only
    assert table.layers["layer3.1.conv2"]["in_widths"] == [16, 32, 48, 64]
    for entry in table.layers.values():
        shape = (len(entry["in_widths"]), len(entry["out_widths"]))
        assert len(entry["ms"]) == shape[0] and all(len(row) == shape[1] for row in entry["ms"])
        assert all(v >= 0 for row in entry["ms"] for v in row)
    assert table.other_ms == pytest.approx(table.dense_ms - sum(e["ms"][-1][-1] for e in table.layers.values()))
    assert table.other_ms >= table.floor_ms - 1e-9  # the layers never claim more than the network's time
    assert {"runtime", "onnxruntime", "provider", "machine", "batch", "threads", "network"} <= set(table.key)
    assert table.key["machine"]["logical_cores"] >= 1 and table.key["threads"] == 2
    assert len(table.calibration["measured_ratios"]) == table.calibration["networks"]


def test_the_grid_times_only_widths_the_gates_can_keep(graph):
    """One round_to rule: the table's axes and calibration masks use the gates' units (unit_sizes), so a
    64-wide group at round_to 24 (units 24 + 40) is timed at 24, 40 and 64, never at 48."""
    units = group_units(graph, 24)
    assert units["layer3.0.conv1"] == [24, 40] and kept_widths([24, 40]) == [24, 40, 64]
    assert axis_widths(graph, graph.layers["layer3.0.conv1"].out_layout, 24) == [24, 40, 64]
    assert axis_widths(graph, graph.layers["layer1.0.conv1"].out_layout, 24) == [16]  # one unit: stays whole
    masks = calibration_masks(graph, 24)
    assert len(masks) > 2
    for mask in masks:
        assert all(len(kept) in kept_widths(units[group]) for group, kept in mask.kept_channels.items())


def test_the_table_times_the_graphs_export_writes(graph):
    """One exporter: the networks the table times are export's ONNX graphs, and each single layer, which
    the faster TorchScript exporter writes, is the same one operator the shared exporter gives it."""
    settings = LatencySettings(batch=1)
    _, graphs = graphs_to_time(graph, 16, settings, calibration_masks(graph, 16, count=1))
    ops = lambda model: [node.op_type for node in model.graph.node]  # noqa: E731
    exported = network_graph(copy.deepcopy(graph.module), tuple(graph.input_shape), batch=1)
    assert ops(onnx.load_from_string(graphs["dense"])) == ops(exported)
    for module, shape, op in ((torch.nn.Conv2d(16, 32, 3, 2, 1), (16, 8, 8), "Conv"),
                              (torch.nn.Conv2d(32, 32, 3, 1, 1, groups=32), (32, 8, 8), "Conv"),
                              (torch.nn.Linear(64, 10), (64,), "Gemm")):
        fast = onnx.load_from_string(layer_bytes(module, shape, 1))
        assert ops(fast) == ops(network_graph(module, shape, batch=1)) == [op]


def test_layers_timed_slower_than_the_network_are_scaled_into_it(graph, monkeypatch):
    """Under load a layer timed alone can read slower than the whole network; the table must still predict
    every mask above the runtime's per-call floor, never below zero."""
    import polarprune.training.latency as latency

    def loaded_medians(graphs, settings):  # every layer 0.2 ms alone, the network 1.0 ms, masks 0.3-0.9 ms
        return {name: {"floor": 0.05, "dense": 1.0}.get(name, 0.3 if name.startswith("calibration") else 0.25)
                for name in graphs}
    monkeypatch.setattr(latency, "median_ms", loaded_medians)
    table = latency.measure_table(graph, 16, LatencySettings(**QUICK_TIMING))
    assert table.calibration["capped_to_dense_minus_floor"]
    assert table.other_ms == pytest.approx(table.floor_ms)
    cost = LatencyCost(graph, table)
    full = {name: list(range(g.width)) for name, g in graph.prunable().items()}
    narrowest = Mask({name: kept[:16] for name, kept in full.items()})
    assert 0 < mask_cost(cost, narrowest) <= mask_cost(cost, Mask(full)) == pytest.approx(table.dense_ms)


def test_second_build_hits_the_cache_and_a_new_fingerprint_misses(graph, built, monkeypatch):
    settings, table, _ = built
    again, source = load_or_measure(graph, 16, settings, log=lambda _: None)
    assert source == "cache" and again.to_dict() == table.to_dict()
    other_machine = {"cpu": "another CPU", "logical_cores": 64, "isa": ["avx2"]}
    monkeypatch.setattr("polarprune.training.latency.machine_fingerprint", lambda: other_machine)
    assert cache_path(settings, table_key(graph, 16, settings)) != cache_path(settings, table.key)
    moved, source = load_or_measure(graph, 16, settings, log=lambda _: None)
    assert source == "measured" and moved.key["machine"] == other_machine
    wider = dataclasses.replace(settings, threads=1)  # the threads are part of the key too
    assert cache_path(wider, table_key(graph, 16, wider)) != cache_path(settings, table_key(graph, 16, settings))


def test_a_corrupt_cache_file_is_measured_again_with_a_note(graph, built, tmp_path):
    settings = dataclasses.replace(built[0], cache=str(tmp_path))
    path = cache_path(settings, table_key(graph, 16, settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"format": "polarprune-latency-table", "version": 1, "key"')  # cut off mid-write
    notes = []
    table, source = load_or_measure(graph, 16, settings, log=notes.append)
    assert source == "measured" and "unreadable" in notes[0] and str(path) in notes[0]
    assert LatencyTable.from_dict(json.loads(path.read_text()), str(path)).key == table.key  # replaced whole


def test_interpolation_is_exact_at_grid_points_zero_at_zero_and_monotone():
    layer = Layer("conv", "conv", (), ())
    entry = {"in_widths": [16, 32], "out_widths": [8, 16], "ms": [[1.0, 2.0], [3.0, 5.0]]}
    for i, w_in in enumerate(entry["in_widths"]):
        for j, w_out in enumerate(entry["out_widths"]):
            assert grid_value(entry, "ms", layer, w_in, w_out) == pytest.approx(entry["ms"][i][j])
    assert grid_value(entry, "ms", layer, 24, 12) == pytest.approx((1 + 2 + 3 + 5) / 4)  # bilinear centre
    assert grid_value(entry, "ms", layer, 0, 16) == 0 and grid_value(entry, "ms", layer, 32, 0) == 0
    sweep = [grid_value(entry, "ms", layer, w, w / 2) for w in range(0, 33)]
    assert all(a <= b for a, b in zip(sweep, sweep[1:]))


def test_table_grid_points_and_masks_price_as_the_table_says(graph, built):
    _, table, _ = built
    cost = LatencyCost(graph, table)
    assert cost.dense == pytest.approx(table.dense_ms)
    layer = graph.layers["layer3.1.conv2"]
    entry = table.layers[layer.path]
    for i, width in enumerate(entry["in_widths"]):
        assert table.layer_ms(layer, width, 64) == pytest.approx(entry["ms"][i][0])
    full = {name: list(range(g.width)) for name, g in graph.prunable().items()}
    narrower = {**full, "layer3.1.conv1": list(range(16))}
    closed = {k: v for k, v in full.items() if k != "layer3.1.conv1"}
    dense, thin, gone = (mask_cost(cost, m) for m in (Mask(full), Mask(narrower), Mask(closed, ["layer3.1"])))
    assert dense == pytest.approx(table.dense_ms)
    assert gone <= thin <= dense  # monotone entries: a narrower or closed block never costs more


def test_depthwise_layers_are_priced_by_their_one_width(tmp_path):
    graph = trace_network(MobileNetV2(width=0.25, in_channels=1), torch.zeros(2, 1, 16, 16))
    table, _ = load_or_measure(graph, 16, LatencySettings(cache=str(tmp_path), **QUICK_TIMING), log=lambda _: None)
    depthwise = [layer for layer in costed_layers(graph).values() if layer.kind == "depthwise"]
    assert depthwise
    for layer in depthwise:
        entry = table.layers[layer.path]
        assert len(entry["out_widths"]) == 1
        for i, width in enumerate(entry["in_widths"]):
            assert table.layer_ms(layer, width, width) == pytest.approx(entry["ms"][i][0])
    assert LatencyCost(graph, table).dense == pytest.approx(table.dense_ms)


def test_monotone_entries_rise_strictly_so_noise_never_removes_a_gradient():
    from polarprune.training.latency import monotone
    noisy = [[1.0, 2.0, 1.9], [2.0, 1.5, 4.0], [3.0, 3.0, 3.0]]  # dips and flat steps, as noise makes them
    fixed = np.asarray(monotone(noisy))
    assert (np.diff(fixed, axis=0) > 0).all() and (np.diff(fixed, axis=1) > 0).all()
    assert (fixed >= np.asarray(noisy)).all() and fixed[0, 0] == 1.0 and fixed[1, 2] == 4.0


def test_latency_cost_gives_the_gate_scores_gradients(graph, built):
    _, table, _ = built
    gated = GatedNetwork(graph)
    gated(torch.randn(2, *INFO.input_shape))
    ratio = gated.kept_ratio(LatencyCost(graph, table))
    ratio.backward()
    assert float(ratio.detach()) == pytest.approx(1.0)
    assert gated.block_gate("layer3.1").score.grad.abs().sum() > 0
    assert gated.channel_gate("layer3.1.conv1").score.grad.abs().sum() > 0


BASE = dict(dataset="fashion_mnist", model="resnet20", method="polarized", device="cpu", progress=False)


@pytest.mark.parametrize("settings, key, words", [
    ({"cost": "latency"}, "target_latency_ratio", "required"),
    ({"cost": "latency", "target_latency_ratio": 1.5}, "target_latency_ratio", "(0, 1]"),
    ({"cost": "latency", "target_latency_ratio": 0.5, "latency_runtime": "tensorrt"}, "latency_runtime",
     "onnxruntime-cpu"),
    ({"cost": "latency", "target_latency_ratio": 0.5, "method": "dense"}, "cost", "polarized"),
    ({"cost": "speed"}, "cost", "one of flops, latency"),
    ({"latency_threads": 0}, "latency_threads", "at least 1"),
])
def test_config_errors_name_the_key(settings, key, words):
    with pytest.raises(ConfigError) as error:
        make_config({**BASE, **settings})
    assert error.value.key == key and words in str(error.value)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this onnxruntime has the CUDA provider: nothing to refuse")
def test_cuda_runtime_without_its_provider_is_refused():
    with pytest.raises(ConfigError) as error:
        make_config({**BASE, "cost": "latency", "target_latency_ratio": 0.5, "latency_runtime": "onnxruntime-cuda"})
    assert error.value.key == "latency_runtime" and "CUDAExecutionProvider" in str(error.value)


def test_a_target_below_the_smallest_mask_is_refused(graph, built):
    from polarprune.training.methods.polarized import cost_floor
    settings, table, _ = built
    floor, _ = cost_floor(graph, 16, LatencyCost(graph, table))  # what this table says the smallest mask keeps
    below = (floor - PolarizedSettings.flops_tolerance) / 2
    assert below > 0, f"the measured table gives a floor of {floor:.3f}: no target lies below it"
    cfg = make_config({**BASE, "cost": "latency", "target_latency_ratio": below, "latency_cache": settings.cache})
    method = make_method(cfg, graph)
    with pytest.raises(ConfigError) as error:
        method.prepare(None, RunContext(torch.device("cpu"), lambda: [], 1, 1))
    assert error.value.key == "target_latency_ratio" and "cannot go below" in str(error.value)


def test_short_latency_run_reports_predicted_beside_measured(tmp_path):
    cfg = make_config({**BASE, "epochs": 1, "batch_size": 64, "train_subset": 256, "val_size": 0,
                       "test_subset": 200, "threads": 2, "cost": "latency", "target_latency_ratio": 0.6,
                       "warmup_fraction": 0.0, "ramp_fraction": 0.5, "freeze_fraction": 1.0,
                       "latency_cache": str(tmp_path / "cache"), "out_dir": str(tmp_path), "name": "run"})
    metrics = train(cfg)
    latency = metrics["latency"]
    assert latency["table"] == "latency_table.json" and latency["runtime"] == "onnxruntime-cpu"
    assert abs(metrics["projection"]["final_latency_ratio"] - 0.6) <= cfg.flops_tolerance + 1e-9
    assert latency["predicted_ratio"] == pytest.approx(metrics["projection"]["final_latency_ratio"])
    assert 0 < latency["measured_ratio"] < 1.2  # a pruned network; its exact speed is the machine's business
    assert 0 < metrics["flops_ratio"] < 1 and metrics["target_flops_ratio"] is None
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["latency"]["measured_ratio"] == latency["measured_ratio"]
    table = json.loads((tmp_path / "run" / "latency_table.json").read_text())
    assert LatencyTable.from_dict(table, "run").dense_ms > 0
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["method_state"]["latency_table"] == table
    resumed = make_method(cfg, trace_network(build_network(INFO_28), INFO_28.example_input()))
    resumed.load_state_dict(state["method_state"])  # a resume prices masks by the table the run began with
    assert resumed.cost.name == "latency" and resumed.latency_table.to_dict() == table
