"""Measured latency as the gates' cost (`cost: latency`): a per-layer table timed on the deployment runtime
(the timing itself: `training.latency_timing`), its fit to the whole network, its cache, and the cost.

Every costed layer of the trace (conv, depthwise conv, linear) is exported alone as a tiny ONNX graph and
timed on onnxruntime at each kept width `round_to` allows along each of its prunable axes (full width
included), at batch `latency_batch` with `latency_threads` intra-op threads and no spinning
(`common.ort_timing`). Identical layers (same kind, kernel, stride, padding, input size and widths) are
timed once. All layer graphs, an empty graph (the runtime's per-call floor), the dense network and a few
cut calibration networks (exported as export writes them, `training.onnx_graph`) are timed in one process,
interleaved; each gets the median over the rounds, and
a layer's isolated time is its median minus the floor.

A layer timed alone costs more than in place (it reads and writes its activations in the plain layout);
`fit_in_network` fits, over the calibration networks, a scale and a per-activation-element discount that
turn isolated times into in-place entries. What the layers leave unexplained (floor, pooling, the head,
layout changes) is one constant: `other = dense - sum of the entries at full width`. The predicted latency
of a mask is `other` + the sum over layers of their entries at the kept widths (bilinear between grid
points, 0 at width 0), each times the values of the blocks that hold it: the same
`training.gating.layer_sum` as the MACs, so it is differentiable in the gates' expected widths.

Tables are cached by runtime, machine, batch, threads and network (`latency_cache`); a run copies the
table it used into its folder (`latency_table.json`) and keeps it in its checkpoint, so a resume prices
masks exactly as before.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from polarprune.common.atomicio import write_json

from .errors import ConfigError
from .gating import Number, costed_layers, cut, group_units, group_widths, layer_sum, mask_widths
from .graph import Layer, Layout, NetworkGraph
# measure_networks and runtime_problem are used through this module (training.methods.polarized)
from .latency_timing import (LatencySettings, empty_graph, machine_fingerprint, measure_networks,  # noqa: F401
                             layer_bytes, median_ms, network_bytes, runtime_problem)
from .mask import Mask, leading_mask, kept_widths

TABLE_FORMAT, TABLE_VERSION = "polarprune-latency-table", 3  # 2: strictly rising; 3: layers fit in the network
MAX_AXIS_POINTS = 8     # widths timed per axis at most (round_to 1 on a 512-wide layer would be 512)


# -- what gets timed ------------------------------------------------------------------------------------

def _shapes(graph: NetworkGraph, layer: Layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one example's input and output of a layer, as the trace propagated them."""
    node = next(n for n in graph.module.graph.nodes if n.name == layer.node)
    return tuple(tuple(int(d) for d in tensor.meta["tensor_meta"].shape[1:])
                 for tensor in (node.all_input_nodes[0], node))


def timed_layers(graph: NetworkGraph) -> dict[str, Layer]:
    """The costed layers timed one by one; a "fixed" layer (no cut changes it) is part of `other_ms`, and so
    are the attention products (not timed per head yet)."""
    return {path: layer for path, layer in costed_layers(graph).items() if layer.kind not in ("fixed", "attention")}


