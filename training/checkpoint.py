"""checkpoint.pt: everything needed to resume a run or export it, validated on load.

Keys: format, version, config (dict), spec (dense spec), gates (GateOptions as dict, or None for an
ungated method), model (state dict), optimizers, scheduler, epoch (epochs completed), method_state,
rng, history (per-epoch log rows).
"""
from __future__ import annotations

import io
from dataclasses import fields
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
    # A damaged or hand-made file must fail here, naming itself, not deep inside torch or the loop.
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: checkpoint config must be a dict, not {type(state['config']).__name__}")
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise CheckpointError(f"{path}: checkpoint 'model' must be a state dict of named tensors")
    if not isinstance(state["epoch"], int) or isinstance(state["epoch"], bool) or state["epoch"] < 0:
        raise CheckpointError(f"{path}: checkpoint epoch must be a count >= 0, not {state['epoch']!r}")
    gates, known = state.get("gates"), {f.name for f in fields(GateOptions)}
    if gates is not None and (not isinstance(gates, dict) or not set(gates) <= known):
        raise CheckpointError(f"{path}: checkpoint 'gates' must be None or a dict with keys from "
                              f"{sorted(known)}, got {gates!r}")
    try:
        validate_spec(state["spec"])
    except (SpecError, KeyError, TypeError) as error:
        why = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise CheckpointError(f"{path}: checkpoint spec is invalid ({why})") from None
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> SpecNet:
    """The trained network as it was trained (gated, if the method uses gates), weights loaded strictly."""
    gates = GateOptions(**state["gates"]) if state.get("gates") is not None else None
    try:
        model = build_model(state["spec"], gates)
    except (SpecError, KeyError, TypeError, ValueError, RuntimeError) as error:  # e.g. a width of -3
        raise CheckpointError(f"{path}: cannot build the network its spec describes ({error})") from None
    try:
        model.load_state_dict(state["model"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        # torch's message: a "loading state_dict for SpecNet" line, then one line per problem.
        problems = [line.strip() for line in str(error).strip().splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CheckpointError(f"{path}: weights do not fit the model spec: "
                              f"{'; '.join(problems[:2]) or error}{more}") from None
    return model
