"""Export what the Python API saved: a folder with the pruned and dense networks as torch.export programs.

`polarprune.save_for_export(folder, pruned, dense, images, labels)` writes pruned.pt2, dense.pt2 and
test_samples.npz; `python -m export --run folder` (here: `run_programs`) turns them into ONNX, checks
onnxruntime against torch on the samples and the MACs of each graph, and adds <folder>_dense and
<folder>_pruned to the Triton repository. The pruned network was already checked against its gated
network by `PolarizedNetwork.prune`, so there is no surgery here.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from polarprune.common.atomicio import write_json
from polarprune.training.network_file import NETWORK_FILE
from polarprune.training.program import NORMALIZATION_FILE, PROGRAM_FILES
from polarprune.training.pruning_report import FILES as PRUNING_FILES
from polarprune.training.flops import count_params

from . import ExportError
from .artifacts import KINDS, REPORT_NAME, Samples, commit, engines, write_triton_models
from .onnx_export import count_onnx_macs, export_onnx, validate_with_onnxruntime
from .surgery import load_pruned

def is_program_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in PROGRAM_FILES.values()) and not (folder / NETWORK_FILE).exists()


def _samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as loaded:
            images, labels = loaded["images"], loaded["labels"]
    except (OSError, KeyError, ValueError) as error:
        raise ExportError(f"{path}: not a samples file with 'images' and 'labels' ({error})") from None
    if images.dtype != np.float32 or images.ndim != 4 or labels.shape != (len(images),) or not len(images):
        raise ExportError(f"{path}: images must be float32 (N, C, H, W) and labels one integer each, got "
                          f"{images.dtype} {list(images.shape)} and {list(labels.shape)}")
    if not np.isfinite(images).all():
        raise ExportError(f"{path}: images contain NaN or Inf")
    return images, labels.astype(np.int64)


def _program(path: Path):
    """A torch.export program saved by `save_pruned`; ExportError naming the file for anything else."""
    quiet = logging.getLogger("torch.export")  # it logs a traceback of its own before re-raising
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return load_pruned(path)
    except ExportError:
        raise
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (polarprune.save_for_export writes it)") from None
    except Exception as error:  # a damaged zip, a file that is no program: torch's many error types
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ExportError(f"{path}: not a torch.export program saved by polarprune ({type(error).__name__}"
                          f"{': ' + reason if reason else ''})") from None
    finally:
        quiet.setLevel(level)


def _optional_json(path: Path) -> dict | None:
    """A JSON file save_for_export may have written (None when it did not)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportError(f"{path}: not readable JSON ({error})") from None


def _closed_blocks(pruning: dict | None) -> list[str] | None:
    """Blocks the pruning report says were closed; None (unknown) when save_for_export got no report."""
    if pruning is None:
        return None
    return sorted(name for name, state in (pruning.get("blocks") or {}).items() if state == "closed")


def run_programs(options) -> dict:
    """`export.api.run` for a folder the Python API wrote (options: `export.api.ExportOptions`)."""
    folder = Path(options.run)
    images, labels = _samples(folder / PROGRAM_FILES["samples"])
    networks = {kind: _program(folder / PROGRAM_FILES[kind]) for kind in KINDS}
    input_shape = tuple(images.shape[1:])
    batch = torch.from_numpy(images[:options.samples])
    with torch.no_grad():  # the class count comes from the network, not from the labels present
        num_classes = int(networks["dense"](batch[:1]).shape[1])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ExportError(f"{folder / PROGRAM_FILES['samples']}: labels must be in [0, {num_classes})")
    staging = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=folder))
    summaries, diffs, scales = {}, {}, {}
    try:
        for kind in KINDS:
            onnx_path = staging / f"{kind}.onnx"
            proto = export_onnx(networks[kind], onnx_path, input_shape)
            diffs[kind], scales[kind] = validate_with_onnxruntime(onnx_path, networks[kind], batch)
            macs = count_onnx_macs(proto)
            summaries[kind] = {"flops": macs, "onnx_macs": macs, "params": count_params(networks[kind]),
                               "onnx_file": onnx_path.name, "onnx_bytes": onnx_path.stat().st_size}
        if summaries["pruned"]["flops"] > summaries["dense"]["flops"]:
            raise ExportError(f"{folder}: pruned.pt2 has more MACs than dense.pt2: the two are swapped or unrelated")
        engine = engines(options, staging, Samples(batch, torch.from_numpy(labels[:len(batch)])),
                          Path(options.timing_cache or folder / "tensorrt_timing.cache"))
        shutil.copy(folder / PROGRAM_FILES["samples"], staging / "test_samples.npz")
        commit(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    normalization = _optional_json(folder / NORMALIZATION_FILE)
    triton = write_triton_models(options, folder, engine, normalization)
    pruning = _optional_json(folder / PRUNING_FILES["json"])
    report = {
        "run": folder.name, "dataset": "user samples", "model": "python api", "method": "polarized",
        "input_shape": list(input_shape), "num_classes": num_classes, "model_names": triton["model_names"],
        "dense_source": "the dense network the Python API saved beside the pruned one",
        "dense": summaries["dense"], "pruned": summaries["pruned"],
        "flops_ratio": summaries["pruned"]["flops"] / summaries["dense"]["flops"],
        "params_ratio": summaries["pruned"]["params"] / summaries["dense"]["params"],
        "removed_blocks": _closed_blocks(pruning), "max_abs_diff_onnx": diffs, "max_abs_logit": scales,
        "test_samples": {"file": "test_samples.npz", "count": len(labels)}, "engine": engine,
        "input_normalization": normalization, "triton": triton,
    }
    if pruning is not None:
        report["mask_flops"] = {"dense_flops": pruning["dense_macs"], "pruned_flops": pruning["kept_macs"],
                                "flops_ratio": pruning["kept_ratio"]}
    write_json(folder / REPORT_NAME, report)
    return report
