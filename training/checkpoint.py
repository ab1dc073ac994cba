"""checkpoint.pt: everything needed to resume a run or export it, validated on load.

Keys: format, version, config (dict), network (`training.networks.NetworkInfo.describe()`), model (state
dict of the model the method trains), optimizers, scheduler, epoch (epochs completed), method_state, rng,
history (per-epoch log rows). The model is rebuilt from the network description, its trace and the
method's state (`model_from_checkpoint`), so its weights always fit it.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from common.atomicio import write_bytes

from .arch import check_header
from .config import ConfigError, make_config
from .graph import GraphError, trace_network
from .methods import make_method
from .networks import NetworkError, NetworkInfo, build_network

CHECKPOINT_FORMAT = "polarprune-checkpoint"
CHECKPOINT_VERSION = 2  # 1: built-in specs with gates inside their blocks, before traced gates


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
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and state.get("version") == 1:
        raise CheckpointError(f"{path}: a checkpoint of version 1 (polarprune before traced gates); it cannot "
                              "be resumed or exported by this version: retrain the run (make train)")
    check_header(state, path, "checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                 ("config", "network", "model", "epoch"), CheckpointError)
    # A damaged or hand-made file must fail here, naming itself, not deep inside torch or the loop.
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: checkpoint config must be a dict, not {type(state['config']).__name__}")
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise CheckpointError(f"{path}: checkpoint 'model' must be a state dict of named tensors")
    if not isinstance(state["epoch"], int) or isinstance(state["epoch"], bool) or state["epoch"] < 0:
        raise CheckpointError(f"{path}: checkpoint epoch must be a count >= 0, not {state['epoch']!r}")
    if not isinstance(state["network"], dict):
        raise CheckpointError(f"{path}: checkpoint 'network' must be a dict describing the network")
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint"):
    """(model, graph, method) of a checkpoint: the network its description names, traced, and the model
    its method trained (gated, if the method uses gates) with the checkpoint's weights loaded strictly."""
    try:
        info = NetworkInfo.from_dict(state["network"])
        cfg = make_config({k: v for k, v in state["config"].items()})
        graph = trace_network(build_network(info), info.example_input())
        method = make_method(cfg, graph)
        method.load_state_dict(state.get("method_state", {}))
        model = method.restore_model()
    except (NetworkError, ConfigError, GraphError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the network it was trained on ({error})") from None
    try:
        model.load_state_dict(state["model"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        # torch's message: a "loading state_dict for ..." line, then one line per problem.
        problems = [line.strip() for line in str(error).strip().splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CheckpointError(f"{path}: weights do not fit the network it describes: "
                              f"{'; '.join(problems[:2]) or error}{more}") from None
    return model, graph, method
