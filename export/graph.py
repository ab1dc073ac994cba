"""Which layers must shrink together: channel dependency groups traced from the network itself.

The gated network is traced with torch.fx (gates stay opaque calls) and shapes are propagated once. Each
tensor's channel axis is a "channel space"; channel-wise ops (BatchNorm, ReLU, pooling, spatial slicing or
padding, multiplication by a gate, flatten of a 1x1 map) keep the space, convs and linears start a new
one, and a residual add joins the spaces of its operands. A gate enters the forward pass as a product
with `gate_multiplier(values)`, as the gate argument of `gated_relu(x, values)`, or as that of a norm
called as norm(x, values) (`training.models.GatedBatchNorm2d`); each multiplies the output channels. A
`ChannelGroup` is one joined space with all that must change when it shrinks: the convs producing it
(output channels), the BatchNorms on it, the convs/linears reading it (input channels) and the channel
gate that decides what stays.

Spaces that may not shrink here are pinned, with the reason: the network input and output, residual
streams (an add ties every producer feeding it), and anything an op maps in a way no cut handles. A gate
on a pinned space is an error. A width-1 gate on a branch is a `BlockGate`: closing it zeroes the branch,
so every module that feeds only that branch goes with it.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from training.gates import Gate, gate_multiplier, gated_relu

from . import ExportError

CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                       nn.Dropout)
CHANNELWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                         F.dropout}
CHANNELWISE_METHODS = {"relu", "contiguous"}
SHAPE_QUERIES = {"dim", "size"}  # call_methods that return numbers, not tensors


class GraphError(ExportError):
    """The network holds a pattern the dependency analysis cannot cut safely."""


@dataclass
class ChannelGroup:
    width: int
    producers: list[str] = field(default_factory=list)  # convs whose output channels form the space
    norms: list[str] = field(default_factory=list)      # BatchNorms applied to it
    consumers: list[str] = field(default_factory=list)  # convs/linears reading it as input channels
    gate: str | None = None                              # channel gate multiplying it
    pinned: list[str] = field(default_factory=list)     # why it may not shrink

    @property
    def unit(self) -> str | None:
        """The prunable unit this group belongs to: the gate's parent module ("layer1.0", "features.3")."""
        return self.gate.rpartition(".")[0] if self.gate else None


@dataclass
class BlockGate:
    gate: str
    branch_modules: list[str]  # modules feeding only this gated branch, gates included

    @property
    def unit(self) -> str:
        return self.gate.rpartition(".")[0]


@dataclass
class DependencyGraph:
    groups: list[ChannelGroup]
    block_gates: list[BlockGate]
    output_group: dict[str, ChannelGroup]  # conv/BN/linear path -> the group its output belongs to

    def prunable(self) -> dict[str, ChannelGroup]:
        """Unit name -> its channel-gated group, in forward order."""
        return {group.unit: group for group in self.groups if group.gate}

    def blocks(self) -> dict[str, BlockGate]:
        return {block.unit: block for block in self.block_gates}

    def gate_paths(self) -> list[str]:
        return [g.gate for g in self.groups if g.gate] + [b.gate for b in self.block_gates]


class _GateLeafTracer(fx.Tracer):
    """Gates stay single calls (their internals are training machinery); so do norms, whose subclasses
    may take gate values. `gate_multiplier` and `gated_relu` inspect the values' rank, so they are kept as
    one call too."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=(gate_multiplier, gated_relu))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (Gate, nn.BatchNorm2d)) or super().is_leaf_module(module, qualified_name)


class _Spaces:
    """Union-find over channel spaces, with what each space is attached to."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int] = []
        self.roles: list[tuple[int, str, str]] = []  # (space, role, module path or reason)

    def new(self, width: int) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.width[a] != self.width[b]:
                raise GraphError(f"{where}: joins {self.width[a]} and {self.width[b]} channels")
            self.parent[b] = a
        return a

    def attach(self, space: int, role: str, what: str) -> None:
        self.roles.append((space, role, what))


