"""checkpoint.pt: everything needed to resume a run, validated on load. (Export reads network.pt instead:
`training.network_file`.)

Keys: format, version, config (dict), network (`training.networks.NetworkInfo.describe()`), model (state
dict of the model the method trains), trained_model (which network those weights fit: `describe_model`),
optimizers, scheduler, epoch (epochs completed), method_state, rng, history (per-epoch log rows).
`trained_model(state)` rebuilds the network from the checkpoint alone: the network description, its trace
and the trained_model record, never the training config or its method, so a finished run can teach
another (`distill_from`) on a machine that could not train it. A resume goes through the method instead
(training.loop), which also knows the optimiser and schedule state.

Loaded with torch's weights-only unpickler: tensors and plain data only, so a checkpoint from someone
else cannot run code (numpy's RNG state is stored as a tensor for that). Versions 1 and 2 described the
built-in networks with their gates inside; they are read only far enough to say so (version 1 held
numpy's state as a pickled ndarray: numpy's array reconstructor and nothing else is allowed for it).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polarprune.common.atomicio import write_bytes

from torch import nn

from .arch import check_header
from .errors import ConfigError, TrainingError
from .gating import GatedNetwork
from .graph import GraphError, NetworkGraph, trace_network
from .networks import NetworkError, NetworkInfo, build_network

CHECKPOINT_FORMAT = "polarprune-checkpoint"
CHECKPOINT_VERSION = 3
SPEC_VERSIONS = (1, 2)  # built-in specs with gates inside their blocks, before traced gates
LEGACY_VERSION = 1  # numpy's RNG state pickled as an ndarray
# What a version-1 file needs beyond plain data, by the names pickle records and as objects to allow.
# A version-1 file needs numpy's array reconstructor, recorded under numpy 1's or numpy 2's module name.
_RECONSTRUCT_NAMES = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
LEGACY_GLOBAL_NAMES = {"numpy.ndarray", "numpy.dtype", *_RECONSTRUCT_NAMES}
LEGACY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),  # the state is a uint32 array
                  *[(np.ndarray.__reduce__(np.zeros(0))[0], name) for name in _RECONSTRUCT_NAMES]]


class CheckpointError(TrainingError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model it claims to hold."""