def layer_spec(graph: NetworkGraph, layer: Layer) -> dict[str, Any]:
    """What a layer's time depends on besides its widths: kind, kernel, stride, padding, dilation and input
    spatial size (a linear: none of these)."""
    module = graph.module.get_submodule(layer.path)
    if layer.kind == "custom":
        raise LatencyTableError(f"{layer.path} ({type(module).__name__}) is a registered layer, which the latency "
                                "table cannot time: use cost: flops for this network")
    if layer.kind == "linear":
        return {"kind": "linear", "bias": module.bias is not None}
    grouping = {"group_width": layer.group_width} if layer.kind == "grouped" else {}
    return {"kind": layer.kind, "kernel": list(module.kernel_size), "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation), "input_size": list(_shapes(graph, layer)[0][1:]), **grouping}


def axis_widths(graph: NetworkGraph, layout: Layout, round_to: int) -> list[int]:
    """The widths a layer's input or output can take: its full width when no prunable group lies on it,
    else every sum of the widths its groups can keep (`training.mask.kept_widths` of the gates' units),
    thinned evenly to at most MAX_AXIS_POINTS."""
    units = group_units(graph, round_to)
    widths = {0}
    for segment in layout:
        group = graph.group_of_space[segment.space]
        sizes = units.get(group) if sum(units.get(group, [])) == segment.width else None
        choices = kept_widths(sizes) if sizes else [segment.width]
        widths = {total + width for total in widths for width in choices}
    widths = sorted(widths)
    if len(widths) > MAX_AXIS_POINTS:
        picks = np.linspace(0, len(widths) - 1, MAX_AXIS_POINTS).round().astype(int)
        widths = [widths[i] for i in sorted(set(picks.tolist()))]
    return widths


def layer_grid(graph: NetworkGraph, layer: Layer, round_to: int) -> tuple[list[int], list[int]]:
    """(input widths, output widths) to time; a depthwise conv has one width, kept on the input axis."""
    widths_in = axis_widths(graph, layer.in_layout, round_to)
    if layer.kind in ("depthwise", "grouped"):
        return widths_in, [sum(s.width for s in layer.out_layout)]
    return widths_in, axis_widths(graph, layer.out_layout, round_to)


def _point_key(spec: dict, width_in: int, width_out: int) -> str:
    return json.dumps({**spec, "in": width_in, "out": width_out}, sort_keys=True)


def _layer_module(spec: dict, width_in: int, width_out: int) -> nn.Module:
    """The layer alone at these widths (random weights, a bias as batch norm leaves after folding)."""
    if spec["kind"] == "linear":
        return nn.Linear(width_in, width_out, bias=spec["bias"])
    groups = width_in // spec.get("group_width", 1) if spec["kind"] in ("depthwise", "grouped") else 1
    return nn.Conv2d(width_in, width_in if groups > 1 else width_out, spec["kernel"], spec["stride"],
                     spec["padding"], spec["dilation"], groups=groups, bias=True)


# -- the table ------------------------------------------------------------------------------------------

class LatencyTableError(ValueError):
    """A stored latency table that is not one, or not for this network and machine."""


@dataclass
class LatencyTable:
    """Milliseconds per layer on a width grid, plus the constant the layers do not explain."""
    key: dict[str, Any]              # runtime, machine, batch, threads, network: what the times are valid for
    layers: dict[str, dict]          # layer path -> {"spec", "in_widths", "out_widths", "measured_ms", "ms"}
    floor_ms: float                  # the runtime's per-call floor (subtracted from every layer's time)
    dense_ms: float                  # the whole dense network, measured
    other_ms: float                  # dense_ms - sum of the layers at full width
    build_seconds: float = 0.0
    calibration: dict = field(default_factory=dict)  # the in-network fit and how well it explains its networks

    def layer_ms(self, layer: Layer, width_in: Number, width_out: Number) -> Number:
        """A layer's entry at kept widths (`grid_value` of its calibrated grid); 0 for a fixed layer."""
        if layer.kind in ("fixed", "attention"):
            return 0.0
        return grid_value(self.layers[layer.path], "ms", layer, width_in, width_out)

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "key": self.key, "unit": "ms",
                "floor_ms": self.floor_ms, "dense_ms": self.dense_ms, "other_ms": self.other_ms,
                "build_seconds": self.build_seconds, "calibration": self.calibration, "layers": self.layers}

    @classmethod
    def from_dict(cls, document: Any, source: str) -> "LatencyTable":
        if not isinstance(document, dict) or document.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"{source}: not a {TABLE_FORMAT} document")
        if document.get("version") != TABLE_VERSION:
            raise LatencyTableError(f"{source}: version {document.get('version')!r}, expected {TABLE_VERSION}")
        try:
            table = cls(dict(document["key"]), dict(document["layers"]), float(document["floor_ms"]),
                        float(document["dense_ms"]), float(document["other_ms"]),
                        float(document.get("build_seconds", 0.0)), dict(document.get("calibration") or {}))
            if not np.isfinite([table.floor_ms, table.dense_ms, table.other_ms]).all():
                raise LatencyTableError(f"{source}: floor_ms, dense_ms and other_ms must be finite numbers")
            for path, entry in table.layers.items():
                grid = np.asarray(entry["ms"], dtype=np.float64)
                if grid.shape != (len(entry["in_widths"]), len(entry["out_widths"])) or not np.isfinite(grid).all():
                    raise LatencyTableError(f"{source}: layer {path}: ms is not a finite "
                                            f"{len(entry['in_widths'])}x{len(entry['out_widths'])} grid")
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, LatencyTableError):
                raise
            raise LatencyTableError(f"{source}: malformed ({type(error).__name__}: {error})") from None
        return table


