"""Which channels and blocks of a network can go, traced from the network itself (any traceable CNN).

One torch.fx trace of the plain (ungated) network, shapes propagated once with an example input. Every
tensor's channel axis is a list of segments, each a slice of a "channel space": convs and linears start a
new space, channel-wise ops (norms, activations, pooling, spatial slicing) keep it, a depthwise conv maps
a space onto itself (a grouped conv with as many outputs as inputs too: it keeps whole groups,
`ChannelGroup.unit`), an add or a channel-wise product joins the spaces of its operands (a residual add ties
every producer feeding it), and `torch.cat` on the channel axis lays spaces side by side. A joined space
is a `ChannelGroup`: the convs producing it, the norms and depthwise convs on it and the layers reading it
all shrink together.

Gates multiply the output of every producer, norm and depthwise conv of a group (a producer whose only
user is a norm of the group is covered by that norm). Cutting channel c is exact when every layer that
reads the group sees channel c as exactly zero in the gated network; `_check_zeros` follows the gated
values through the graph and pins a group where an op (a sigmoid, an added constant) would revive them.

The network is traced in eval mode: code that branches on `self.training` (drop path, stochastic depth,
`F.dropout(x, training=self.training)`) is traced as the identity it is in eval, so such noise is not part of
the gated training; `nn.Dropout` modules stay and keep working. Channels-last layers are followed: a
permute or transpose moves a tensor's channel axis, and a Linear over it is a channel layer. Every conv,
linear and matrix product costs MACs (`training.macs`); one no cut shrinks is a "fixed" layer.

Attention (timm-style, and nn.MultiheadAttention once `training.attention` splits it): a reshape of a
projection's channels into (heads, head dim), or (q/k/v, heads, head dim), starts a head view (`Heads`), which
moves, unbinds, products within each head (q kᵀ, scores times v, `F.scaled_dot_product_attention`),
softmax and scaling follow, until a reshape merges (heads, head dim) back into channels. q, k, v and the
merged output share one group whose unit is a head; the products are "attention" layers priced per kept
head; the cut rewrites the reshapes' head counts (`rewrite_shapes`). Softmax revives closed heads and a
product with a closed head zeroes them, so `_check_zeros` follows them too; any other op on heads pins them.

A group may not shrink when it is pinned, with the reason: network input and output, ops no cut handles
(a reshape that mixes channels, LayerNorm or GroupNorm across the channels, a split of the channel
axis, a grouped conv that changes the width), shared modules. A residual
branch (an operand of an add that holds convs and feeds nothing else) gets a `BlockGate`: closing it
removes the branch, and the add passes its other operand on.
"""
from __future__ import annotations

import math
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .custom_layers import rule_for
from .attention import split_attention
from .errors import TrainingError
from .macs import MATMULS, fixed_macs, layer_macs
from .macs import traced_shape as _shape


class GraphError(TrainingError, ValueError):
    """The network cannot be traced, or holds a pattern that no cut handles safely."""


# Channel-wise ops. ZERO_KEEPING map 0 to 0 (a closed channel stays closed); the others keep the channel
# space but revive closed channels (sigmoid(0) = 0.5), so no layer may read their output.
ZERO_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh,
                        nn.Hardtanh, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d, nn.Upsample)
# The identity in eval (their training-time noise is a per-sample or per-element factor: zeros stay zero).
IDENTITY_IN_EVAL_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                            nn.FeatureAlphaDropout)
IDENTITY_IN_EVAL_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                              F.feature_alpha_dropout}
IDENTITY_IN_EVAL_NAMES = {"stochastic_depth", "drop_path", "drop_block_2d"}  # fx-wrapped leaves (torchvision, timm)
ZERO_REVIVING_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
ZERO_KEEPING_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish,
                          torch.tanh, F.hardtanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.interpolate}
ZERO_REVIVING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
ZERO_KEEPING_METHODS = {"relu", "relu_", "contiguous", "clone", "tanh"}
ZERO_REVIVING_METHODS = {"sigmoid"}
ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
SUBS = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
MULS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
DIVS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
SHAPE_QUERIES = {"dim", "size"}
PRODUCING_KINDS = ("conv", "linear", "custom")  # layers whose output channels are a space of their own
READING_KINDS = PRODUCING_KINDS + ("depthwise", "grouped")  # layers whose outputs read their input channels

