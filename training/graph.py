"""Which channels and blocks of a network can go, traced from the network itself (any traceable CNN).

One torch.fx trace of the plain (ungated) network, shapes propagated once with an example input. Every
tensor's channel axis is a list of segments, each a slice of a "channel space": convs and linears start a
new space, channel-wise ops (norms, activations, pooling, spatial slicing) keep it, a depthwise conv maps
a space onto itself, an add or a channel-wise product joins the spaces of its operands (a residual add ties
every producer feeding it), and `torch.cat` on the channel axis lays spaces side by side. A joined space
is a `ChannelGroup`: the convs producing it, the norms and depthwise convs on it and the layers reading it
all shrink together.

Gates multiply the output of every producer, norm and depthwise conv of a group (a producer whose only
user is a norm of the group is covered by that norm). Cutting channel c is exact when every layer that
reads the group sees channel c as exactly zero in the gated network; `_check_zeros` follows the gated
values through the graph and pins a group where an op (a sigmoid, an added constant) would revive them.

A group may not shrink when it is pinned, with the reason: network input and output, ops no cut handles
(a reshape that mixes channels, GroupNorm across the channels, a grouped conv), shared modules. A residual
branch (an operand of an add that holds convs and feeds nothing else) gets a `BlockGate`: closing it
removes the branch, and the add passes its other operand on.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import TrainingError


class GraphError(TrainingError, ValueError):
    """The network cannot be traced, or holds a pattern that no cut handles safely."""


# Channel-wise ops. ZERO_KEEPING map 0 to 0 (a closed channel stays closed); the others keep the channel
# space but revive closed channels (sigmoid(0) = 0.5), so no layer may read their output.
ZERO_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh,
                        nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
ZERO_REVIVING_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
ZERO_KEEPING_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish,
                          torch.tanh, F.hardtanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.dropout, F.interpolate}
ZERO_REVIVING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
ZERO_KEEPING_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}
ZERO_REVIVING_METHODS = {"sigmoid"}
ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
MULS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
SHAPE_QUERIES = {"dim", "size"}


@dataclass(frozen=True)
class Segment:
    space: int   # channel space id (resolved to a group after the trace)
    width: int


Layout = tuple[Segment, ...]


@dataclass
class Layer:
    """A module whose weights a cut touches: conv, depthwise conv, linear or norm, with the channel layout
    of its input and output and its cost (MACs = unit_macs * in * out / groups; depthwise: unit * width)."""
    path: str
    kind: str  # "conv" | "depthwise" | "linear" | "norm"
    in_layout: Layout
    out_layout: Layout
    unit_macs: int = 0
    blocks: tuple[str, ...] = ()  # block gates whose branch holds this layer
    node: str = ""                # its call in the traced graph


@dataclass
class ChannelGroup:
    name: str                     # the first producer's module path
    width: int
    producers: list[str] = field(default_factory=list)   # layers whose output channels form the space
    members: list[str] = field(default_factory=list)     # norms and depthwise convs on it
    consumers: list[str] = field(default_factory=list)   # layers reading it as input channels
    pinned: list[str] = field(default_factory=list)      # why it may not shrink

    @property
    def prunable(self) -> bool:
        return not self.pinned and bool(self.producers) and self.width > 1


@dataclass
class BlockGate:
    name: str                 # the branch modules' common path ("layer1.0"), or the add node's name
    add_node: str             # the add that joins the branch to the rest
    branch_output: str        # node whose value the block gate multiplies
    branch_nodes: list[str]   # every node that feeds only this branch (removed when it closes)
    branch_modules: list[str]


@dataclass
class NetworkGraph:
    """Everything the gates, the cost model and the surgery need, from one trace."""
    module: fx.GraphModule        # the traced plain network
    input_shape: tuple[int, ...]  # of one example (batch axis excluded)
    groups: dict[str, ChannelGroup]
    layers: dict[str, Layer]
    blocks: dict[str, BlockGate]
    gate_points: dict[str, Layout]   # node name -> layout of the output a channel gate multiplies
    group_of_space: dict[int, str]
    output_shape: tuple[int, ...] = ()  # of one example
    def prunable(self) -> dict[str, ChannelGroup]:
        return {name: g for name, g in self.groups.items() if g.prunable}

    def group(self, segment: Segment) -> ChannelGroup:
        return self.groups[self.group_of_space[segment.space]]

    def output_group(self, layer: str) -> ChannelGroup:
        """The group a layer's output channels belong to (its first, for a concatenated output)."""
        return self.group(self.layers[layer].out_layout[0])

    def groups_inside(self, block: str) -> list[str]:
        """Prunable groups every layer of which lies in the block's branch (they go when it closes)."""
        inside = set(self.blocks[block].branch_modules)
        return [name for name, g in self.prunable().items()
                if set(g.producers + g.members + g.consumers) <= inside]