def grid_value(entry: dict, values: str, layer: Layer, width_in: Number, width_out: Number) -> Number:
    """A layer's `entry[values]` grid at kept widths: bilinear between grid points, 0 at width 0, linear
    from 0 to the narrowest grid point (only gate values between hard masks land there)."""
    if layer.kind in ("depthwise", "grouped"):
        width_out = entry["out_widths"][0]
    row, t_in = _cell([0, *entry["in_widths"]], width_in)
    col, t_out = _cell([0, *entry["out_widths"]], width_out)
    ms = [[0.0] * (len(entry["out_widths"]) + 1)] + [[0.0, *row_values] for row_values in entry[values]]
    return ((1 - t_in) * ((1 - t_out) * ms[row - 1][col - 1] + t_out * ms[row - 1][col])
            + t_in * ((1 - t_out) * ms[row][col - 1] + t_out * ms[row][col]))


def _cell(grid: list[int], width: Number) -> tuple[int, Number]:
    """Index k of the grid cell [grid[k-1], grid[k]] holding `width`, and its position t in it (0..1; the
    last cell extends beyond full width). `width` may be a tensor: t then carries its gradient."""
    value, k = float(width.detach() if isinstance(width, torch.Tensor) else width), 1
    while k < len(grid) - 1 and value > grid[k]:
        k += 1
    return k, (width - grid[k - 1]) / (grid[k] - grid[k - 1])


MIN_STEP_SHARE = 0.05  # of a layer's mean step per grid point: what a flattened (noisy) step still rises


def monotone(grid: list[list[float]]) -> list[list[float]]:
    """Strictly rising along both axes: noise must not make a wider layer look cheaper (a gradient that
    rewards growing) nor as cheap (no gradient at all, so the gates of that group would feel no cost). Each
    step rises by at least MIN_STEP_SHARE of the layer's mean step; timings are stored beside it, untouched."""
    values = np.asarray(grid, dtype=np.float64)
    rows, cols = values.shape
    mean_step = (values.max() - values.min()) / max(rows + cols - 2, 1)
    least = MIN_STEP_SHARE * max(mean_step, 1e-6)
    for i in range(rows):
        for j in range(cols):
            below = values[i - 1, j] + least if i else -np.inf
            left = values[i, j - 1] + least if j else -np.inf
            values[i, j] = max(values[i, j], below, left)
    return values.tolist()


