"""The network a run's mask describes, freshly initialised: what the pruned architecture reaches when trained
from scratch with the dense recipe (Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019).

It tells a gap the method causes from one the smaller network has at the budget anyway. Train it as a
network of your own, with the dense method and the run's seed:

    python -m training --config configs/fmnist_resnet20_dense.yaml --set seed=S \\
        --set model=polarprune.bench.scratch:learned_network --set model_args='{"run": "runs/<name>"}'
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from polarprune.training.cutting import cut
from polarprune.training.graph import trace_network
from polarprune.training.mask import load_mask
from polarprune.training.networks import NetworkInfo, build_network


def learned_network(run: str) -> nn.Module:
    """The pruned network of `run` (its mask.json), every layer initialised anew at its pruned width the
    way the network initialises itself (a cut keeps the dense draw, sized for the dense fan)."""
    document, mask = load_mask(Path(run) / "mask.json")
    info = NetworkInfo.from_dict(document["network"])
    network = build_network(info)
    graph = trace_network(network, info.example_input())
    pruned = cut(graph, mask, graph.module)
    for module in pruned.modules():
        if module is not pruned and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    initialise = getattr(type(network), "_init_weights", None)
    if initialise is not None:  # the network's own scheme (the built-ins: Kaiming fan-out) on the cut layers
        initialise(pruned)
    return pruned
