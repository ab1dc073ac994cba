"""What serving reads from the export stage's run folder: `export_report.json` and `test_samples.npz`.

The export stage writes real, already normalised test images with their labels, so serving needs no
dataset code and no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RunArtifactsMissing(FileNotFoundError):
    """The export stage has not (fully) run for this run folder."""


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


def load_run(run_dir: str | Path) -> RunArtifacts:
    run_dir = Path(run_dir)
    report_path, samples_path = run_dir / "export_report.json", run_dir / "test_samples.npz"
    missing = [str(p) for p in (report_path, samples_path) if not p.is_file()]
    if missing:
        raise RunArtifactsMissing(f"missing {', '.join(missing)}: run make export first")
    report = json.loads(report_path.read_text())
    try:
        names = report["model_names"]
        model_names = {"dense": str(names["dense"]), "pruned": str(names["pruned"])}
        flops_ratio = float(report["flops_ratio"])
        input_shape = tuple(int(d) for d in report["input_shape"])
        num_classes = int(report["num_classes"])
    except (KeyError, TypeError, ValueError) as bad:
        raise ValueError(f"{report_path} lacks a field serving needs ({bad!r}); re-run make export") from None
    with np.load(samples_path) as samples:
        images, labels = samples["images"], samples["labels"]
    if images.dtype != np.float32 or images.ndim != 4 or tuple(images.shape[1:]) != input_shape:
        raise ValueError(f"{samples_path}: images must be float32 (N, {', '.join(map(str, input_shape))}), "
                         f"got {images.dtype} {list(images.shape)}")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"{samples_path}: labels must be integers, one per image")
    return RunArtifacts(run_dir, model_names, flops_ratio, str(report.get("dataset", "unknown")),
                        input_shape, num_classes, images, labels.astype(np.int64), report)