def trace_network(model: nn.Module, example_input: torch.Tensor) -> NetworkGraph:
    """Trace `model` (plain, no gates) once; `example_input` is one batch (N, C, H, W) on its device."""
    try:
        graph = fx.Tracer().trace(model)  # torch.nn layers stay single calls; user modules are traced through
    except Exception as error:  # fx raises several types for data-dependent control flow
        raise GraphError(f"{type(model).__name__} cannot be traced by torch.fx ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); the forward pass must not branch "
                         "on tensor values") from None
    module = fx.GraphModule(model, graph, class_name=type(model).__name__)
    was_training = model.training
    module.eval()  # shape propagation must not touch BatchNorm statistics
    try:
        with torch.no_grad():
            output = ShapeProp(module).propagate(example_input)
    except Exception as error:  # whatever the network raises on this input
        raise GraphError(f"{type(model).__name__} does not run on an input of shape {list(example_input.shape)} "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    finally:
        module.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise GraphError(f"{type(model).__name__} returns a {type(output).__name__}; one logits tensor is needed")
    graph = _Analysis(module).run(tuple(example_input.shape[1:]))
    graph.output_shape = tuple(output.shape[1:])
    return graph


def example_for(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """A zero batch for tracing `model` where it lives: on its weights' device (CUDA, meta), in their dtype.
    Batch 2: batch norms in training mode need more than one value per channel."""
    weight = next(model.parameters())
    return torch.zeros(batch, *input_shape, device=weight.device, dtype=weight.dtype)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int] = []

    def new(self, width: int) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the earlier space names the group


class _Analysis:
    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.modules = dict(module.named_modules())
        self.spaces = _UnionFind()
        self.layout: dict[fx.Node, Layout] = {}
        self.layers: dict[str, Layer] = {}
        self.layer_node: dict[str, fx.Node] = {}
        self.pins: list[tuple[int, str]] = []
        self.revives: set[fx.Node] = set()   # outputs where closed channels come back to life
        self.calls: Counter[str] = Counter()

    # -- helpers ----------------------------------------------------------------------------------
    def fresh(self, node: fx.Node, pinned: str | None = None) -> Layout:
        shape = _shape(node)
        width = shape[1] if shape is not None and len(shape) >= 2 else 0
        layout = (Segment(self.spaces.new(width), width),)
        self.layout[node] = layout
        if pinned:
            self.pin(layout, pinned)
        return layout

    def pin(self, layout: Layout, why: str) -> None:
        self.pins.extend((segment.space, why) for segment in layout)

    def tensors(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.layout]

    def keep(self, node: fx.Node, source: fx.Node | None = None) -> None:
        sources = [source] if source is not None else self.tensors(node)
        if not sources:
            return self.unsupported(node)
        self.layout[node] = self.layout[sources[0]]

    def unsupported(self, node: fx.Node, why: str | None = None) -> None:
        target = getattr(node.target, "__name__", node.target)
        reason = why or f"{node.op} {target} ({node.name}) is not a channel-wise op the cuts understand"
        for source in self.tensors(node):
            self.pin(self.layout[source], reason)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            self.fresh(node, pinned=reason)

    def join(self, node: fx.Node, operands: list[fx.Node]) -> None:
        """An elementwise op over tensors of one channel layout: their spaces become one, segment by
        segment; an operand broadcast over channels (width 1) leaves the layout alone."""
        full = [o for o in operands if (_shape(o) or (0, 0))[1:2] != (1,) or len(_shape(o) or ()) < 2]
        full = full or operands
        layouts = [self.layout[o] for o in full]
        first = layouts[0]
        for other in layouts[1:]:
            if [s.width for s in other] != [s.width for s in first]:
                reason = f"{node.name} combines tensors whose channels are laid out differently"
                for layout in layouts:
                    self.pin(layout, reason)
                break
            for a, b in zip(first, other):
                self.spaces.union(a.space, b.space)
        self.layout[node] = first

    # -- the walk ---------------------------------------------------------------------------------
    def run(self, input_shape: tuple[int, ...]) -> NetworkGraph:
        for node in self.module.graph.nodes:
            self.visit(node)
        for path, count in self.calls.items():
            if count > 1 and path in self.layers:
                layer = self.layers[path]
                self.pin(layer.in_layout + layer.out_layout, f"module {path} is called {count} times")
        return self.collect(input_shape)

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.fresh(node, pinned="network input")
        elif node.op == "output":
            for source in self.tensors(node):
                self.pin(self.layout[source], "network output")
        elif node.op == "call_module":
            self.visit_module(node)
        elif node.op in ("call_function", "call_method"):
            self.visit_function(node)
        else:  # get_attr: a constant tensor in the graph
            self.unsupported(node, f"constant tensor {node.target}")

    def visit_module(self, node: fx.Node) -> None:
        path, module = node.target, self.modules[node.target]
        self.calls[path] += 1
        sources = self.tensors(node)
        if not sources:
            return self.unsupported(node)
        source = sources[0]
        in_layout, in_shape = self.layout[source], _shape(source)
        if isinstance(module, nn.Conv2d):
            out_shape = _shape(node)
            unit = module.kernel_size[0] * module.kernel_size[1] * out_shape[2] * out_shape[3]
            if module.groups == 1:
                self.add_layer(node, Layer(path, "conv", in_layout, self.fresh(node), unit))
            elif module.groups == module.in_channels == module.out_channels:
                self.layout[node] = in_layout
                self.add_layer(node, Layer(path, "depthwise", in_layout, in_layout, unit))
            else:
                self.unsupported(node, f"grouped convolution {path} (groups={module.groups}) ties channels in "
                                       "groups that a cut would break")
        elif isinstance(module, nn.Linear):
            if in_shape is None or len(in_shape) != 2:
                return self.unsupported(node, f"linear {path} on a tensor of shape {in_shape}: only (batch, "
                                              "features) inputs map features to channels")
            self.add_layer(node, Layer(path, "linear", in_layout, self.fresh(node), 1))
        elif isinstance(module, NORM_MODULES):
            self.keep(node, source)
            self.add_layer(node, Layer(path, "norm", in_layout, in_layout))
        elif isinstance(module, nn.Flatten):
            self.visit_flatten(node, source, module.start_dim)
        elif isinstance(module, ZERO_KEEPING_MODULES):
            self.keep(node, source)
        elif isinstance(module, ZERO_REVIVING_MODULES):
            self.keep(node, source)
            self.revives.add(node)
        else:
            why = (f"{type(module).__name__} {path} normalises across channels: cutting some changes what it "
                   "computes for the rest") if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)) \
                else f"module {path} ({type(module).__name__}) is not a layer the cuts understand"
            self.unsupported(node, why)

    def add_layer(self, node: fx.Node, layer: Layer) -> None:
        layer.node = node.name
        self.layers[layer.path] = layer
        self.layer_node[layer.path] = node

    def visit_function(self, node: fx.Node) -> None:
        target, sources = node.target, self.tensors(node)
        if node.op == "call_method" and target in SHAPE_QUERIES or target is getattr:
            return  # sizes, not tensors
        if not sources:
            return  # arithmetic on sizes
        if target in ZERO_KEEPING_FUNCTIONS or target in ZERO_KEEPING_METHODS and node.op == "call_method":
            self.keep(node, sources[0])
        elif target in ZERO_REVIVING_FUNCTIONS or target in ZERO_REVIVING_METHODS and node.op == "call_method":
            self.keep(node, sources[0])
            self.revives.add(node)
        elif target in ADDS:
            self.join(node, sources)
            if len(sources) == 1 and not _is_zero(node.args):
                self.revives.add(node)  # x + constant
        elif target in MULS:
            self.join(node, sources)
        elif target is torch.cat or target is torch.concat:
            self.visit_cat(node, sources)
        elif target is torch.flatten or target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            self.visit_flatten(node, sources[0], start)
        elif target is torch.mean or target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            rank = len(_shape(sources[0]) or ())
            if dims and all(d % rank >= 2 for d in dims):
                self.keep(node, sources[0])
            else:
                self.unsupported(node, f"{node.name} averages over the channel axis")
        elif target is operator.getitem:
            index = node.args[1]
            if isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None) and index[1] == slice(None):
                self.keep(node, sources[0])  # spatial slicing
            else:
                self.unsupported(node, f"{node.name} indexes the channel axis")
        elif target is F.pad:
            pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
            if any(pad[4:]):
                self.unsupported(node, f"{node.name} pads the channel axis")
            else:
                self.keep(node, sources[0])
                if (node.kwargs.get("value") or (node.args[3] if len(node.args) > 3 else 0)) != 0:
                    self.revives.add(node)
        else:
            self.unsupported(node)

    def visit_cat(self, node: fx.Node, sources: list[fx.Node]) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node) or ())
        if rank < 2 or dim % rank != 1:
            return self.unsupported(node, f"{node.name} concatenates along axis {dim}, not the channel axis")
        parts = node.args[0]
        self.layout[node] = tuple(segment for part in parts for segment in self.layout[part])

    def visit_flatten(self, node: fx.Node, source: fx.Node, start_dim: int) -> None:
        shape = _shape(source) or ()
        # (N, C, 1, 1) -> (N, C) keeps the channel order; a spatial map would spread channels over features.
        if start_dim == 1 and all(d == 1 for d in shape[2:]):
            self.keep(node, source)
        else:
            self.unsupported(node, f"{node.name} flattens a {list(shape[1:])} map: features mix channels and "
                                   "positions (pool to 1x1 first to let the last conv shrink)")

    # -- results ----------------------------------------------------------------------------------
    def collect(self, input_shape: tuple[int, ...]) -> NetworkGraph:
        find = self.spaces.find
        roots = sorted({find(s) for s in range(len(self.spaces.parent))})
        # A group is named after its first producer in forward order.
        producers: dict[int, list[str]] = {root: [] for root in roots}
        for path, layer in self.layers.items():
            if layer.kind in ("conv", "linear"):
                producers[find(layer.out_layout[0].space)].append(path)
        groups: dict[int, ChannelGroup] = {}
        for root in roots:
            name = producers[root][0] if producers[root] else f"space{root}"
            groups[root] = ChannelGroup(name, self.spaces.width[root], producers=producers[root])
        for path, layer in self.layers.items():
            if layer.kind in ("norm", "depthwise"):
                for segment in layer.out_layout:
                    groups[find(segment.space)].members.append(path)
            if layer.kind in ("conv", "linear"):
                for segment in layer.in_layout:
                    groups[find(segment.space)].consumers.append(path)
        for space, why in self.pins:
            group = groups[find(space)]
            if why not in group.pinned:
                group.pinned.append(why)
        group_of_space = {s: groups[find(s)].name for s in range(len(self.spaces.parent))}
        by_name = {g.name: g for g in groups.values() if g.width}
        blocks = self.find_blocks()
        for block in blocks.values():
            for path in block.branch_modules:
                if path in self.layers:
                    self.layers[path].blocks += (block.name,)
        graph = NetworkGraph(self.module, input_shape, by_name, self.layers, blocks, {}, group_of_space)
        _check_zeros(self, graph)
        return graph

    def find_blocks(self) -> dict[str, BlockGate]:
        blocks: dict[str, BlockGate] = {}
        for node in self.module.graph.nodes:
            if node.target not in ADDS or len(self.tensors(node)) != 2:
                continue
            candidates = []
            for operand in self.tensors(node):
                if set(operand.users) != {node}:
                    continue  # used elsewhere too (the identity path): removing it is not removing a branch
                nodes = _branch(operand, node)
                modules = [n.target for n in nodes if n.op == "call_module"]
                layers = [self.layers[m] for m in modules if m in self.layers]
                macs = sum(layer_macs(layer) for layer in layers if layer.kind != "norm")
                if macs > 0 and all(n.op != "placeholder" for n in nodes):
                    candidates.append((macs, operand, nodes, modules))
            if not candidates:
                continue
            _, operand, nodes, modules = max(candidates, key=lambda c: c[0])  # the heavier path is the branch
            name = _common_path(modules) or node.name
            while name in blocks:
                name += "_"
            blocks[name] = BlockGate(name, node.name, operand.name, [n.name for n in nodes], modules)
        return blocks


