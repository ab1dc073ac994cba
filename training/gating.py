"""Gates in any traced network (their cost: `training.cost`; the cut: `training.cutting`).

`GatedNetwork` wraps a copy of the user's network, traced once (`training.graph`), with a channel `Gate`
per prunable group and a block `Gate` per residual branch inserted into the traced graph: a gate point's
output is multiplied by its groups' gate values (ones for channels that cannot go), a branch output by its
block gate; its forward pass evaluates the static gates together first (`training.gates.StaticGates`).
The user's modules keep their paths and state-dict keys. All gates start open (score
`init_score` > 0, hard value 1), so before the first step the gated network computes exactly what the
network computed.

The gates' cost is `training.cost` with gate values for widths: widths are sums of gate values and a
closed block switches its layers off, so hard gates give the exact kept cost and the straight-through
estimator its gradient.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

# The cost and the cut moved to training/cost.py and training/cutting.py; importers of other branches still
# find them here.
from .cost import (Cost, MacsCost, Number, check_mask, costed_layers, full_mask, group_units,  # noqa: F401
                   group_widths, kept_macs, layer_sum, mask_cost, mask_macs, mask_problem, mask_widths)
from .cutting import cut, kept_index  # noqa: F401
from .gates import Gate, StaticGates, hold_unpulled, straight_through
from .graph import PRODUCING_KINDS, NetworkGraph
from .mask import GateDecision, Mask, MaskError, MaskProblem, choose_mask  # noqa: F401 (MaskError: importers)


def gate_values(*parts: torch.Tensor | int, block: torch.Tensor | None = None) -> torch.Tensor:
    """One multiplier for a tensor's channels: gate values (C,) or, for dynamic gates, (N, C) per part,
    an int for channels no gate covers (ones), all times the block gate of a branch output."""
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    if not tensors:
        return block
    batch = next((t.shape[0] for t in tensors if t.dim() == 2), None)
    pieces = []
    for part in parts:
        if not isinstance(part, torch.Tensor):
            part = tensors[0].new_ones(part)
        if batch is not None and part.dim() == 1:
            part = part.expand(batch, -1)
        pieces.append(part)
    values = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    return values if block is None else values * block


def gate_channels(x: torch.Tensor, values: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """x (N, C, ...) times per-channel values (C,), (N, C) or (1,)/(N, 1) for a block gate alone; `axis`:
    the channel axis of a channels-last tensor (N, ..., C)."""
    shape = [values.shape[0] if values.dim() > 1 else 1] + [1] * (x.dim() - 1)
    shape[axis] = values.shape[-1]
    return x * values.view(shape)


torch.fx.wrap("gate_values")
torch.fx.wrap("gate_channels")


class GatedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose output a static gate multiplies, folded into the affine parameters: bn with
    (weight * g, bias * g) costs C numbers instead of a pass over the activation, and its gradient comes
    from the weight and bias gradients the norm computes anyway. Running statistics are updated exactly
    as nn.BatchNorm2d updates them; the state dict is nn.BatchNorm2d's."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        # nn.BatchNorm2d.forward's bookkeeping, unchanged
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        buffers = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if buffers else None, self.running_var if buffers else None,
                            self.weight * gate, self.bias * gate, batch_stats, factor, self.eps)


def _retype_norm(norm: nn.BatchNorm2d, kind: type) -> nn.BatchNorm2d:
    """The same norm (same parameter and buffer tensors) as another BatchNorm2d class."""
    twin = kind.__new__(kind)
    twin.__dict__.update(norm.__dict__)
    return twin


def _key(name: str) -> str:
    return name.replace(".", "__")


def _node_of(graph: NetworkGraph, path: str) -> str:
    return graph.layers[path].node


def _channels(node: fx.Node | None) -> int | None:
    return int(node.meta["tensor_meta"].shape[1]) if node is not None else None


def _replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class GatedNetwork(nn.Module):
    """A user's network with polarized gates; see the module docstring. A channel gate decides per unit of
    `round_to` channels (`training.mask.unit_sizes`) and keeps at least one, so the gated network always has
    a width that deploys, and the cost the gates see is the cost of the network that ships. `dynamic=True`
    gives every gate an input-dependent head on its group's (or branch's) input; the static mask is a vote
    over inputs. `score_clamp` bounds the scores (`training.gates.Gate`)."""

    def __init__(self, graph: NetworkGraph, init_score: float = 2.0, dynamic: bool = False, round_to: int = 1,
                 score_clamp: float = 0.0):
        super().__init__()
        self.graph, self.dynamic, self.round_to, self.score_clamp = graph, dynamic, round_to, score_clamp
        self.macs_cost = MacsCost(graph)  # the default cost of `kept_ratio`, priced every step: built once
        template = copy.deepcopy(graph.module)  # the trace stays as it was: a template, not the weights
        network = fx.GraphModule(template, template.graph, class_name="GatedNetwork")
        nodes = {node.name: node for node in network.graph.nodes}
        self._gate_inputs: dict[str, fx.Node | None] = {}
        channel, block = {}, {}
        units = group_units(graph, round_to)
        for name, group in graph.prunable().items():
            source = self._dynamic_input(nodes[_node_of(graph, group.producers[0])])
            channel[_key(name)] = Gate(units[name], init_score, _channels(source),
                                       min_open=1, score_clamp=score_clamp)
            self._gate_inputs[f"channel_gates.{_key(name)}"] = source
        for name, block_gate in graph.blocks.items():
            first = next(n for n in block_gate.branch_nodes if nodes[n].op == "call_module")
            source = self._dynamic_input(nodes[first])
            block[_key(name)] = Gate([1], init_score, _channels(source), score_clamp=score_clamp)
            self._gate_inputs[f"block_gates.{_key(name)}"] = source
        network.add_submodule("channel_gates", nn.ModuleDict(channel))  # gates live in the network only:
        network.add_submodule("block_gates", nn.ModuleDict(block))      # one state-dict entry each
        self._insert_gates(network, nodes)
        self.network = network
        self.static_gates: StaticGates | None = None  # the gates of the last forward pass evaluated together

    @property
    def channel_gates(self) -> nn.ModuleDict:
        return self.network.channel_gates

    @property
    def block_gates(self) -> nn.ModuleDict:
        return self.network.block_gates

    def _dynamic_input(self, consumer: fx.Node) -> fx.Node | None:
        """The tensor a dynamic gate's head reads: the input of its group's first producer (or of its
        branch's first layer), when that is a (N, C, H, W) map."""
        if not self.dynamic:
            return None
        source = consumer.all_input_nodes[0]
        shape = getattr(source.meta.get("tensor_meta"), "shape", ())
        return source if len(shape) == 4 else None

    def _insert_gates(self, network: fx.GraphModule, nodes: dict[str, fx.Node]) -> None:
        prunable = self.graph.prunable()
        block_at = {b.branch_output: name for name, b in self.graph.blocks.items()}
        points = dict(self.graph.gate_points)
        for output in block_at:  # a branch output whose channels cannot go still carries its block gate
            if output not in points:
                points[output] = ()
        for node_name, layout in points.items():
            node = nodes[node_name]
            module = network.get_submodule(node.target) if node.op == "call_module" else None
            # a gate on a norm's output folds into its affine parameters: no pass over the activation
            fold = type(module) is nn.BatchNorm2d and module.affine and not self.dynamic
            with network.graph.inserting_before(node if fold else node.next):  # keeps creation order
                parts: list[fx.Node | int] = []
                for segment in layout:
                    group = self.graph.group_of_space[segment.space]
                    parts.append(self._call_gate(network, f"channel_gates.{_key(group)}") if group in prunable
                                 else segment.width)
                block_value = None
                if node_name in block_at:
                    block_value = self._call_gate(network, f"block_gates.{_key(block_at[node_name])}")
                values = network.graph.call_function(gate_values, tuple(parts), {"block": block_value})
                if not fold:
                    axis = self.graph.channel_axis.get(node_name, 1)  # channels-last layers (training.graph)
                    gated = network.graph.call_function(gate_channels, (node, values), {"axis": axis} if axis != 1 else {})
            if fold:
                _replace_module(network, node.target, _retype_norm(module, GatedBatchNorm2d))
                node.args = (*node.args, values)
            else:
                node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
        network.graph.lint()
        network.recompile()

    def _call_gate(self, network: fx.GraphModule, target: str) -> fx.Node:
        source = self._gate_inputs[target]
        return network.graph.call_module(target, (source,) if source is not None else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learning = [g for g in self.gates().values() if g.head is None and g.learns]
        if not learning:
            self.static_gates = None
            return self.network(x)
        if self.static_gates is None or not self.static_gates.fits(learning):
            self.static_gates = StaticGates(learning)
        self.static_gates.evaluate()
        try:
            return self.network(x)
        finally:
            self.static_gates.release()

    # -- gate values ------------------------------------------------------------------------------
    def channel_gate(self, group: str) -> Gate:
        return self.channel_gates[_key(group)]

    def block_gate(self, block: str) -> Gate:
        return self.block_gates[_key(block)]

    def kept_widths(self, expected: bool = False) -> tuple[dict[str, Number], dict[str, Number]]:
        """Kept width of every group and value of every block from the gate values of the last forward
        pass (averaged over inputs for dynamic gates), or with `expected` from its gate probabilities;
        they carry the gradients to the scores."""
        together = self.static_gates
        widths = dict(zip(together.gates, together.kept_widths(expected))) if together is not None else {}

        def width(gate: Gate) -> Number:
            return widths[gate] if gate in widths else gate.kept_width(expected)
        return ({name: width(self.channel_gate(name)) for name in self.graph.prunable()},
                {name: width(self.block_gate(name)) for name in self.graph.blocks})

    def kept_ratio(self, cost: Cost | None = None, expected: bool = False) -> torch.Tensor:
        """Kept / dense cost (default: MACs) of the last forward pass's hard gates (the network it ran,
        STE gradients), or with `expected` of its gate probabilities."""
        cost = cost or self.macs_cost
        return torch.as_tensor(cost.kept(*self.kept_widths(expected)) / cost.dense)

    def band_ratio(self, cost: Cost, target: float, tolerance: float, final: bool = False,
                   hold: float = 0.0) -> torch.Tensor:
        """`kept_ratio(cost)` whose gradient reaches only the gates whose flip lands the ratio within
        `tolerance` of `target`, or nearer to it than it is: a term on it never pushes a unit or block whose
        flip would jump further past the target than the ratio now misses it. Each flip is priced by the
        ratio's slope in that gate's value (exact for a block, first order for a unit).

        With `final` (the target no longer moves) and the ratio out of the band, the choice is made over all
        gates together, in tiers, the first that has any flip: those that land in the band; those that land
        nearer on the same side of the target; those that land nearer; and, when no single flip gets nearer
        (0.648 under a 0.7 target on ResNet-20: a block is 0.117, a unit 0.029), those that carry the ratio
        across the target, from where a flip into the band exists. Without the tiers a cheap step back
        (reclose the block just opened) competes with the one that lands. Within the band, with `hold` (the
        sign of the term's push: > 0 closes), the gradient also reaches the gates already in the state the
        push keeps them in (closed for hold > 0), so the term holds them against the task loss."""
        learning = [g for g in self.gates().values() if g.learns and g.last_values is not None]
        together = self.static_gates
        ratio = self.kept_ratio(cost)
        if together is None or together.gates != learning or not ratio.requires_grad:
            return ratio  # nothing moves, or dynamic gates (a value per input): every gate may move
        slope, = torch.autograd.grad(ratio, together.values)  # every unit of every gate, in one vector
        values = together.values.detach()
        now = float(ratio.detach())
        after = torch.where(values > 0.5, now - slope, now + slope)
        miss, moves = (after - target).abs(), slope != 0  # a unit inside a closed block moves nothing
        lands, nearer = moves & (miss <= tolerance), moves & (miss < abs(now - target))
        crosses = (after - target) * (now - target) < 0
        held = moves & ((values < 0.5) if hold > 0 else (values > 0.5)) & (hold != 0)
        tiers = [lands | nearer]  # in the band, the flips that stay in it (none lands nearer outside it)
        if final and abs(now - target) <= tolerance:
            tiers = [lands | nearer | held]
        elif final:
            tiers = [lands, nearer & ~crosses, nearer, crosses]
        chosen = next((tier for tier in tiers if bool(tier.any())), tiers[-1]).to(slope.dtype)
        together.pull(chosen)
        # The ratio is multilinear in the gate values, so its gradient in one gate's values is that gate's
        # slope whichever others move: the ratio with only the chosen units' gradient is this sum.
        change = together.values - values  # 0, STE gradient
        return ratio.detach() + (slope * chosen * change).sum()

    @property
    def dense_macs(self) -> float:
        return self.macs_cost.dense

    def gate_probs(self, held: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(unit probabilities per channel gate, block gate probabilities) of the last forward pass, of the
        gates that learn; `held`: without gradient to the units the target term moved (`Gate.held_probs`)."""
        together, evaluated = self.static_gates, {}
        if together is not None:
            all_probs = hold_unpulled(together.probs, together.pulled) if held else together.probs
            evaluated = dict(zip(together.gates, all_probs.split(together.units)))

        def probs(gate: Gate) -> torch.Tensor:
            return evaluated[gate] if gate in evaluated else gate.held_probs() if held else gate.last_probs
        return ([probs(g) for g in self.channel_gates.values() if g.learns],
                [probs(g) for g in self.block_gates.values() if g.learns])

    # -- the mask ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decisions(self) -> tuple[dict[str, GateDecision], dict[str, tuple[bool, float]]]:
        """Open = score > 0, confidence = sigmoid(score), per unit of each channel group and per block."""
        channels = {}
        for name in self.graph.prunable():
            gate = self.channel_gate(name)
            score = torch.full_like(gate.score, 10.0) if gate.fixed else gate.score
            is_open, _ = straight_through(score.detach(), gate.min_open)  # as the forward pass opens them
            channels[name] = GateDecision((is_open > 0.5).cpu(), torch.sigmoid(score).cpu())
        scores = {name: self.block_gate(name).score[0] for name in self.graph.blocks}
        blocks = {name: (bool(score > 0), float(torch.sigmoid(score))) for name, score in scores.items()}
        return channels, blocks

    def mask_problem(self, cost: Cost | None = None) -> MaskProblem:
        return mask_problem(self.graph, cost or self.macs_cost, self.round_to)

    def mask(self, target_ratio: float | None = None, tolerance: float = 0.02) -> Mask:
        """The static sub-network the gates chose, moved into the target band when `target_ratio` is given."""
        channels, blocks = self.decisions()
        return choose_mask(self.mask_problem(), channels, blocks, target_ratio, tolerance)

    @torch.no_grad()
    def freeze(self, mask: Mask) -> None:
        """Fix every gate to `mask` (hard 0/1); the network then computes what `cut(mask)` computes."""
        check_mask(self.graph, mask)
        gone = {g for b in mask.closed_blocks for g in self.graph.groups_inside(b)}
        for name, group in self.graph.prunable().items():
            values = torch.zeros(group.width)
            if name not in gone:
                values[mask.kept_channels[name]] = 1.0
            self.channel_gate(name).freeze(values)
        for name in self.graph.blocks:
            self.block_gate(name).freeze(torch.tensor([0.0 if name in mask.closed_blocks else 1.0]))

    def plain(self) -> fx.GraphModule:
        """The network without gates (a copy holding the trained weights), node for node the traced one."""
        step_values = {name: (g.last_values, g.last_probs) for name, g in self.gates().items()}
        for gate in self.gates().values():  # values of the last step carry autograd history: not copyable
            gate.last_values = gate.last_probs = None
        try:
            plain = copy.deepcopy(self.network)
        finally:
            for name, gate in self.gates().items():
                gate.last_values, gate.last_probs = step_values[name]
        graph = plain.graph
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is gate_channels:
                node.replace_all_uses_with(node.args[0])
            elif node.op == "call_module" and isinstance(plain.get_submodule(node.target), GatedBatchNorm2d):
                _replace_module(plain, node.target, _retype_norm(plain.get_submodule(node.target), nn.BatchNorm2d))
                node.args = node.args[:1]
        for node in reversed(list(graph.nodes)):
            if not node.users and (node.target in (gate_channels, gate_values) or node.op == "call_module"
                                   and node.target.split(".")[0] in ("channel_gates", "block_gates")):
                graph.erase_node(node)
        plain.delete_all_unused_submodules()
        graph.lint()
        plain.recompile()
        return plain

    def gates(self) -> dict[str, Gate]:
        """Gate path -> gate: "channel_gates.<group>" and "block_gates.<block>" (group and block names
        with "." written "__")."""
        return {f"channel_gates.{k}": g for k, g in self.channel_gates.items()} | \
               {f"block_gates.{k}": g for k, g in self.block_gates.items()}


@torch.no_grad()
def embed(graph: NetworkGraph, small: nn.Module, mask: Mask, init_score: float = 2.0,
          gate_state: dict[str, torch.Tensor] | None = None, round_to: int = 1,
          dynamic: bool = False) -> GatedNetwork:
    """The dense-shaped gated network equal to `small` (`cut(graph, mask)` in shape): its weights at the
    kept channel positions, every removed channel and closed branch zeroed (batch-norm shift included),
    gates frozen to `mask` (their scores from `gate_state`, a GatedNetwork state dict's gate entries, when
    given, from gates of `round_to` units, dynamic or not). What a method that trained a cut network hands to export."""
    gated = GatedNetwork(graph, init_score, dynamic, round_to=round_to)
    if gate_state:
        gated.load_state_dict(gate_state, strict=False)
    small_state = small.state_dict()
    targets = gated.network.state_dict()
    for key in targets:
        path, _, leaf = key.rpartition(".")
        layer = graph.layers.get(path)
        if layer is None:
            continue  # gates
        value = small_state.get(key)
        target = torch.ones_like(targets[key]) if leaf == "running_var" else torch.zeros_like(targets[key])
        if value is None:
            pass  # a layer of a closed branch: zeros
        elif value.dim() == 0:
            target = value.clone()
        else:
            keep_out = kept_index(graph, layer.out_layout, mask)
            keep_in = kept_index(graph, layer.in_layout, mask) if layer.kind in PRODUCING_KINDS else None
            if keep_in is not None and value.dim() > 1:
                spread = torch.zeros(value.shape[0], *target.shape[1:], dtype=value.dtype)
                value = spread.index_copy_(1, keep_in, value.cpu())
            if keep_out is not None:
                target.index_copy_(0, keep_out, value.cpu())
            else:
                target.copy_(value)
        targets[key] = target
    gated.network.load_state_dict(targets, strict=True)
    gated.freeze(mask)
    return gated


@torch.no_grad()
def masked_network(graph: NetworkGraph, plain: nn.Module, mask: Mask) -> GatedNetwork:
    """`plain` (the traced network in its dense shape, trained weights) with every gate frozen to `mask`:
    what `cut(graph, mask, plain)` must compute, reached by another path (gates multiply, nothing is cut)."""
    gated = GatedNetwork(graph)
    missing, unexpected = gated.network.load_state_dict(plain.state_dict(), strict=False)
    stray = [key for key in missing if not key.startswith(("channel_gates.", "block_gates."))]
    if stray or unexpected:
        raise ValueError(f"the weights do not fit the traced network (missing {stray[:3]}, unexpected "
                         f"{list(unexpected)[:3]})")
    gated.freeze(mask)
    return gated.eval()