def _channels(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def trace_dependencies(model: nn.Module, input_shape: tuple[int, ...]) -> DependencyGraph:
    """Channel groups and block gates of `model` (usually the gated network) for one (C, H, W) input."""
    graph = _GateLeafTracer().trace(model)
    module = fx.GraphModule(model, graph)
    was_training = model.training
    model.eval()  # shape propagation must not touch BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(module).propagate(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
    return _Analysis(dict(model.named_modules()), graph).run()


class _Analysis:
    def __init__(self, modules: dict[str, nn.Module], graph: fx.Graph) -> None:
        self.modules, self.graph = modules, graph
        self.spaces = _Spaces()
        self.space_of: dict[fx.Node, int] = {}
        self.gate_of: dict[fx.Node, str] = {}       # nodes carrying gate values -> gate path
        self.block_muls: list[tuple[str, fx.Node]] = []
        self.calls: Counter[str] = Counter()

    def run(self) -> DependencyGraph:
        for node in self.graph.nodes:
            self.visit(node)
        return self.collect()

    # -- per node ---------------------------------------------------------------------------------
    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.space_of]

    def keep(self, node: fx.Node) -> None:
        """The output has the channel space of the (first) tensor input."""
        sources = self.tensor_args(node)
        if not sources:
            self.unsupported(node)
            return
        self.space_of[node] = self.space_of[sources[0]]

    def fresh(self, node: fx.Node, pinned: str | None = None) -> int:
        space = self.spaces.new(_channels(node) or 0)
        self.space_of[node] = space
        if pinned:
            self.spaces.attach(space, "pinned", pinned)
        return space

    def unsupported(self, node: fx.Node, why: str | None = None) -> None:
        reason = why or f"unsupported op {node.op} {getattr(node.target, '__name__', node.target)}"
        for source in self.tensor_args(node):
            self.spaces.attach(self.space_of[source], "pinned", reason)
        if _channels(node) is not None:
            self.fresh(node, pinned=reason)

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.fresh(node, pinned="network input")
        elif node.op == "output":
            for source in self.tensor_args(node):
                self.spaces.attach(self.space_of[source], "pinned", "network output")
        elif node.op == "call_module":
            self.visit_module(node)
        elif node.op == "call_function":
            self.visit_function(node)
        elif node.op == "call_method":
            if node.target in CHANNELWISE_METHODS:
                self.keep(node)
            elif node.target == "flatten":
                self.visit_flatten(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
            elif node.target not in SHAPE_QUERIES:
                self.unsupported(node)
        else:  # get_attr: a constant tensor used by the graph
            self.unsupported(node)

    def visit_module(self, node: fx.Node) -> None:
        path, module = node.target, self.modules[node.target]
        self.calls[path] += 1
        if isinstance(module, Gate):
            self.gate_of[node] = path
            return
        sources = self.tensor_args(node)
        if (isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module, nn.Linear):
            self.spaces.attach(self.space_of[sources[0]], "consumer", path)
            self.spaces.attach(self.fresh(node), "producer", path)
        elif isinstance(module, nn.BatchNorm2d):
            self.keep(node)
            self.spaces.attach(self.space_of[node], "norm", path)
            if self.gates_among(node):  # norm(x, gate values): the gate multiplies the norm's output
                self.visit_gated(node)
        elif isinstance(module, CHANNELWISE_MODULES):
            self.keep(node)
        else:
            self.unsupported(node, f"unsupported module {path} ({type(module).__name__})")

    def visit_function(self, node: fx.Node) -> None:
        target = node.target
        if target is gate_multiplier:
            self.gate_of[node] = self.gate_of[node.args[0]]
        elif target is gated_relu:  # relu, then the gate multiplies the channels
            self.visit_gated(node)
        elif target in CHANNELWISE_FUNCTIONS:
            self.keep(node)
        elif target in (operator.add, torch.add):
            self.visit_join(node, "residual add")
        elif target in (operator.mul, torch.mul):
            self.visit_mul(node)
        elif target is torch.flatten:
            self.visit_flatten(node, node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
        elif target is operator.getitem:
            index = node.args[1]
            full_channels = (isinstance(index, tuple) and len(index) >= 2
                             and index[0] == slice(None) and index[1] == slice(None))
            if full_channels:  # spatial subsampling, as in option-A shortcuts
                self.keep(node)
            else:
                self.unsupported(node, "channel indexing")
        elif target is F.pad:
            pad = list(node.args[1])
            if any(pad[4:]):  # pads channels (option-A shortcut): a new, fixed channel layout
                self.unsupported(node, "channel padding")
            else:
                self.keep(node)
        else:
            self.unsupported(node)

    def visit_join(self, node: fx.Node, reason: str) -> None:
        sources = self.tensor_args(node)
        if not sources:
            self.unsupported(node)
            return
        space = self.space_of[sources[0]]
        for other in sources[1:]:
            space = self.spaces.union(space, self.space_of[other], f"{reason} {node.name}")
        if len(sources) > 1:
            self.spaces.attach(space, "pinned", reason)
        self.space_of[node] = space

    def gates_among(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a in self.gate_of]

    def visit_mul(self, node: fx.Node) -> None:
        if self.gates_among(node):
            self.visit_gated(node)
        else:
            self.visit_join(node, "elementwise product")

    def visit_gated(self, node: fx.Node) -> None:
        """`node` outputs one activation's channels multiplied by a gate's values: a channel gate on that
        space when the widths match, a block gate on the branch ending here when the gate has width 1."""
        gates, sources = self.gates_among(node), self.tensor_args(node)
        if len(sources) != 1:
            self.unsupported(node, "gate applied to a non-activation")
            return
        if len(gates) != 1:
            raise GraphError(f"{node.name}: {len(gates)} gates multiply one activation")
        path = self.gate_of[gates[0]]
        gate_width, channels = self.modules[path].width, _channels(node)
        self.space_of[node] = self.space_of[sources[0]]
        if gate_width == channels:
            self.spaces.attach(self.space_of[node], "gate", path)
        elif gate_width == 1:
            self.block_muls.append((path, node))
        else:
            raise GraphError(f"gate {path} has width {gate_width} but multiplies {channels} channels")

    def visit_flatten(self, node: fx.Node, start_dim: int) -> None:
        shape = _shape(node.args[0])
        # Flattening a (N, C, 1, 1) map keeps the channel order; anything else mixes space into features.
        if start_dim == 1 and all(d == 1 for d in shape[2:]):
            self.keep(node)
        else:
            self.unsupported(node, "flatten of a spatial map")

    # -- groups -----------------------------------------------------------------------------------
    def collect(self) -> DependencyGraph:
        groups: dict[int, ChannelGroup] = {}
        order = sorted({self.spaces.find(s) for s in range(len(self.spaces.parent))})
        for root in order:
            groups[root] = ChannelGroup(width=self.spaces.width[root])
        output_group: dict[str, ChannelGroup] = {}
        for space, role, what in self.spaces.roles:
            group = groups[self.spaces.find(space)]
            if role == "gate":
                if group.gate is not None:
                    raise GraphError(f"gates {group.gate} and {what} multiply the same channels")
                group.gate = what
            elif role == "pinned":
                if what not in group.pinned:
                    group.pinned.append(what)
            else:
                getattr(group, role + "s").append(what)
                if role in ("producer", "norm"):
                    output_group[what] = group
        for path, count in self.calls.items():
            if count > 1:  # a shared module would be cut once for every use
                for group in groups.values():
                    if path in group.producers + group.norms + group.consumers:
                        group.pinned.append(f"module {path} is called {count} times")
        for group in groups.values():
            if group.gate and group.pinned:
                raise GraphError(f"gate {group.gate} sits on channels that cannot shrink "
                                 f"({', '.join(group.pinned)})")
        block_gates = [BlockGate(path, self.branch_of(mul)) for path, mul in self.block_muls]
        return DependencyGraph([g for g in groups.values() if g.width], block_gates, output_group)

    def branch_of(self, gated: fx.Node) -> list[str]:
        """Modules whose every use ends in `gated` (the branch a closed block gate removes)."""
        dead = {gated}
        for node in reversed(self.graph.nodes):
            if node.users and node not in dead and all(user in dead for user in node.users):
                dead.add(node)
        return [n.target for n in self.graph.nodes if n in dead and n.op == "call_module"]
