"""Measured latency as the gates' cost (`cost: latency`): a per-layer table timed on the deployment runtime.

Every costed layer of the trace (conv, depthwise conv, linear) is exported alone as a tiny ONNX graph and
timed on onnxruntime at each kept width `round_to` allows along each of its prunable axes (full width
included), at batch `latency_batch` with `latency_threads` intra-op threads and no spinning
(`common.ort_timing`). Identical layers (same kind, kernel, stride, padding, input size and widths) are
timed once. All layer graphs, an empty graph (the runtime's per-call floor), the dense network and a few
cut calibration networks are timed in one process, interleaved; each gets the median over the rounds, and
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

import contextlib
import copy
import hashlib
import io
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort
import torch
from torch import nn

from common.atomicio import write_json
from common.ort_timing import ProviderUnavailable, interleaved, provider_problem, quiet_torch, start_session
from common.results import cpu_flags, cpu_model

from .errors import ConfigError
from .gating import Number, costed_layers, cut, layer_sum, mask_widths
from .graph import Layer, Layout, NetworkGraph
from .mask import Mask

TABLE_FORMAT, TABLE_VERSION = "polarprune-latency-table", 3  # 2: strictly rising; 3: layers fit in the network
RUNTIMES = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider"}
# ISA extensions that change which kernels onnxruntime picks (its blocked conv path follows the widest)
KERNEL_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile")
MAX_AXIS_POINTS = 8     # widths timed per axis at most (round_to 1 on a 512-wide layer would be 512)
OPSET = 18


@dataclass(frozen=True)
class LatencySettings:
    """How and where the table is measured: the `latency_*` config keys."""
    runtime: str = "onnxruntime-cpu"
    batch: int = 1
    threads: int = 2
    cache: str = "~/.cache/polarprune/latency"
    rounds: int = 600          # interleaved rounds; the median of each graph's times is its entry
    budget_s: float = 40.0     # the rounds stop early after this (never before 20 rounds)

    @classmethod
    def from_config(cls, cfg) -> "LatencySettings":
        return cls(cfg.latency_runtime, cfg.latency_batch, cfg.latency_threads, cfg.latency_cache)

    @property
    def provider(self) -> str:
        return RUNTIMES[self.runtime]


def runtime_problem(runtime: str) -> str | None:
    """Why `latency_runtime` cannot be used here (None: it can)."""
    if runtime not in RUNTIMES:
        return f"must be one of {', '.join(RUNTIMES)}"
    problem = provider_problem(RUNTIMES[runtime])
    return None if problem is None else f"{problem}; install the onnxruntime build for it or use onnxruntime-cpu"


def machine_fingerprint() -> dict[str, Any]:
    """What makes timings from two machines incomparable: CPU model, logical cores, kernel-relevant ISA."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = cpu_flags()
    return {"cpu": cpu_model(), "logical_cores": cores, "isa": [f for f in KERNEL_FLAGS if f in flags]}


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
    if layer.kind == "linear":
        return {"kind": "linear", "bias": module.bias is not None}
    grouping = {"group_width": layer.group_width} if layer.kind == "grouped" else {}
    return {"kind": layer.kind, "kernel": list(module.kernel_size), "stride": list(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
            "dilation": list(module.dilation), "input_size": list(_shapes(graph, layer)[0][1:]), **grouping}


def axis_widths(graph: NetworkGraph, layout: Layout, round_to: int) -> list[int]:
    """The widths a layer's input or output can take: its full width when no prunable group lies on it,
    else from the narrowest kept width (one `round_to` step per prunable group) to full in steps of
    `round_to`, thinned evenly to at most MAX_AXIS_POINTS."""
    prunable = graph.prunable()
    full = sum(s.width for s in layout)
    parts = [s.width for s in layout if graph.group_of_space[s.space] in prunable]
    if not parts:
        return [full]
    step = min(round_to, *parts)
    lowest = full - sum(parts) + sum(min(round_to, w) for w in parts)
    widths = sorted(set(range(lowest, full, step)) | {full})
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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def onnx_bytes(module: nn.Module, input_shape: tuple[int, ...], batch: int) -> bytes:
    """A copy of `module` in eval mode as serialized ONNX at a fixed batch: the TorchScript exporter, which
    takes ~0.05 s a graph where the torch.export-based one takes seconds; both emit the same operators here."""
    buffer = io.BytesIO()
    module = copy.deepcopy(module).eval()
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(module, (torch.zeros(batch, *input_shape),), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"])
    return buffer.getvalue()


def _empty_graph(batch: int) -> bytes:
    """The runtime's per-call floor: an Identity on a (batch, 1) tensor."""
    tensor = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input"], ["output"])], "floor",
                                   [tensor("input", onnx.TensorProto.FLOAT, [batch, 1])],
                                   [tensor("output", onnx.TensorProto.FLOAT, [batch, 1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    return model.SerializeToString()


def _runner(session: ort.InferenceSession) -> Callable[[], object]:
    model_input = session.get_inputs()[0]
    shape = [int(d) for d in model_input.shape]
    feed = {model_input.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    return lambda: session.run(None, feed)


def time_graphs(graphs: Mapping[str, bytes], settings: LatencySettings,
                rounds: int | None = None) -> dict[str, list[float]]:
    """Milliseconds of every call of each serialized graph, all interleaved in this process.
    ConfigError (key latency_runtime) when the runtime's provider cannot run them."""
    try:
        sessions = {name: start_session(graph, settings.threads, settings.provider) for name, graph in graphs.items()}
    except ProviderUnavailable as error:
        raise ConfigError(f"config key 'latency_runtime': {error}", "latency_runtime") from None
    runners = {name: _runner(session) for name, session in sessions.items()}
    with quiet_torch():
        seconds = interleaved(runners, rounds or settings.rounds, warmup=5, budget_s=settings.budget_s,
                              min_rounds=20)
    return {name: [value * 1e3 for value in values] for name, values in seconds.items()}


def median_ms(graphs: Mapping[str, bytes], settings: LatencySettings) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in time_graphs(graphs, settings).items()}


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
    prunable = graph.prunable()
    inside = {block: graph.groups_inside(block) for block in graph.blocks}

    def mask(widths: dict[str, int], closed: list[str]) -> Mask:
        gone = {group for block in closed for group in inside[block]}
        return Mask({n: list(range(w)) for n, w in widths.items() if n not in gone}, closed)

    def grid(group) -> list[int]:
        step = min(round_to, group.width)
        return sorted(set(range(step, group.width, step)) | {group.width})

    masks = [mask({n: grid(g)[0] for n, g in prunable.items()}, [])]
    if graph.blocks:
        masks.append(mask({n: g.width for n, g in prunable.items()}, list(graph.blocks)))
    for _ in range(count):
        closed = [block for block in graph.blocks if rng.random() < 0.3]
        masks.append(mask({n: int(rng.choice(grid(g))) for n, g in prunable.items()}, closed))
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


def _graphs_to_time(graph: NetworkGraph, round_to: int, settings: LatencySettings,
                    masks: list[Mask]) -> tuple[dict[str, dict], dict[str, bytes]]:
    """(per layer: spec, width grid and activation elements at each grid point; serialized graphs by name:
    "floor", one per distinct layer point, "dense", "calibration<i>" per mask)."""
    layers, graphs = {}, {"floor": _empty_graph(settings.batch)}
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
                        graphs[point] = onnx_bytes(_layer_module(spec, w_in, w_out), shape, settings.batch)
        graphs["dense"] = onnx_bytes(graph.module, tuple(graph.input_shape), settings.batch)
        for index, mask in enumerate(masks):
            graphs[f"calibration{index}"] = onnx_bytes(cut(graph, mask, graph.module), tuple(graph.input_shape),
                                                       settings.batch)
    return layers, graphs


def measure_table(graph: NetworkGraph, round_to: int, settings: LatencySettings) -> LatencyTable:
    """Time every layer at its grid widths, the floor, the dense network and the calibration networks,
    interleaved, then fit the layers' in-network cost (`fit_in_network`; module docstring)."""
    started = time.perf_counter()
    key = table_key(graph, round_to, settings)
    masks = calibration_masks(graph, round_to)
    layers, graphs = _graphs_to_time(graph, round_to, settings, masks)
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


def measure_networks(dense: nn.Module, pruned: nn.Module, input_shape: tuple[int, ...],
                     settings: LatencySettings, rounds: int = 3000, blocks: int = 5) -> dict[str, Any]:
    """The dense and the pruned network timed interleaved with the table's settings: medians in ms, their
    ratio, and the ratio within each of `blocks` consecutive stretches of the rounds and of the fastest
    calls (how much the machine's load moved it; under load the fastest calls are the least disturbed)."""
    graphs = {name: onnx_bytes(module, input_shape, settings.batch)
              for name, module in (("dense", dense), ("pruned", pruned))}
    times = time_graphs(graphs, settings, rounds)
    dense_ms, pruned_ms = (np.asarray(times[name]) for name in ("dense", "pruned"))
    stretches = [(float(np.median(p)) / float(np.median(d)))
                 for d, p in zip(np.array_split(dense_ms, blocks), np.array_split(pruned_ms, blocks))]
    return {"dense_ms": float(np.median(dense_ms)), "pruned_ms": float(np.median(pruned_ms)),
            "measured_ratio": float(np.median(pruned_ms) / np.median(dense_ms)),
            "measured_ratio_blocks": stretches, "fastest_call_ratio": float(pruned_ms.min() / dense_ms.min()),
            "rounds": int(dense_ms.size)}