def _is_zero(args) -> bool:
    return any(isinstance(a, (int, float)) and a == 0 for a in args)


def layer_macs(layer: Layer, in_width=None, out_width=None):
    """MACs of a conv or linear at these widths (default: its full widths); numbers or tensors. The one
    formula behind the trace's block costs and the gates' MACs cost (`training.gating.kept_macs`)."""
    in_width = sum(s.width for s in layer.in_layout) if in_width is None else in_width
    out_width = sum(s.width for s in layer.out_layout) if out_width is None else out_width
    return layer.unit_macs * in_width * (out_width if layer.kind != "depthwise" else 1)


def _branch(operand: fx.Node, add: fx.Node) -> list[fx.Node]:
    """`operand` and every node whose every use leads only into it: what closing the branch removes."""
    dead, order = {operand}, [operand]
    stack = list(operand.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in dead or node.op in ("placeholder", "get_attr") or not node.users:
            continue
        if all(user in dead for user in node.users):
            dead.add(node)
            order.append(node)
            stack.extend(node.all_input_nodes)
    return [n for n in add.graph.nodes if n in dead]


def _common_path(paths: list[str]) -> str:
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    if len(common) == len(parts[0]) and len(paths) > 1:
        common = common[:-1]
    return ".".join(common)


def _check_zeros(analysis: _Analysis, graph: NetworkGraph) -> None:
    """Choose where channel gates multiply, and pin every group some layer would read with closed channels
    revived. Pinning only removes gates, so this settles in a few rounds."""
    nodes = list(analysis.module.graph.nodes)
    while True:
        prunable = {name for name, g in graph.groups.items() if g.prunable}
        points: dict[str, Layout] = {}
        for path, layer in graph.layers.items():
            if not any(graph.group_of_space[s.space] in prunable for s in layer.out_layout):
                continue
            node = analysis.layer_node[path]
            users = list(node.users)
            covered = layer.kind in ("conv", "linear") and users and all(
                u.op == "call_module" and graph.layers.get(u.target, Layer("", "", (), ())).kind == "norm"
                for u in users)
            if not covered:
                points[node.name] = layer.out_layout
        safe: set[fx.Node] = set()
        revived: dict[fx.Node, str] = {}
        for node in nodes:
            if node not in analysis.layout:
                continue
            layout = analysis.layout[node]
            if node.name in points or not any(graph.group_of_space[s.space] in prunable for s in layout):
                safe.add(node)
                continue
            inputs = [a for a in node.all_input_nodes if a in analysis.layout]
            if node in analysis.revives:
                revived[node] = f"{node.name} ({getattr(node.target, '__name__', node.target)})"
            elif node.target in MULS and any(a in safe for a in inputs):
                safe.add(node)
            elif inputs and all(a in safe for a in inputs) and node.op != "placeholder":
                safe.add(node)
        changed = False
        for path, layer in graph.layers.items():
            if layer.kind not in ("conv", "linear", "depthwise"):
                continue
            source = next(a for a in analysis.layer_node[path].all_input_nodes if a in analysis.layout)
            if source in safe:
                continue
            reason = (f"closed channels would reach {path} non-zero (through "
                      f"{_reviver(source, revived, safe)}), so cutting them would change its output")
            for segment in layer.in_layout:
                group = graph.groups[graph.group_of_space[segment.space]]
                if group.prunable:
                    group.pinned.append(reason)
                    changed = True
        if not changed:
            graph.gate_points = points
            return


def _reviver(node: fx.Node, revived: dict[fx.Node, str], safe: set[fx.Node]) -> str:
    """The op nearest `node` upstream that revives closed channels (for the pin reason)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in revived:
            return revived[current]
        if current in seen:
            continue
        seen.add(current)
        stack.extend(a for a in current.all_input_nodes if a not in safe)
    return node.name