def network_key(graph: NetworkGraph, round_to: int) -> str:
    """sha256 of what the table depends on in the network: its traced code (ops and module paths), input
    shape, and every costed layer's spec and width grid."""
    layers = {path: [layer_spec(graph, layer), *layer_grid(graph, layer, round_to)]
              for path, layer in timed_layers(graph).items()}
    text = json.dumps([graph.module.code, list(graph.input_shape), layers], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def table_key(graph: NetworkGraph, round_to: int, settings: LatencySettings) -> dict[str, Any]:
    return {"runtime": settings.runtime, "onnxruntime": ort.__version__, "provider": settings.provider,
            "machine": machine_fingerprint(), "batch": settings.batch, "threads": settings.threads,
            "network": network_key(graph, round_to)}


def calibration_masks(graph: NetworkGraph, round_to: int, count: int = 6, seed: int = 0) -> list[Mask]:
    """Masks whose cut networks calibrate the table: every group at its narrowest, every block closed, and
    `count` random ones (each group at a random width of its grid, each block closed with p = 0.3)."""
    rng = np.random.default_rng(seed)
    grids = {name: kept_widths(sizes) for name, sizes in group_units(graph, round_to).items()}
    inside = {block: graph.groups_inside(block) for block in graph.blocks}

    def mask(widths: dict[str, int], closed: list[str]) -> Mask:
        return leading_mask(widths, closed, {group for block in closed for group in inside[block]})

    masks = [mask({n: grid[0] for n, grid in grids.items()}, [])]
    if graph.blocks:
        masks.append(mask(group_widths(graph), list(graph.blocks)))
    for _ in range(count):
        closed = [block for block in graph.blocks if rng.random() < 0.3]
        masks.append(mask({n: int(rng.choice(grid)) for n, grid in grids.items()}, closed))
    return masks


def fit_in_network(deltas: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(scale, per-element cost) with measured - dense ~= scale * (isolated layer change) - cost * (change of
    layer input+output elements), least squares over the calibration networks. A layer timed alone pays
    for reading its input and writing its output in onnxruntime's plain layout, which inside the network
    stays in the blocked layout: isolated times overstate what a layer costs in place, the more so the
    larger its activations (measured on ResNet-20: closing four blocks was predicted at 0.50, measured
    0.67). Falls back to (1, 0), the isolated times as they are, when the fit is degenerate."""
    if len(deltas) < 2:
        return 1.0, 0.0
    measured, isolated, elements = (np.asarray(column, dtype=np.float64) for column in zip(*deltas))
    solution, *_ = np.linalg.lstsq(np.stack([isolated, -elements], axis=1), measured, rcond=None)
    scale, per_element = (float(v) for v in solution)
    if scale > 0 and per_element >= 0:
        return scale, per_element
    if float(np.dot(isolated, isolated)) > 0:  # one parameter: the scale alone
        scale = float(np.dot(isolated, measured) / np.dot(isolated, isolated))
        if scale > 0:
            return scale, 0.0
    return 1.0, 0.0


def graphs_to_time(graph: NetworkGraph, round_to: int, settings: LatencySettings,
                    masks: list[Mask]) -> tuple[dict[str, dict], dict[str, bytes]]:
    """(per layer: spec, width grid and activation elements at each grid point; serialized graphs by name:
    "floor", one per distinct layer point, "dense", "calibration<i>" per mask)."""
    layers, graphs = {}, {"floor": empty_graph(settings.batch)}
    with torch.random.fork_rng(devices=[]):  # random layer weights must not move the run's random stream
        for path, layer in timed_layers(graph).items():
            spec, (input_shape, output_shape) = layer_spec(graph, layer), _shapes(graph, layer)
            widths_in, widths_out = layer_grid(graph, layer, round_to)
            channels_last = layer.kind == "linear"  # a linear reads the last axis: (tokens, C) on a transformer
            pixels_in, pixels_out = (int(np.prod(shape[:-1] if channels_last else shape[1:]))
                                     for shape in (input_shape, output_shape))
            depthwise = layer.kind in ("depthwise", "grouped")  # its output is as wide as its input
            layers[path] = {"spec": spec, "in_widths": widths_in, "out_widths": widths_out,
                            "elements": [[settings.batch * (w_in * pixels_in + (w_in if depthwise else w_out) *
                                                            pixels_out) for w_out in widths_out] for w_in in widths_in]}
            for w_in in widths_in:
                for w_out in widths_out:
                    point = _point_key(spec, w_in, w_out)
                    if point not in graphs:
                        shape = (*input_shape[:-1], w_in) if channels_last else (w_in, *input_shape[1:])
                        graphs[point] = layer_bytes(_layer_module(spec, w_in, w_out), shape, settings.batch)
        graphs["dense"] = network_bytes(graph.module, tuple(graph.input_shape), settings.batch)
        for index, mask in enumerate(masks):
            graphs[f"calibration{index}"] = network_bytes(cut(graph, mask, graph.module),
                                                          tuple(graph.input_shape), settings.batch)
    return layers, graphs


def measure_table(graph: NetworkGraph, round_to: int, settings: LatencySettings) -> LatencyTable:
    """Time every layer at its grid widths, the floor, the dense network and the calibration networks,
    interleaved, then fit the layers' in-network cost (`fit_in_network`; module docstring)."""
    started = time.perf_counter()
    key = table_key(graph, round_to, settings)
    masks = calibration_masks(graph, round_to)
    layers, graphs = graphs_to_time(graph, round_to, settings, masks)
    medians = median_ms(graphs, settings)
    floor, dense = medians["floor"], medians["dense"]
    for entry in layers.values():
        entry["measured_ms"] = [[max(medians[_point_key(entry["spec"], w_in, w_out)] - floor, 0.0)
                                 for w_out in entry["out_widths"]] for w_in in entry["in_widths"]]

    def total(values: str, mask: Mask | None) -> float:
        def cost(layer: Layer, w_in: Number, w_out: Number) -> Number:  # untimed layers are in other_ms
            return grid_value(layers[layer.path], values, layer, w_in, w_out) if layer.path in layers else 0.0
        return float(layer_sum(graph, *(mask_widths(mask) if mask else ({}, {})), cost))

    deltas = [(medians[f"calibration{i}"] - dense, total("measured_ms", m) - total("measured_ms", None),
               total("elements", m) - total("elements", None)) for i, m in enumerate(masks)]
    scale, per_element = fit_in_network(deltas)
    for entry in layers.values():
        in_place = np.asarray(entry["measured_ms"]) * scale - np.asarray(entry["elements"]) * per_element
        entry["ms"] = monotone(np.maximum(in_place, 0.0).tolist())
    # The layers cannot take more than the network minus the runtime's per-call floor. A fit on noisy
    # calibration times (a loaded machine) can say they do; then every prediction shifts down by the excess
    # and a small mask is predicted below zero. Scale the entries into that room instead.
    full_width = sum(entry["ms"][-1][-1] for entry in layers.values())
    room = max(dense - floor, 0.0)
    capped = full_width > room > 0
    if capped:
        for entry in layers.values():
            entry["ms"] = (np.asarray(entry["ms"]) * (room / full_width)).tolist()
    table = LatencyTable(key, layers, floor, dense, 0.0, time.perf_counter() - started)
    table.other_ms = dense - sum(entry["ms"][-1][-1] for entry in layers.values())
    predicted = [table.other_ms + total("ms", mask) for mask in masks]
    table.calibration = {"networks": len(masks), "scale": scale, "ms_per_element": per_element,
                         "capped_to_dense_minus_floor": capped,
                         "measured_ratios": [medians[f"calibration{i}"] / dense for i in range(len(masks))],
                         "predicted_ratios": [p / dense for p in predicted]}
    table.build_seconds = time.perf_counter() - started
    return table


def cache_path(settings: LatencySettings, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(settings.cache).expanduser() / f"{digest}.json"


def load_or_measure(graph: NetworkGraph, round_to: int, settings: LatencySettings,
                    log=print) -> tuple[LatencyTable, str]:
    """The cached table for this runtime, machine, batch, threads and network, or a fresh measurement
    (then cached). A cache file that is unreadable or not for this key is measured anew and overwritten,
    with a note: the cache is derived data, so rebuilding is always safe. Returns (table, "cache" or
    "measured")."""
    key = table_key(graph, round_to, settings)
    path = cache_path(settings, key)
    if path.exists():
        try:
            try:
                document = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise LatencyTableError(f"{path}: unreadable ({error})") from None
            table = LatencyTable.from_dict(document, str(path))
            if table.key != key:
                raise LatencyTableError(f"{path}: holds a table for another key")
            return table, "cache"
        except LatencyTableError as error:
            log(f"latency table cache: {error}; measuring it again")
    log(f"latency table: timing {len(timed_layers(graph))} layers on {settings.runtime} "
        f"(batch {settings.batch}, {settings.threads} threads) ...")
    table = measure_table(graph, round_to, settings)
    try:
        write_json(path, table.to_dict())
    except OSError as error:
        raise ConfigError(f"config key 'latency_cache': cannot write {path} ({error.strerror or error}); "
                          "point latency_cache at a writable folder", "latency_cache") from None
    log(f"latency table: {table.build_seconds:.1f} s, dense {table.dense_ms:.3f} ms, other {table.other_ms:.3f} ms, "
        f"cached in {path}")
    return table, "measured"


class LatencyCost:
    """Predicted milliseconds of the kept network: the `cost: latency` model (a `training.gating.Cost`)."""
    name = "latency"

    def __init__(self, graph: NetworkGraph, table: LatencyTable):
        missing = sorted(set(timed_layers(graph)) - set(table.layers))
        if missing:
            raise LatencyTableError(f"the latency table has no entry for layers {missing}")
        self.graph, self.table = graph, table
        self.dense = float(self.kept({}, {}))

    def kept(self, widths: Mapping[str, Number], blocks_open: Mapping[str, Number]) -> Number:
        return self.table.other_ms + layer_sum(self.graph, widths, blocks_open, self.table.layer_ms)
