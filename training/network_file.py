"""network.pt: what a finished run hands to export, readable without the training config or its method.

Keys: format, version, network (`NetworkInfo.describe()`: model, its arguments, input shape, classes),
weights (state dict of the traced network in its dense shape: gates removed, nothing cut), mask_sha256
(`Mask.digest` of the run's mask.json, the only copy of the mask), method, data (dataset, data_dir, seed and
the image-folder options: where export reads its test images), normalization ({"mean", "std"} per input
channel, as training normalised), provenance. checkpoint.pt stays the resume state of the run (optimisers,
gate scores, RNG); export reads this file and mask.json only. Written by `training.loop.finish_run`, last
before metrics.json; loaded with torch's weights-only unpickler, like the checkpoint.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polarprune.common.atomicio import write_bytes

from .arch import check_header
from .checkpoint import check_state_dict, load_tensor_file, load_weights_strictly
from .errors import TrainingError
from .graph import GraphError, NetworkGraph, trace_network
from .mask import Mask
from .networks import NetworkError, NetworkInfo, build_network

NETWORK_FILE = "network.pt"
NETWORK_FORMAT = "polarprune-network"
NETWORK_VERSION = 1
KEYS = ("network", "weights", "mask_sha256", "method", "data", "normalization")


class NetworkFileError(TrainingError, ValueError):
    """A network.pt that is missing, unreadable, or does not fit the network it describes."""


@dataclass
class TrainedNetwork:
    """A finished run's network as export sees it."""
    info: NetworkInfo
    graph: NetworkGraph        # the trace; graph.module holds the trained weights
    mask_sha256: str
    method: str
    data: dict[str, Any]
    normalization: dict[str, list[float]]
    provenance: dict[str, Any]

    @property
    def network(self) -> nn.Module:
        return self.graph.module


def save_network(path: str | Path, plain: nn.Module, info: NetworkInfo, mask: Mask, method: str,
                 data: dict[str, Any], normalization: dict[str, list[float]], provenance: dict[str, Any]) -> None:
    """Write network.pt for `plain`, the traced network in its dense shape (`GatedNetwork.plain()`)."""
    weights = {key: value.detach().cpu().clone() for key, value in plain.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"format": NETWORK_FORMAT, "version": NETWORK_VERSION, "network": info.describe(), "weights": weights,
                "mask_sha256": mask.digest(), "method": method, "data": data,
                "normalization": {key: [float(v) for v in normalization[key]] for key in ("mean", "std")},
                "provenance": provenance}, buffer)
    write_bytes(path, buffer.getvalue())


def load_network(path: str | Path) -> TrainedNetwork:
    """network.pt, checked: the network it describes rebuilt and traced, its weights loaded strictly."""
    path = Path(path)
    if not path.is_file():
        raise NetworkFileError(f"{path}: no {NETWORK_FILE}; a run writes it when it finishes (runs finished before "
                               "it existed: resume the run once with its config and --resume, which writes it)")
    document = load_tensor_file(path, "network file", NetworkFileError)
    check_header(document, path, "network file", NETWORK_FORMAT, NETWORK_VERSION, KEYS, NetworkFileError)
    check_state_dict(document["weights"], path, "weights", NetworkFileError)
    for key in ("network", "data", "normalization"):
        if not isinstance(document[key], dict):
            raise NetworkFileError(f"{path}: '{key}' must be a dict, not {type(document[key]).__name__}")
    if not isinstance(document["mask_sha256"], str) or not isinstance(document["method"], str):
        raise NetworkFileError(f"{path}: 'mask_sha256' and 'method' must be strings")
    try:
        info = NetworkInfo.from_dict(document["network"])
        graph = trace_network(build_network(info), info.example_input())
    except (NetworkError, GraphError, KeyError, TypeError, ValueError) as error:
        raise NetworkFileError(f"{path}: cannot rebuild the network it describes ({error})") from None
    normalization = document["normalization"]
    if not all(isinstance(normalization.get(key), list) and len(normalization[key]) == info.in_channels
               for key in ("mean", "std")) or not all(value > 0 for value in normalization["std"]):
        raise NetworkFileError(f"{path}: normalization must give a mean and a positive std for each of the "
                               f"{info.in_channels} input channels, not {normalization!r}")
    load_weights_strictly(graph.module, document["weights"], path, NetworkFileError)
    return TrainedNetwork(info, graph, document["mask_sha256"], document["method"], document["data"], normalization,
                          document.get("provenance") or {})
