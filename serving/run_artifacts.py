"""What serving reads from the export stage's run folder: `export_report.json` and `test_samples.npz`.

The export stage writes real, already normalised test images with their labels, so serving needs no
dataset code and no torch. Anything missing raises RunArtifactsMissing; anything present but malformed
raises RunArtifactsError naming the file and what was expected.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polarprune.common.cli import EXIT_BAD_INPUT
from polarprune.serving.errors import ServingStageError


class RunArtifactsMissing(ServingStageError, FileNotFoundError):
    """The export stage has not (fully) run for this run folder."""

    exit_code = EXIT_BAD_INPUT


class RunArtifactsError(ServingStageError, ValueError):
    """An export output that is there but cannot be what the export stage wrote."""

    exit_code = EXIT_BAD_INPUT


@dataclass(frozen=True)
class RunArtifacts:
    run_dir: Path
    model_names: dict[str, str]    # {"dense": ..., "pruned": ...}
    flops_ratio: float             # pruned FLOPs / dense FLOPs
    dataset: str
    input_shape: tuple[int, ...]   # (C, H, W)
    num_classes: int
    images: np.ndarray             # float32 (N, C, H, W), normalised
    labels: np.ndarray             # int64 (N,)
    export_report: dict

    @property
    def name(self) -> str:
        return self.run_dir.name


def _read_report(report_path: Path) -> dict:
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as bad:  # JSONDecodeError is a ValueError
        raise RunArtifactsError(f"{report_path} is not valid JSON ({bad}); re-run make export") from None
    if not isinstance(report, dict):
        raise RunArtifactsError(f"{report_path} must hold a JSON object, not {type(report).__name__}")
    return report


def _read_samples(samples_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of test_samples.npz; never unpickles (allow_pickle stays False)."""
    try:
        loaded = np.load(samples_path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a bare .npy array under the .npz name
            raise ValueError("a single array, not an .npz archive")
        with loaded:
            arrays = {key: loaded[key] for key in ("images", "labels") if key in loaded.files}
            present = list(loaded.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as bad:
        raise RunArtifactsError(f"{samples_path} is not a readable .npz of numeric arrays "
                                f"({type(bad).__name__}: {bad}); re-run make export") from None
    if len(arrays) < 2:
        raise RunArtifactsError(f"{samples_path} must hold 'images' and 'labels', has {present}; "
                                "re-run make export")
    return arrays["images"], arrays["labels"]


def load_run(run_dir: str | Path) -> RunArtifacts:
    run_dir = Path(run_dir)
    report_path, samples_path = run_dir / "export_report.json", run_dir / "test_samples.npz"
    missing = [str(p) for p in (report_path, samples_path) if not p.is_file()]
    if missing:
        raise RunArtifactsMissing(f"missing {', '.join(missing)}: run make export first")
    report = _read_report(report_path)
    try:
        names = report["model_names"]
        model_names = {"dense": str(names["dense"]), "pruned": str(names["pruned"])}
        flops_ratio = float(report["flops_ratio"])
        input_shape = tuple(int(d) for d in report["input_shape"])
        num_classes = int(report["num_classes"])
    except (KeyError, TypeError, ValueError) as bad:
        raise RunArtifactsError(f"{report_path} lacks a field serving needs ({bad!r}); re-run make export") from None
    if not (0 < flops_ratio <= 1) or num_classes < 1 or not input_shape or min(input_shape) < 1:
        raise RunArtifactsError(f"{report_path}: flops_ratio must be in (0, 1], num_classes >= 1 and input_shape "
                                f"positive, got {flops_ratio}, {num_classes}, {list(input_shape)}")
    images, labels = _read_samples(samples_path)
    if images.dtype != np.float32 or images.ndim != 4 or tuple(images.shape[1:]) != input_shape:
        raise RunArtifactsError(f"{samples_path}: images must be float32 (N, {', '.join(map(str, input_shape))}), "
                                f"got {images.dtype} {list(images.shape)}")
    if len(images) == 0:
        raise RunArtifactsError(f"{samples_path} holds no images")
    if not np.isfinite(images).all():
        raise RunArtifactsError(f"{samples_path}: images contain NaN or Inf")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise RunArtifactsError(f"{samples_path}: labels must be integers, one per image")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise RunArtifactsError(f"{samples_path}: labels must be in [0, {num_classes}), "
                                f"got {labels.min()}..{labels.max()}")
    return RunArtifacts(run_dir, model_names, flops_ratio, str(report.get("dataset", "unknown")),
                        input_shape, num_classes, images, labels.astype(np.int64), report)