def _numpy_rng_to_tensors(state: tuple) -> dict[str, Any]:
    """np.random.get_state()'s tuple as data the weights-only unpickler reads."""
    bit_generator, key, position, has_gauss, cached_gaussian = state
    return {"bit_generator": bit_generator, "key": torch.from_numpy(np.asarray(key, np.int64)),
            "pos": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_rng_from_tensors(state: dict[str, Any]) -> tuple:
    return (state["bit_generator"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["cached_gaussian"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    rng = state.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        state = {**state, "rng": {**rng, "numpy": _numpy_rng_to_tensors(rng["numpy"])}}
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
    write_bytes(path, buffer.getvalue())


def load_tensor_file(path: Path, kind: str = "checkpoint", error: type[Exception] = CheckpointError) -> Any:
    """The pickled document of a checkpoint (or another tensor file training writes: `kind`), read without
    running any code it carries; `error` naming the file for anything else."""
    legacy = LEGACY_GLOBAL_NAMES if kind == "checkpoint" else set()
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as problem:  # not a zip, or a damaged one
        raise error(f"{path}: unreadable or corrupt {kind} ({type(problem).__name__}: {problem})") from None
    if needed - legacy:
        raise error(
            f"{path}: refused: it holds pickled Python objects ({', '.join(sorted(needed - legacy))}), "
            "and loading those "
            f"could run code. polarprune {kind}s hold tensors and plain data only: use run folders you made "
            "yourself, or train the run again")
    try:
        with torch.serialization.safe_globals(LEGACY_GLOBALS if needed else []):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as problem:  # torch's reason follows a fixed line, after its generic advice
        lines = [line.strip() for line in str(problem).splitlines() if line.strip()]
        reason = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "WeightsUnpickler error" in line),
                      lines[0] if lines else "")
        raise error(f"{path}: refused or corrupt: the weights-only loader stops at it ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as problem:
        raise error(f"{path}: unreadable or corrupt {kind} ({type(problem).__name__}: {problem})") from None
    if needed and (not isinstance(state, dict) or state.get("version") != LEGACY_VERSION):
        raise error(f"{path}: holds numpy arrays, which only checkpoint version {LEGACY_VERSION} "
                    "did (for numpy's RNG state); not a checkpoint polarprune wrote")
    return state


def check_state_dict(weights: Any, path: Path, key: str, error: type[Exception] = CheckpointError) -> None:
    """`weights` (the file's entry `key`) is a state dict of named tensors, every float finite."""
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise error(f"{path}: '{key}' must be a state dict of named tensors")
    broken = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:  # a diverged or damaged run: nothing downstream would say so
        raise error(f"{path}: weight {broken} holds NaN or Inf; resume from an earlier checkpoint or retrain")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (train first: make train)")
    state = load_tensor_file(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT and state.get("version") in SPEC_VERSIONS:
        raise CheckpointError(f"{path}: a checkpoint of version {state['version']} (polarprune before traced gates); "
                              "this version cannot resume or export it: retrain the run (make train)")
    check_header(state, path, "checkpoint", CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                 ("config", "network", "model", "epoch"), CheckpointError)
    rng = state.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), dict):
        try:
            state["rng"] = {**rng, "numpy": _numpy_rng_from_tensors(rng["numpy"])}
        except (KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path}: checkpoint rng['numpy'] is malformed ({error!r})") from None
    # A damaged or hand-made file must fail here, naming itself, not deep inside torch or the loop.
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: checkpoint config must be a dict, not {type(state['config']).__name__}")
    check_state_dict(state["model"], path, "model")
    if not isinstance(state["epoch"], int) or isinstance(state["epoch"], bool) or state["epoch"] < 0:
        raise CheckpointError(f"{path}: checkpoint epoch must be a count >= 0, not {state['epoch']!r}")
    if not isinstance(state["network"], dict):
        raise CheckpointError(f"{path}: checkpoint 'network' must be a dict describing the network")
    return state


def describe_model(model: nn.Module, graph: NetworkGraph) -> dict[str, Any]:
    """The checkpoint's trained_model record: which network `model`'s weights fit, given the trace `graph`
    of the plain network. "gated": the traced network with gates (and how they were built); "plain": the
    traced network itself; "cut": a network already cut to a frozen mask (a run stopped before its end)."""
    if isinstance(model, GatedNetwork):
        return {"kind": "gated", "dynamic": model.dynamic, "round_to": model.round_to,
                "score_clamp": model.score_clamp}
    shapes = lambda module: {key: tuple(value.shape) for key, value in module.state_dict().items()}  # noqa: E731
    return {"kind": "plain" if shapes(model) == shapes(graph.module) else "cut"}


def trained_model(state: dict[str, Any], path: str | Path = "checkpoint") -> tuple[nn.Module, NetworkGraph]:
    """(model, graph): the network the checkpoint's weights were trained in (gated, if it had gates), with
    them loaded strictly, and the trace of the plain network. Needs no training config and no method."""
    record = state.get("trained_model")
    if record is None:  # written before checkpoints recorded their network: the method knows it
        model, graph, _ = model_from_checkpoint(state, path)
        return model, graph
    if not isinstance(record, dict) or record.get("kind") not in ("gated", "plain", "cut"):
        raise CheckpointError(f"{path}: trained_model must be a record of kind gated, plain or cut, not {record!r}")
    lacking = sorted({"dynamic", "round_to", "score_clamp"} - set(record)) if record["kind"] == "gated" else []
    if lacking:
        raise CheckpointError(f"{path}: trained_model of kind gated lacks {', '.join(lacking)}")
    if record["kind"] == "cut":
        raise CheckpointError(f"{path}: holds a network cut to its mask by a run that stopped before its end; "
                              "resume the run to its end (make train resumes it), then export")
    try:
        info = NetworkInfo.from_dict(state["network"])
        graph = trace_network(build_network(info), info.example_input())
        model = (GatedNetwork(graph, dynamic=bool(record["dynamic"]), round_to=int(record["round_to"]),
                              score_clamp=float(record["score_clamp"]))
                 if record["kind"] == "gated" else graph.module)
    except (NetworkError, GraphError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the network it was trained on ({error})") from None
    load_weights_strictly(model, state["model"], path)
    return model, graph


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint"):
    """(model, graph, method) of a checkpoint without a trained_model record: the network its description
    names, traced, and the model its method trained, rebuilt through the training config and the method
    (which therefore must be valid on this machine)."""
    from .config import make_config  # only for checkpoints older than the trained_model record
    from .methods import make_method
    try:
        info = NetworkInfo.from_dict(state["network"])
        cfg = make_config(dict(state["config"]))
        graph = trace_network(build_network(info), info.example_input())
        method = make_method(cfg, graph)
        method.load_state_dict(state.get("method_state", {}))
        model = method.restore_model()
    except (NetworkError, ConfigError, GraphError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the network it was trained on ({error})") from None
    load_weights_strictly(model, state["model"], path)
    return model, graph, method


def load_weights_strictly(model: nn.Module, weights: dict[str, Any], path: str | Path,
                          error: type[Exception] = CheckpointError) -> None:
    """`weights` into `model`, every key and shape matching; `error` naming the file and torch's first
    two problems otherwise."""
    try:
        model.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, AttributeError) as problem:
        # torch's message: a "loading state_dict for ..." line, then one line per problem.
        problems = [line.strip() for line in str(problem).strip().splitlines()[1:] if line.strip()]
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise error(f"{path}: weights do not fit the network it describes: "
                    f"{'; '.join(problems[:2]) or problem}{more}") from None