PERMUTES = {torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes"}
RESHAPES = {torch.reshape, "reshape", "view"}
SPLITS = {torch.chunk, "chunk", torch.split, "split", torch.tensor_split, "tensor_split", torch.unbind, "unbind"}
# Tensors made from a shape only (drop-path noise, masks): they read no channel of their source.
FACTORIES = {"new_empty", "new_zeros", "new_ones", "new_full", torch.empty_like, torch.zeros_like, torch.ones_like,
             torch.rand_like, torch.randn_like, torch.full_like}
# Norms whose statistics run across the channels: cutting some channels changes the others' values.
CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Leaf modules with weights and no MACs worth counting (lookups, per-channel scales and norms).
NO_MAC_MODULES = (nn.Embedding, nn.PReLU, nn.BatchNorm3d, *CROSS_CHANNEL_NORMS)


@dataclass(frozen=True)
class Segment:
    space: int   # channel space id (resolved to a group after the trace)
    width: int


Layout = tuple[Segment, ...]


@dataclass(frozen=True)
class Heads:
    """Where the heads lie in a tensor between the split of a q/k/v projection into heads and their merge
    into the output projection's input: axes of the batch, the heads, the head dimension (None once a
    product contracted it: the scores) and the q/k/v stack (None once unbound)."""
    layout: Layout          # the head space (one segment per part of the stack)
    batch: int
    head: int
    dim: int | None
    part: int | None = None

    def moved(self, where: Callable[[int], int | None]) -> "Heads":
        axes = [None if a is None else where(a) for a in (self.batch, self.head, self.dim, self.part)]
        return replace(self, batch=axes[0], head=axes[1], dim=axes[2], part=axes[3])


@dataclass(frozen=True)
class ShapeRewrite:
    """A size in a reshape that the cut must rewrite: the kept channels of `space`'s group, divided by
    `per` (the head dimension for a head count, 1 for the merged heads' width)."""
    node: str
    position: int   # index into the reshape's sizes
    space: int
    per: int = 1


@dataclass
class Layer:
    """A module whose weights a cut touches (conv, depthwise or grouped conv, linear, norm), with the
    channel layout of its input and output, or a layer that costs MACs no cut changes ("fixed": a conv or
    linear on pinned channels, a matrix product); its cost is `layer_macs`."""
    path: str     # module path; a function's node name
    kind: str     # "conv" | "depthwise" | "grouped" | "linear" | "norm" | "fixed"
    in_layout: Layout
    out_layout: Layout
    unit_macs: int = 0            # MACs per input-output channel pair (fixed: the layer's MACs)
    group_width: int = 1          # depthwise and grouped convs: input channels each output channel reads
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
    unit: int = 1   # kept channels come in aligned runs of this many (the groups of a grouped conv on it)
    head_dim: int = 0  # channels per attention head when the group is attention heads (0: it is not)

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
    uncounted: list[str] = field(default_factory=list)  # layers whose MACs are not in the cost (warned)
    channel_axis: dict[str, int] = field(default_factory=dict)  # gate point -> its channel axis, when not 1
    shape_rewrites: list[ShapeRewrite] = field(default_factory=list)  # sizes of head splits and merges

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
    was_training = model.training
    graph = _fx_trace(model)
    split = split_attention(model, graph)  # nn.MultiheadAttention as layers the cuts know, where it can be
    if split is not model:
        model, graph = split, _fx_trace(split)
    module = fx.GraphModule(model, graph, class_name=type(model).__name__)
    module.eval()  # shape propagation must not touch BatchNorm statistics
    try:
        with torch.no_grad():
            module(example_input)  # a plain run first: its error reads better than ShapeProp's node dump
            output = ShapeProp(module).propagate(example_input)
    except Exception as error:  # whatever the network raises on this input
        raise GraphError(f"{type(model).__name__} does not run on an input of shape {list(example_input.shape)}"
                         f"{_expected_input(module)} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    finally:
        module.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise GraphError(f"{type(model).__name__} returns a {type(output).__name__}; one logits tensor is needed")
    graph = _Analysis(module).run(tuple(example_input.shape[1:]))
    graph.output_shape = tuple(output.shape[1:])
    return graph


class _Tracer(fx.Tracer):
    """torch.fx's tracer, which also keeps the layers users registered (`training.custom_layers`) whole."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return rule_for(module) is not None or super().is_leaf_module(module, qualified_name)


def _fx_trace(model: nn.Module) -> fx.Graph:
    was_training = model.training
    model.eval()  # `if self.training` (drop path, functional dropout) traces to its eval form: the identity
    try:
        return _Tracer().trace(model)  # torch.nn and registered layers stay single calls; the rest is traced through
    except Exception as error:  # fx raises several types for data-dependent control flow
        raise GraphError(f"{type(model).__name__} cannot be traced by torch.fx ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); the forward pass must not branch "
                         "on tensor values") from None
    finally:
        model.train(was_training)


def _expected_input(module: fx.GraphModule) -> str:
    """What the first conv or linear reads, for an input that does not fit (empty when there is none)."""
    for node in module.graph.nodes:
        layer = module.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(layer, nn.modules.conv._ConvNd):
            return f"; its first layer {node.target} expects {layer.in_channels} input channels, (N, {layer.in_channels}, H, W)"
        if isinstance(layer, nn.Linear):
            return f"; its first layer {node.target} expects {layer.in_features} input features"
    return ""


def example_for(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """A zero batch for tracing `model` where it lives: on its weights' device (CUDA, meta), in their dtype.
    Batch 2: batch norms in training mode need more than one value per channel."""
    weight = next(model.parameters())
    return torch.zeros(batch, *input_shape, device=weight.device, dtype=weight.dtype)


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
        self.axis: dict[fx.Node, int] = {}               # the channel axis of a tensor, when not 1
        self.pieces: dict[fx.Node, list[Layout]] = {}    # layouts of the tensors a split returns
        self.layers: dict[str, Layer] = {}
        self.layer_node: dict[str, fx.Node] = {}
        self.pins: list[tuple[int, str]] = []
        self.revives: set[fx.Node] = set()   # outputs where closed channels come back to life
        self.zeroing: dict[fx.Node, list[fx.Node]] = {}  # a product: operands whose zeros make its output zero
        self.uncounted: list[str] = []       # layers whose MACs the analysis cannot count
        self.calls: Counter[str] = Counter()
        self.heads: dict[fx.Node, Heads] = {}              # tensors split into attention heads
        self.head_pieces: dict[fx.Node, list[Heads]] = {}  # q, k, v of an unbound stack
        self.head_dims: list[tuple[int, int]] = []         # (head space, head dimension): the group's unit
        self.shape_rewrites: list[ShapeRewrite] = []

    # -- helpers ----------------------------------------------------------------------------------
    def axis_of(self, node: fx.Node) -> int:
        return self.axis.get(node, 1)

    def fresh(self, node: fx.Node, pinned: str | None = None, axis: int = 1) -> Layout:
        shape = _shape(node)
        width = shape[axis] if shape is not None and len(shape) > max(axis, 1) else 0
        layout = (Segment(self.spaces.new(width), width),)
        self.layout[node] = layout
        if axis != 1:
            self.axis[node] = axis
        if pinned:
            self.pin(layout, pinned)
        return layout

    def pin(self, layout: Layout, why: str) -> None:
        self.pins.extend((segment.space, why) for segment in layout)

    def tensors(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.layout]

    def keep(self, node: fx.Node, source: fx.Node | None = None, axis: int | None = None) -> None:
        sources = [source] if source is not None else self.tensors(node)
        if not sources:
            return self.unsupported(node)
        self.layout[node] = self.layout[sources[0]]
        axis = self.axis_of(sources[0]) if axis is None else axis
        if axis != 1:
            self.axis[node] = axis

    def unsupported(self, node: fx.Node, why: str | None = None) -> None:
        target = _name(node.target)
        reason = why or f"{node.op} {target} ({node.name}) is not a channel-wise op the cuts understand"
        sources = self.tensors(node)
        for source in sources:
            self.pin(self.layout[source], reason)
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            same_rank = sources and len(_shape(sources[0]) or ()) == len(shape)
            self.fresh(node, pinned=reason, axis=self.axis_of(sources[0]) if same_rank else 1)
        elif isinstance(node.meta.get("tensor_meta"), (tuple, list)) and not hasattr(node.meta["tensor_meta"], "shape"):
            self.pieces[node] = [self.pinned_piece(meta, reason) for meta in node.meta["tensor_meta"]]

    def pinned_piece(self, meta, why: str) -> Layout:
        width = int(meta.shape[1]) if len(getattr(meta, "shape", ())) >= 2 else 0
        layout = (Segment(self.spaces.new(width), width),)
        self.pin(layout, why)
        return layout

    def width_in(self, operand, node: fx.Node) -> int:
        """The width `operand` has along `node`'s channel axis when broadcast to `node`'s shape (1: it is
        broadcast over the channels)."""
        out, shape = _shape(node) or (), _shape(operand) if isinstance(operand, fx.Node) else ()
        dim = self.axis_of(node) - (len(out) - len(shape or ()))
        return int(shape[dim]) if shape and dim >= 0 else 1

    def join(self, node: fx.Node, operands: list[fx.Node]) -> list[fx.Node]:
        """An elementwise op over tensors of one channel layout: their spaces become one, segment by
        segment; an operand broadcast over channels (width 1) leaves the layout alone. Returns the operands
        as wide as the output (a constant tensor among them pins the layout: no cut shrinks it)."""
        rank = len(_shape(node) or ())
        self.axis[node] = self.axis_of(next((o for o in operands if len(_shape(o) or ()) == rank), operands[0]))
        width = (_shape(node) or (0, 0))[self.axis_of(node)] if len(_shape(node) or ()) >= 2 else 0
        full = [o for o in operands if self.width_in(o, node) == width and width > 1] or operands[:1]
        constants = [a for a in node.all_input_nodes if a.op == "get_attr" and self.width_in(a, node) > 1]
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
        for constant in constants:
            self.pin(first, f"{node.name} combines the channels with the constant tensor {constant.target}, "
                            "which no cut shrinks")
        self.layout[node] = first
        if self.axis[node] == 1:
            del self.axis[node]
        return full

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
        # get_attr: a constant tensor; the op reading it decides (`join` pins what it touches)

    def visit_module(self, node: fx.Node) -> None:
        """A module call: on attention heads `visit_heads`; a layer the user registered (`rule_for`) on
        channels at axis 1 `visit_registered`; otherwise the MODULE_HANDLERS entry of its class or nearest
        base class, `visit_unsupported_module` when there is none."""
        path, module = node.target, self.modules[node.target]
        self.calls[path] += 1
        sources = self.tensors(node)
        if not sources:
            return self.unsupported(node)
        if any(s in self.heads for s in sources):
            return self.visit_heads(node, sources, module)
        rule = rule_for(module)
        if rule is not None and self.axis_of(sources[0]) == 1:
            return self.visit_registered(node, sources, rule)
        handler = next((MODULE_HANDLERS[cls] for cls in type(module).__mro__ if cls in MODULE_HANDLERS),
                       _Analysis.visit_unsupported_module)
        handler(self, node, sources)

    def visit_registered(self, node: fx.Node, sources: list[fx.Node], rule) -> None:
        """A layer a user registered (`training.custom_layers`): mixing like a conv, or per channel like a norm."""
        path, module, in_layout = node.target, self.modules[node.target], self.layout[sources[0]]
        if rule.maps == "per_channel":
            self.keep(node, node.all_input_nodes[0])
            self.add_layer(node, Layer(path, "norm", in_layout, in_layout))
        else:
            unit = rule.unit(module, _shape(node.all_input_nodes[0]), _shape(node))
            self.add_layer(node, Layer(path, "custom", in_layout, self.fresh(node), unit))

    def count_fixed(self, node: fx.Node, name: str, module: nn.Module | None = None) -> None:
        """A layer no cut shrinks still costs MACs: count them at its fixed widths, or say they are not."""
        macs = fixed_macs(node, module)
        if macs is None:
            if module is None or any(p.dim() >= 2 for p in module.parameters(recurse=False)) and \
                    not isinstance(module, NO_MAC_MODULES):
                self.uncounted.append(f"{name} ({type(module).__name__ if module else _name(node.target)})")
            return
        if macs:
            self.add_layer(node, Layer(name, "fixed", (), (), macs))

    def add_layer(self, node: fx.Node, layer: Layer) -> None:
        """Record a layer; a module called again costs its MACs again, as a fixed layer `path#<call>` (a
        module called twice is pinned, so its widths are its full widths)."""
        if layer.path in self.layers:
            self.pin(layer.in_layout + layer.out_layout, f"module {layer.path} is called more than once")
            if layer.kind == "norm":
                return
            layer = Layer(f"{layer.path}#{self.calls[layer.path]}", "fixed", (), (), int(layer_macs(layer)))
        layer.node = node.name
        self.layers[layer.path] = layer
        self.layer_node[layer.path] = node

    def visit_function(self, node: fx.Node) -> None:
        target, sources = node.target, self.tensors(node)
        if node.op == "call_method" and target in SHAPE_QUERIES:
            return  # sizes, not tensors
        if target is getattr:  # x.shape, x.dtype: not tensors; x.data: the same tensor; x.T, x.mT: moved axes
            if node.args[1] == "data" and sources:
                self.keep(node, sources[0])
            elif _shape(node) is not None:
                self.unsupported(node, f"{node.name} (.{node.args[1]}) reorders the axes of a tensor")
            return
        if target is operator.getitem and node.args[0] in self.head_pieces:
            return self.set_heads(node, self.head_pieces[node.args[0]][node.args[1]])
        if target is operator.getitem and node.args[0] in self.pieces:
            pieces = self.pieces[node.args[0]]
            self.layout[node] = pieces[node.args[1]]
            if self.axis_of(node.args[0]) != 1:
                self.axis[node] = self.axis_of(node.args[0])
            return
        if not sources:
            return  # arithmetic on sizes
        if any(s in self.heads for s in sources):
            return self.visit_heads(node, sources)
        handler = FUNCTION_HANDLERS.get(target) if _hashable(target) else None
        if handler is None and _name(target) in IDENTITY_IN_EVAL_NAMES:
            handler = _Analysis.visit_zero_keeping
        if handler is None:
            self.unsupported(node)
            if target in HEAVY_FUNCTIONS:
                self.count_fixed(node, node.name)
            return
        handler(self, node, sources)

    # -- module handlers: MODULE_HANDLERS maps module classes to these ------------------------------
    def visit_conv(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """nn.Conv2d on channels at axis 1: a plain conv starts a space; a depthwise or grouped one as wide
        as its input keeps it; a grouped one that changes the width is pinned."""
        path, conv, source = node.target, self.modules[node.target], sources[0]
        if self.axis_of(source) != 1:
            return self.visit_unsupported_module(node, sources)
        in_layout, out_shape = self.layout[source], _shape(node)
        unit = conv.kernel_size[0] * conv.kernel_size[1] * out_shape[2] * out_shape[3]
        group_width = conv.in_channels // conv.groups
        if conv.groups == 1:
            self.add_layer(node, Layer(path, "conv", in_layout, self.fresh(node), unit))
        elif conv.in_channels == conv.out_channels:  # each output channel reads its own group: one space
            self.layout[node] = in_layout
            kind = "depthwise" if group_width == 1 else "grouped"
            self.add_layer(node, Layer(path, kind, in_layout, in_layout, unit, group_width=group_width))
            offsets = [sum(s.width for s in in_layout[:i]) for i in range(len(in_layout) + 1)]
            if any(offset % group_width for offset in offsets):
                self.pin(in_layout, f"grouped convolution {path} has groups that straddle concatenated inputs")
        else:
            self.unsupported(node, f"grouped convolution {path} (groups={conv.groups}) maps {conv.in_channels} "
                                   f"channels to {conv.out_channels}: no cut keeps its groups whole")
            self.count_fixed(node, path, conv)

    def visit_linear(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """nn.Linear reading the channel axis as its last: a 1x1 conv over every position of an example."""
        source = sources[0]
        in_shape = _shape(source)
        if not in_shape or self.axis_of(source) != len(in_shape) - 1:
            return self.visit_unsupported_module(node, sources)
        unit = math.prod(in_shape[1:-1])  # positions per example
        out_layout = self.fresh(node, axis=len(in_shape) - 1)
        self.add_layer(node, Layer(node.target, "linear", self.layout[source], out_layout, unit))

    def visit_norm(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """BatchNorm on channels at axis 1: a member of its input's group."""
        source = sources[0]
        if self.axis_of(source) != 1:
            return self.visit_unsupported_module(node, sources)
        self.keep(node, source)
        self.add_layer(node, Layer(node.target, "norm", self.layout[source], self.layout[source]))

    def visit_unsupported_module(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """A module no handler takes, or one whose handler's condition fails: its channels are pinned with
        the most specific reason there is, and its MACs counted at its full widths."""
        path, module = node.target, self.modules[node.target]
        if isinstance(module, nn.MultiheadAttention):
            why = (f"nn.MultiheadAttention {path} is not called as batch-first self-attention without masks "
                   "(the only form whose heads are cut, `training.attention`)")
        elif isinstance(module, nn.Linear):
            why = f"linear {path} reads axis -1 of a tensor whose channel axis is {self.axis_of(sources[0])}"
        elif isinstance(module, CROSS_CHANNEL_NORMS):
            why = (f"{type(module).__name__} {path} normalises across channels: cutting some changes what it "
                   "computes for the rest")
        else:
            why = f"module {path} ({type(module).__name__}) is not a layer the cuts understand"
        self.unsupported(node, why)
        self.count_fixed(node, path, module)

    # -- handlers: FUNCTION_HANDLERS maps ops to these; the channel-wise ones serve MODULE_HANDLERS too --
    def visit_zero_keeping(self, node: fx.Node, sources: list[fx.Node]) -> None:
        self.keep(node, sources[0])

    def visit_zero_reviving(self, node: fx.Node, sources: list[fx.Node]) -> None:
        self.keep(node, sources[0])
        self.revives.add(node)

    def visit_add(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """x + y, x - y: closed channels come back when a constant or an operand broadcast over the
        channels (a 1-channel map, a per-sample scalar) is added to them."""
        full = self.join(node, sources)
        constant = len(sources) == 1 and not _is_zero(node.args)
        if constant or len(full) < len(sources) or any(a.op == "get_attr" for a in node.all_input_nodes):
            self.revives.add(node)

    def visit_product(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """x * y, x / y: the output is zero where an operand as wide as it is zero (a divisor is not)."""
        full = self.join(node, sources)
        numerators = full if node.target in MULS else [a for a in full if a is node.args[0]]
        if node.target in DIVS and len(node.args) > 1 and node.args[1] in full:
            self.pin(self.layout[node], f"{node.name} divides by channels that a gate may close (0 / 0)")
        self.zeroing[node] = numerators

    def visit_cat(self, node: fx.Node, sources: list[fx.Node]) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = len(_shape(node) or ())
        parts = node.args[0] if node.args else node.kwargs.get("tensors", ())
        axes = {self.axis_of(p) for p in parts if p in self.layout}
        if rank < 2 or len(axes) != 1 or any(p not in self.layout for p in parts):
            self.unsupported(node, f"{node.name} concatenates tensors the trace cannot line up")
            return
        if dim % rank != next(iter(axes)):  # along rows or tokens: every part has the same channels
            self.join(node, list(parts))
            return
        self.layout[node] = tuple(segment for part in parts for segment in self.layout[part])
        if next(iter(axes)) != 1:
            self.axis[node] = next(iter(axes))

    def visit_flatten(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """torch.flatten, x.flatten, nn.Flatten: the channel axis moves when axes before it merge; merging it
        with other axes keeps the channel order only when those are all of size 1."""
        if node.op == "call_module":
            module = self.modules[node.target]
            start, end = module.start_dim, module.end_dim
        else:
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
        source = sources[0]
        shape = _shape(source) or ()
        rank, axis = len(shape), self.axis_of(source)
        start, end = start % max(rank, 1), end % max(rank, 1)
        if axis < start:
            return self.keep(node, source)
        if axis > end:
            return self.keep(node, source, axis=axis - (end - start))
        # (N, C, 1, 1) -> (N, C) keeps the channel order; a spatial map would spread channels over features.
        if all(d == 1 for i, d in enumerate(shape) if start <= i <= end and i != axis):
            return self.keep(node, source, axis=start)
        self.unsupported(node, f"{node.name} flattens a {list(shape[1:])} map: features mix channels and "
                               "positions (pool to 1x1 first to let the last conv shrink)")

    def visit_mean(self, node: fx.Node, sources: list[fx.Node]) -> None:
        dims = _arg(node, 1, "dim", None)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        rank, axis = len(_shape(sources[0]) or ()), self.axis_of(sources[0])
        dims = tuple(d % rank for d in dims)
        if dims and axis not in dims and 0 not in dims:
            keepdim = _arg(node, 2, "keepdim", False)
            self.keep(node, sources[0], axis=axis if keepdim else axis - sum(d < axis for d in dims))
        else:
            self.unsupported(node, f"{node.name} averages over the channel axis")

    def visit_getitem(self, node: fx.Node, sources: list[fx.Node]) -> None:
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        axis = self.axis_of(sources[0])
        if all(isinstance(i, slice) for i in index) and index[0] == slice(None) and \
                (len(index) <= axis or index[axis] == slice(None)):
            self.keep(node, sources[0])  # spatial slicing
        else:
            self.unsupported(node, f"{node.name} indexes the channel axis: the cut cannot re-index it")

    def visit_pad(self, node: fx.Node, sources: list[fx.Node]) -> None:
        pad = list(_arg(node, 1, "pad", ()))
        rank, axis = len(_shape(sources[0]) or ()), self.axis_of(sources[0])
        padded = {rank - 1 - i // 2 for i, p in enumerate(pad) if p}
        if axis in padded:
            self.unsupported(node, f"{node.name} pads the channel axis")
        else:
            self.keep(node, sources[0])
            if _arg(node, 3, "value", 0) not in (0, None):
                self.revives.add(node)

    def visit_permute(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """permute / transpose: the channel axis moves (channels-last layers read it as the last axis)."""
        rank, axis = len(_shape(sources[0]) or ()), self.axis_of(sources[0])
        args = [a for a in node.args[1:]] or list(node.kwargs.values())
        if _name(node.target) == "permute":
            order = [d % rank for d in (args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)]
            moved = order.index(axis)
            batch_stays = order[0] == 0
        else:
            a, b = (d % rank for d in args[:2])
            moved = b if axis == a else a if axis == b else axis
            batch_stays = 0 not in (a, b)
        if not batch_stays:
            return self.unsupported(node, f"{node.name} moves the batch axis")
        self.keep(node, sources[0], axis=moved)

    def visit_split(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """chunk / split / narrow: pieces along another axis keep the channels; pieces of the channel axis
        are pinned (their sizes are constants of the graph, which a cut does not rewrite)."""
        dim = _arg(node, 1 if _name(node.target) in ("unbind", "narrow") else 2, "dim", 0)
        rank, axis = len(_shape(sources[0]) or ()), self.axis_of(sources[0])
        if dim % rank != axis and _name(node.target) != "unbind":
            if _name(node.target) == "narrow":
                return self.keep(node, sources[0])
            self.pieces[node] = [self.layout[sources[0]]] * len(node.meta.get("tensor_meta") or ())
            self.keep(node, sources[0])  # the tuple carries the source's channels too (`_check_zeros` reads it)
            return
        self.unsupported(node, f"{node.name} ({_name(node.target)}) splits the channel axis into pieces: the "
                               "cut cannot resize them")

    def visit_factory(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """A tensor made from its source's shape (drop-path noise): it reads no channel of the source."""
        self.fresh(node, pinned=f"{node.name} ({_name(node.target)}) is a made-up tensor", axis=self.axis_of(sources[0]))

    def visit_normalising(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """F.layer_norm, F.group_norm (LayerNorm2d written by hand): statistics across the channels."""
        self.unsupported(node, f"{_name(node.target)} ({node.name}) normalises across channels: cutting some "
                               "changes what it computes for the rest")

    def visit_matmul(self, node: fx.Node, sources: list[fx.Node]) -> None:
        self.unsupported(node, f"{node.name} multiplies matrices: its operands' channels are not cut")
        self.count_fixed(node, node.name)


    # -- attention heads: from the split of a projection into heads to their merge ------------------
    def set_heads(self, node: fx.Node, heads: Heads) -> None:
        self.heads[node] = heads
        self.layout[node] = heads.layout  # `_check_zeros` follows closed heads through the attention

    def visit_reshape(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """A channels-last projection split into (heads, head dim), or (q/k/v, heads, head dim) for a packed
        one: a head is a unit of the group, the head dimension stays, the head count follows the cut."""
        source = sources[0]
        shape, out, axis = _shape(source) or (), _shape(node) or (), self.axis_of(source)
        layout, sizes = self.layout[source], _sizes(node)
        tail = tuple(out[axis:]) if axis == len(shape) - 1 and tuple(out[:axis]) == tuple(shape[:axis]) else ()
        if sizes is None or len(tail) not in (2, 3) or len(layout) != 1 or math.prod(tail) != shape[axis]:
            return self.unsupported(node, f"{node.name} ({_name(node.target)}) reshapes the channel axis: of "
                                          "reshapes, only a split into attention heads is followed")
        parts, heads, dim = (1, *tail) if len(tail) == 2 else tail
        if parts > 1:
            layout = self.stack_of(source, parts)
            if layout is None:
                return self.unsupported(node, f"{node.name} splits a q/k/v stack that is not one projection's own "
                                              "output: its parts cannot be cut alike")
        self.head_dims.extend((segment.space, dim) for segment in layout)
        if sizes[len(out) - 2] != -1:
            self.shape_rewrites.append(ShapeRewrite(node.name, len(out) - 2, layout[0].space, dim))
        self.set_heads(node, Heads(layout, 0, len(out) - 2, len(out) - 1, axis if parts > 1 else None))

    def stack_of(self, source: fx.Node, parts: int) -> Layout | None:
        """The output of a linear read only by this split, re-laid out as `parts` copies of one head space
        (closing a head removes its q, k and v rows); None when that is not what `source` is."""
        layer = next((l for l in self.layers.values() if l.node == source.name and l.kind == "linear"), None)
        (segment,) = self.layout[source]
        space = self.spaces.find(segment.space)
        if layer is None or len(source.users) != 1 or segment.width % parts or \
                any(self.spaces.find(s) == space for s in range(len(self.spaces.parent)) if s != space):
            return None
        self.spaces.width[space] = 0  # the stack's space goes; collect drops groups of width 0
        width = segment.width // parts
        layout = (Segment(self.spaces.new(width), width),) * parts
        layer.out_layout = layout
        self.layout[source] = layout
        return layout

    def visit_heads(self, node: fx.Node, sources: list[fx.Node], module: nn.Module | None = None) -> None:
        """An op on a tensor split into heads: moves, unbinding the q/k/v stack, products within each head,
        softmax, scaling and dropout are followed; the merge back into channels ends it; anything else (an
        op that mixes heads, a bias added to the scores) pins the heads."""
        name = type(module).__name__ if module is not None else _name(node.target)
        heads = self.heads.get(sources[0])
        if heads is None or (module is not None and not isinstance(module, (nn.Softmax, *IDENTITY_IN_EVAL_MODULES,
                                                                                nn.Identity))):
            self.unsupported(node, f"{node.name} ({name}) works on attention heads in a way the cut cannot follow")
            return self.count_fixed(node, node.target, module) if module is not None else None
        rank = len(_shape(sources[0]) or ())
        if module is not None and not isinstance(module, nn.Softmax) or node.target in IDENTITY_IN_EVAL_FUNCTIONS \
                or name in ("contiguous", "clone", *IDENTITY_IN_EVAL_NAMES):
            return self.set_heads(node, heads)
        if node.target in PERMUTES:
            return self.heads_moved(node, heads, rank)
        if name in ("reshape", "view", "flatten"):
            return self.heads_merged(node, heads)
        if name in ("softmax", "Softmax"):
            dim = module.dim if module is not None else _arg(node, 1, "dim", None)
            if dim is None or dim % rank in (heads.batch, heads.head, heads.part):
                return self.unsupported(node, f"{node.name} (softmax) normalises across attention heads")
            self.set_heads(node, heads)
            self.revives.add(node)  # softmax(0) is uniform: zero only once multiplied by closed values
            return
        if node.target in MULS | DIVS and len(sources) == 1 and node.args[0] is sources[0]:
            return self.set_heads(node, heads)  # scaled by a number: zeros stay zero
        if node.target in (torch.unbind, "unbind") or node.target is operator.getitem:
            return self.heads_unbound(node, heads, rank)
        if node.target in MATMULS:
            return self.heads_product(node, sources, rank)
        if node.target is F.scaled_dot_product_attention:
            return self.heads_attention(node, sources)
        self.unsupported(node, f"{node.name} ({name}) works on attention heads in a way the cut cannot follow")

    def heads_moved(self, node: fx.Node, heads: Heads, rank: int) -> None:
        args = list(node.args[1:]) or list(node.kwargs.values())
        if _name(node.target) == "permute":
            order = [d % rank for d in (args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)]
            self.set_heads(node, heads.moved(order.index))
        else:
            a, b = (d % rank for d in args[:2])
            self.set_heads(node, heads.moved(lambda axis: b if axis == a else a if axis == b else axis))

    def heads_unbound(self, node: fx.Node, heads: Heads, rank: int) -> None:
        """q, k, v out of the stack: `unbind(part)` or `stack[i]` along the stack's axis."""
        pinned = f"{node.name} ({_name(node.target)}) indexes attention heads other than along the q/k/v stack"
        if heads.part is None:
            return self.unsupported(node, pinned)
        part = heads.part

        def piece(i: int) -> Heads:
            return replace(heads, layout=(heads.layout[i],), part=None).moved(lambda a: a - (a > part))
        if node.target is operator.getitem:
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if len(index) != part + 1 or not isinstance(index[part], int) or \
                    any(i != slice(None) for i in index[:part]):
                return self.unsupported(node, pinned)
            return self.set_heads(node, piece(index[part]))
        if _arg(node, 1, "dim", 0) % rank != part:
            return self.unsupported(node, pinned)
        self.layout[node] = heads.layout
        self.head_pieces[node] = [piece(i) for i in range(len(heads.layout))]

    def heads_product(self, node: fx.Node, sources: list[fx.Node], rank: int) -> None:
        """a @ b within each head: q kᵀ contracts the head dimension (the scores), scores @ v keeps v's. Zero
        where either operand's head is closed."""
        a, b = node.args[:2]
        ha, hb = self.heads.get(a), self.heads.get(b)
        batch_axes = set(range(rank - 2))
        if ha is None or hb is None or len(_shape(b) or ()) != rank or (ha.head, ha.batch) != (hb.head, hb.batch) \
                or not {ha.head, ha.batch} <= batch_axes or ha.part is not None or hb.part is not None:
            return self.unsupported(node, f"{node.name} multiplies attention heads with something other than "
                                          "the same heads")
        if ha.dim == rank - 1 and hb.dim == rank - 2:
            dim = None
        elif ha.dim is None and hb.dim == rank - 1:
            dim = rank - 1
        else:
            return self.unsupported(node, f"{node.name} multiplies the head dimension with tokens")
        self.join_heads(node, [a, b], replace(ha, dim=dim))
        self.zeroing[node] = [a, b]

    def heads_attention(self, node: fx.Node, sources: list[fx.Node]) -> None:
        """F.scaled_dot_product_attention(q, k, v): within each head; zero where v's head is closed."""
        q, k, v = (_arg(node, i, n, None) for i, n in enumerate(("query", "key", "value")))
        views = [self.heads.get(t) for t in (q, k, v)]
        rank = len(_shape(q) or ())
        mask = _arg(node, 3, "attn_mask", None)
        if None in views or isinstance(mask, fx.Node) or any(
                (h.batch, h.head, h.dim, h.part) != (0, views[0].head, rank - 1, None) for h in views):
            return self.unsupported(node, f"{node.name} (scaled_dot_product_attention) reads heads laid out "
                                          "differently, or a mask")
        self.join_heads(node, [q, k, v], views[0])
        self.zeroing[node] = [v]

    def join_heads(self, node: fx.Node, operands: list[fx.Node], heads: Heads) -> None:
        """Operands of one product: their heads are one space (q, k and v heads go together), and the
        product's MACs scale with the kept heads."""
        first = self.heads[operands[0]].layout
        for other in operands[1:]:
            layout = self.heads[other].layout
            if [s.width for s in layout] != [s.width for s in first]:
                return self.unsupported(node, f"{node.name} multiplies heads of different widths")
            for x, y in zip(first, layout):
                self.spaces.union(x.space, y.space)
        self.set_heads(node, heads)
        macs, width = fixed_macs(node), sum(s.width for s in first)
        if macs is None or macs % width:
            return self.count_fixed(node, node.name)
        self.add_layer(node, Layer(node.name, "attention", first, (), macs // width))

    def heads_merged(self, node: fx.Node, heads: Heads) -> None:
        """(B, N, heads, head dim) back to (B, N, channels): the heads' channels, in order, for the output
        projection."""
        shape, out = _shape(node.args[0]) or (), _shape(node) or ()
        merged = tuple(shape[:heads.head]) + (shape[heads.head] * shape[heads.head + 1],) + tuple(shape[heads.head + 2:])
        sizes = _sizes(node)
        if heads.part is not None or heads.batch != 0 or heads.dim != heads.head + 1 or tuple(out) != merged or \
                (sizes is None and _name(node.target) != "flatten"):
            return self.unsupported(node, f"{node.name} ({_name(node.target)}) merges attention heads other than "
                                          "(heads, head dim) into channels")
        self.layout[node] = heads.layout
        if heads.head != 1:
            self.axis[node] = heads.head
        if sizes is not None and sizes[heads.head] != -1:
            self.shape_rewrites.append(ShapeRewrite(node.name, heads.head, heads.layout[0].space))

    # -- results ----------------------------------------------------------------------------------
    def collect(self, input_shape: tuple[int, ...]) -> NetworkGraph:
        find = self.spaces.find
        roots = sorted({find(s) for s in range(len(self.spaces.parent))})
        # A group is named after its first producer in forward order.
        producers: dict[int, list[str]] = {root: [] for root in roots}
        for path, layer in self.layers.items():
            if layer.kind in PRODUCING_KINDS:
                producers[find(layer.out_layout[0].space)].append(path)
        groups: dict[int, ChannelGroup] = {}
        for root in roots:
            name = producers[root][0] if producers[root] else f"space{root}"
            groups[root] = ChannelGroup(name, self.spaces.width[root], producers=producers[root])
        for path, layer in self.layers.items():
            if layer.kind in ("norm", "depthwise", "grouped"):
                for segment in layer.out_layout:
                    groups[find(segment.space)].members.append(path)
            if layer.kind in PRODUCING_KINDS:
                for segment in layer.in_layout:
                    groups[find(segment.space)].consumers.append(path)
        for layer in self.layers.values():
            if layer.kind == "grouped":
                for segment in layer.in_layout:
                    group = groups[find(segment.space)]
                    group.unit = math.lcm(group.unit, layer.group_width)
                    if group.width % group.unit:
                        self.pins.append((segment.space, f"{layer.path} groups {layer.group_width} channels "
                                                         f"together, which do not tile {group.width}"))
        for space, dim in self.head_dims:
            group = groups[find(space)]
            group.unit, group.head_dim = math.lcm(group.unit, dim), dim
            if group.width % group.unit:
                self.pins.append((space, f"heads of {dim} channels do not tile {group.width}"))
        for space, why in self.pins:
            group = groups[find(space)]
            if why not in group.pinned:
                group.pinned.append(why)
        group_of_space = {s: groups[find(s)].name for s in range(len(self.spaces.parent))}
        by_name = {g.name: g for g in groups.values() if g.width}
        blocks = self.find_blocks()
        for block in blocks.values():
            inside = set(block.branch_nodes)
            for layer in self.layers.values():
                if layer.node in inside:
                    layer.blocks += (block.name,)
        graph = NetworkGraph(self.module, input_shape, by_name, self.layers, blocks, {}, group_of_space,
                             uncounted=self.uncounted, shape_rewrites=self.shape_rewrites)
        _check_zeros(self, graph)
        graph.channel_axis = {name: self.axis_of(self.layer_node[path]) for path, layer in self.layers.items()
                              if (name := layer.node) in graph.gate_points and self.axis_of(self.layer_node[path]) != 1}
        if self.uncounted:
            warnings.warn(f"the MACs of {', '.join(self.uncounted)} are not counted in the cost: the analysis "
                          "does not know their formula", stacklevel=3)
        return graph

    def find_blocks(self) -> dict[str, BlockGate]:
        found = []
        for node in self.module.graph.nodes:
            if node.target not in ADDS or len(self.tensors(node)) != 2:
                continue
            candidates = []
            for operand in self.tensors(node):
                if set(operand.users) != {node}:
                    continue  # used elsewhere too (the identity path): removing it is not removing a branch
                nodes = _branch(operand, node)
                modules = [n.target for n in nodes if n.op == "call_module"]
                names = {n.name for n in nodes}
                layers = [layer for layer in self.layers.values() if layer.node in names]
                macs = sum(layer_macs(layer) for layer in layers if layer.kind != "norm")
                if macs > 0 and all(n.op != "placeholder" for n in nodes):
                    candidates.append((macs, operand, nodes, modules, layers))
            if candidates:
                found.append((node, *max(candidates, key=lambda c: c[0])[1:]))  # the heavier path is the branch
        # a branch is named by its modules' common path; branches of one module (a transformer block's
        # attention and MLP) by their conv and linear layers' common paths
        names = [_common_path(modules) or node.name for node, _, _, modules, _ in found]
        by_layers = [_common_path([l.path for l in layers if l.kind in PRODUCING_KINDS]) for *_, layers in found]
        shared = {name for name in names if names.count(name) > 1}
        blocks: dict[str, BlockGate] = {}
        for (node, operand, nodes, modules, _), name, own in zip(found, names, by_layers):
            name = own if name in shared and own and by_layers.count(own) == 1 else name
            while name in blocks:
                name += "_"
            blocks[name] = BlockGate(name, node.name, operand.name, [n.name for n in nodes], modules)
        return blocks


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _hashable(target) -> bool:
    try:
        hash(target)
        return True
    except TypeError:
        return False


def _arg(node: fx.Node, position: int, name: str, default):
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def _table(*entries: tuple[Iterable, Callable]) -> dict:
    return {target: handler for targets, handler in entries for target in targets}


A = _Analysis
FUNCTION_HANDLERS = _table(
    (ZERO_KEEPING_FUNCTIONS | ZERO_KEEPING_METHODS | IDENTITY_IN_EVAL_FUNCTIONS, A.visit_zero_keeping),
    (ZERO_REVIVING_FUNCTIONS | ZERO_REVIVING_METHODS, A.visit_zero_reviving),
    (ADDS | SUBS, A.visit_add), (MULS | DIVS, A.visit_product),
    ({torch.cat, torch.concat}, A.visit_cat), ({torch.flatten, "flatten"}, A.visit_flatten),
    ({torch.mean, "mean"}, A.visit_mean), ({operator.getitem}, A.visit_getitem), ({F.pad}, A.visit_pad),
    (PERMUTES, A.visit_permute), (SPLITS | {torch.narrow, "narrow"}, A.visit_split),
    (FACTORIES, A.visit_factory), (RESHAPES, A.visit_reshape), ({F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}, A.visit_normalising), (MATMULS | {torch.addmm, torch.baddbmm, F.linear, F.conv1d, F.conv2d,
                                             F.conv3d, F.scaled_dot_product_attention}, A.visit_matmul),
)
"""Op -> how the trace reads it (call_function targets and call_method names); an op not here is pinned."""
HEAVY_FUNCTIONS = {torch.einsum, F.bilinear, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
MODULE_HANDLERS = _table(
    ({nn.Conv2d}, A.visit_conv), ({nn.Linear}, A.visit_linear), (NORM_MODULES, A.visit_norm),
    ({nn.Flatten}, A.visit_flatten), (ZERO_KEEPING_MODULES + IDENTITY_IN_EVAL_MODULES, A.visit_zero_keeping),
    (ZERO_REVIVING_MODULES, A.visit_zero_reviving),
)
"""Module class -> how the trace reads it; a module takes the entry of its class or nearest base class
(`visit_module`), one with none is pinned (`visit_unsupported_module`)."""
del A


def _sizes(node: fx.Node) -> list | None:
    """The sizes a reshape or view asks for (ints or size nodes), None for another op."""
    if _name(node.target) not in ("reshape", "view"):
        return None
    sizes = list(node.args[1:]) or list(node.kwargs.get("shape", ()))
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes


def rewrite_shapes(graph: NetworkGraph, kept: dict[str, list[int]], network: fx.GraphModule) -> None:
    """Set the head counts and merged widths of the reshapes in `network` (node for node the traced one) to
    the kept heads: `kept` maps a group to its kept channels; a group not in it keeps its width."""
    nodes = {node.name: node for node in network.graph.nodes}
    for rewrite in graph.shape_rewrites:
        node, group = nodes.get(rewrite.node), graph.group_of_space[rewrite.space]
        if node is None or group not in kept:
            continue  # removed with its branch, or not cut
        sizes = _sizes(node)
        sizes[rewrite.position] = len(kept[group]) // rewrite.per
        if "shape" in node.kwargs:
            node.kwargs = {**node.kwargs, "shape": tuple(sizes)}
        elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            node.args = (node.args[0], tuple(sizes))
        else:
            node.args = (node.args[0], *sizes)


def _is_zero(args) -> bool:
    return any(isinstance(a, (int, float)) and a == 0 for a in args)


def _branch(operand: fx.Node, add: fx.Node) -> list[fx.Node]:
    """`operand` and every node whose every use leads only into it: what closing the branch removes. One
    pass in reverse graph order settles it (a node's users come after it), shape reads of the branch's
    input (`x.shape` feeding its reshapes) included."""
    dead = {operand}
    for node in reversed(list(add.graph.nodes)[:list(add.graph.nodes).index(operand)]):
        unused_size = node.target is operator.getitem and not node.users  # `b, n, _ = x.shape`: the `_`
        if node.op not in ("placeholder", "get_attr") and (node.users or unused_size) and \
                all(u in dead for u in node.users):
            dead.add(node)
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
            # a layer whose every user is a norm of the group is covered by the norm's (folded) gate:
            # a depthwise or grouped conv of a closed channel reads zeros, and the norm zeroes its output
            covered = layer.kind in READING_KINDS and users and all(
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
            elif node in analysis.zeroing:  # a product: zero where an operand as wide as it is zero
                if any(a in safe for a in analysis.zeroing[node]) or all(a in safe for a in inputs):
                    safe.add(node)
            elif inputs and all(a in safe for a in inputs) and node.op != "placeholder":
                safe.add(node)
        changed = False
        for path, layer in graph.layers.items():
            if layer.kind not in READING_KINDS:
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
