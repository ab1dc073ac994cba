"""Surgery: the physically smaller network from a trained run, checked against the gated network.

Three questions, answered in three places:
  which layers shrink together  -> `training.graph` (channel groups traced from the network itself)
  which channels and blocks stay -> mask.json (`training.mask`)
  how the network is cut         -> `training.cutting.cut`, one small function per layer type (`training.cuts`)
The pruned network is saved as a torch.export program (`training.program.save_pruned`): its architecture
travels with its weights, so loading it never needs the training code or hits "size mismatch".
Whether the cut computes what the gated network computes is `training.equivalence`, the check the Python
API's `prune` runs too.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polarprune.common.cli import EXIT_FAILED
from polarprune.training.program import load_pruned as _load_program
from polarprune.training.program import save_pruned as _save_program
from polarprune.training import equivalence
from polarprune.training.gating import check_mask, cut, masked_network
from polarprune.training.graph import NetworkGraph
from polarprune.training.mask import Mask, MaskError

from . import ExportError

PRUNED_FILE = "pruned_model.pt2"


class MaskMismatchError(ExportError):
    """mask.json does not fit the network (unknown groups, bad indices) or is not the run's mask."""


class SurgeryError(ExportError):
    """The cut network does not compute what the gated network computes."""

    exit_code = EXIT_FAILED


@dataclass
class Networks:
    """The three networks the export stage compares."""
    reference: nn.Module  # the trained network with gates fixed to the mask: what the pruned one must equal
    dense: nn.Module      # dense architecture, trained weights, no gates
    pruned: nn.Module     # physically cut
    graph: NetworkGraph


def prune(plain: nn.Module, graph: NetworkGraph, mask: Mask, mask_source: str = "mask.json") -> Networks:
    """Reference, dense and pruned networks for a trained network in its dense shape (`graph`'s trace,
    no gates) and its mask."""
    try:
        check_mask(graph, mask, mask_source)
    except MaskError as error:
        raise MaskMismatchError(str(error)) from None
    return Networks(masked_network(graph, plain, mask), copy.deepcopy(plain).eval(), cut(graph, mask, plain).eval(),
                    graph)


# -- pruned vs gated ----------------------------------------------------------------------------------

def check_equivalence(reference: nn.Module, pruned: nn.Module, graph: NetworkGraph, mask: Mask,
                      images: torch.Tensor, tolerance: float = equivalence.TOLERANCE) -> float:
    """`training.equivalence.check_equivalence`, failing as the export stage's SurgeryError."""
    try:
        return equivalence.check_equivalence(reference, pruned, graph, mask, images, tolerance)
    except equivalence.EquivalenceError as error:
        raise SurgeryError(str(error)) from None


# -- pruned_model.pt2 ---------------------------------------------------------------------------------

def save_pruned(path: str | Path, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    _save_program(path, model, torch.zeros(1, *input_shape))


def load_pruned(path: str | Path) -> nn.Module:
    """The pruned network from pruned_model.pt2, architecture and weights (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no pruned model (run the export first)")
    try:
        return _load_program(path)
    except Exception as error:  # damaged archives raise many types
        raise ExportError(f"{path}: unreadable pruned model ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})") from None
