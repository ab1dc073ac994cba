"""Pruning methods behind one small interface (`base.Method`) that the training loop calls."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..graph import NetworkGraph
from .activation_density import ActivationDensityMethod
from .base import Method, RunContext
from .dense import DenseMethod
from .flipout import FlipOutMethod
from .polarized import PolarizedMethod
from .torch_pruning import TorchPruningMethod

if TYPE_CHECKING:
    from ..config import TrainConfig

REGISTRY: dict[str, type[Method]] = {
    "dense": DenseMethod,
    "polarized": PolarizedMethod,
    "activation_density": ActivationDensityMethod,
    "flipout": FlipOutMethod,
    "torch_pruning": TorchPruningMethod,  # the peer: needs the benchmark-only Torch-Pruning package
}


def make_method(cfg: TrainConfig, graph: NetworkGraph) -> Method:
    if cfg.method not in REGISTRY:
        raise ValueError(f"method {cfg.method!r} is not available; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[cfg.method](cfg, graph)


__all__ = ["Method", "RunContext", "make_method", "REGISTRY"]
