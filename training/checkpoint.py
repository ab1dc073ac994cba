"""checkpoint.pt: everything needed to resume a run or export it, validated on load.

Keys: format, version, config (dict), spec (dense spec), gates (GateOptions as dict, or None for an
ungated method), model (state dict), optimizers, scheduler, epoch (epochs completed), method_state,
rng, history (per-epoch log rows).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from common.atomicio import write_bytes

from .arch import SpecError, check_header, validate_spec
from .models import GateOptions, SpecNet, build_model

CHECKPOINT_FORMAT = "polarprune-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model it claims to hold."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (train first: make train)")
    try:
        # weights_only=False: the checkpoint holds optimizer state and RNG states; only load your own files.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({type(error).__name__}: {error})") from None
    check_header(state, path, "checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                 ("config", "spec", "model", "epoch"), CheckpointError)
    try:
        validate_spec(state["spec"])
    except (SpecError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: checkpoint spec is invalid ({error})") from None
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> SpecNet:
    """The trained network as it was trained (gated, if the method uses gates), weights loaded strictly."""
    gates = GateOptions(**state["gates"]) if state.get("gates") is not None else None
    model = build_model(state["spec"], gates)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit the model spec: {' '.join(first[:3])}") from None
    return model
