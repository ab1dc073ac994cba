"""Methods that cut the network while it trains (activation density, Torch-Pruning): what they share.

The kept channels of every prunable unit are tracked as indices into the dense widths, so a run ends
with an ordinary mask. Each cut is the one export makes (`training.cutting.cut`, on a trace of the current
network); at the end the small network is put back into the dense shape with frozen gates
(`gating.embed`), which is what export cuts. A resumed run rebuilds the network its kept channels describe.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..gating import GatedNetwork, cut, embed, full_mask, mask_macs
from ..graph import example_for, trace_network
from ..mask import Mask
from .base import Method, RunContext


class ShrinkingMethod(Method):
    def __init__(self, cfg, graph):
        super().__init__(cfg, graph)
        self.dense_widths = {name: group.width for name, group in graph.prunable().items()}
        self.kept = {unit: list(range(width)) for unit, width in self.dense_widths.items()}  # dense indices
        self.finished = False  # the model is the dense-shaped gated network of `finish`
        self.dense_macs = mask_macs(graph, full_mask(graph))

    def restore_model(self) -> nn.Module:
        if self.finished:
            return GatedNetwork(self.graph, self.cfg.gate_init)
        return cut(self.graph, Mask(self.kept), self.graph.module)

    def composed(self, local: dict[str, list[int]]) -> dict[str, list[int]]:
        """Kept channels given as indices into the current widths (`local`, units left out keep all),
        as indices into the dense widths."""
        return {unit: [kept[i] for i in local[unit]] if unit in local else list(kept)
                for unit, kept in self.kept.items()}

    def kept_macs_ratio(self, kept: dict[str, list[int]]) -> float:
        """Kept MACs of the network `kept` (dense indices) describes, as a share of the dense network's:
        the count every method's `flops_ratio` uses."""
        return mask_macs(self.graph, Mask(kept)) / self.dense_macs

    def shrink(self, model: nn.Module, local: dict[str, list[int]]) -> nn.Module:
        """Cut `model` (the current, already smaller network) to the channels `local` keeps, indices into
        its current widths; the same model if nothing changes."""
        local = {unit: list(local.get(unit, range(len(kept)))) for unit, kept in self.kept.items()}
        if all(len(local[unit]) == len(kept) for unit, kept in self.kept.items()):
            return model
        self.kept = self.composed(local)
        current = trace_network(model, example_for(model, self.graph.input_shape))
        return cut(current, Mask(local), current.module).train(model.training)

    def finish(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        if self.finished:
            return model
        self.finished = True
        device = next(model.parameters()).device
        return embed(self.graph, model, Mask(self.kept), self.cfg.gate_init).to(device).train(model.training)

    def final_mask(self, model: nn.Module) -> Mask:
        return Mask({unit: list(channels) for unit, channels in self.kept.items()}, [])

    def state_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = {unit: list(channels) for unit, channels in state.get("kept", self.kept).items()}
        self.finished = bool(state.get("finished", False))
