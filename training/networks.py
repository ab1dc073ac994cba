"""Which network a run trains: a built-in one by name, or the user's own by import path, with weights.

A run describes its network with a small JSON-able dict (`NetworkInfo.describe()`), stored in the
checkpoint and mask.json, so every stage rebuilds exactly the network that was trained:
  model:       a built-in name (`training.arch.MODEL_NAMES`) or "package.module:Callable"
  model_args:  keyword arguments for that callable (built-ins take none: data sets their widths)
  in_channels, num_classes, input_size: from the data set
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import MODEL_NAMES, make_spec
from .errors import TrainingError
from .models import build_model


class NetworkError(TrainingError, ValueError):
    """A model that cannot be imported or built, or weights that do not fit it."""


@dataclass(frozen=True)
class NetworkInfo:
    model: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    model_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "NetworkInfo":
        try:
            return cls(values["model"], int(values["in_channels"]), int(values["num_classes"]),
                       tuple(values["input_size"]), dict(values.get("model_args") or {}))
        except (KeyError, TypeError, ValueError) as error:
            raise NetworkError(f"network description is incomplete or malformed ({error!r})") from None

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "model_args": self.model_args, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "input_size": list(self.input_size)}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.input_size)

    def example_input(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """What the trace runs: batch 2 (batch norms in training mode need more than one value)."""
        return torch.zeros(2, *self.input_shape, device=device)


def build_network(info: NetworkInfo) -> nn.Module:
    """A fresh (randomly initialised) plain network."""
    if info.model in MODEL_NAMES:
        if info.model_args:
            raise NetworkError(f"model {info.model!r} is built in and takes no model_args "
                               f"(got {sorted(info.model_args)}); the data set sets its input and classes")
        return build_model(make_spec(info.model, info.in_channels, info.num_classes, info.input_size))
    return _import_network(info.model)(**info.model_args)


def _import_network(reference: str):
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise NetworkError(f"model {reference!r} is neither a built-in ({', '.join(MODEL_NAMES)}) nor an import "
                           "path 'package.module:Callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise NetworkError(f"model {reference!r}: cannot import {module_name} ({error}); is it on PYTHONPATH?") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise NetworkError(f"model {reference!r}: {module_name} has no {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise NetworkError(f"model {reference!r}: {attribute} is not a class or function")

    def build(**kwargs):
        try:
            network = target(**kwargs)
        except TypeError as error:
            raise NetworkError(f"model {reference!r}: model_args do not fit it ({error})") from None
        if not isinstance(network, nn.Module):
            raise NetworkError(f"model {reference!r} returned a {type(network).__name__}, not an nn.Module")
        return network
    return build


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain state dict, one under "state_dict" or "model" (a polarprune
    checkpoint of a dense run, for example). Loaded without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise NetworkError(f"init_weights {path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or damaged files
        raise NetworkError(f"init_weights {path}: not a weights file torch can read safely "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in loaded.items()):
        raise NetworkError(f"init_weights {path}: holds no state dict of named tensors")
    return loaded


def load_weights(network: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly; a mismatch lists the missing and unexpected keys and the shapes that differ. A state
    dict saved from DataParallel or DistributedDataParallel (every key under `module.`) loads without it."""
    own = network.state_dict()
    if weights and all(k.startswith("module.") for k in weights) and not any(k.startswith("module.") for k in own):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: file {list(weights[k].shape)} vs network {list(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", shapes)) if keys]
        raise NetworkError(f"{source} does not fit the network: " + "; ".join(parts))
    network.load_state_dict(weights, strict=True)
