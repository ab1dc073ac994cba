"""PNG plots of a run: gate-score histograms and kept-FLOPs / accuracy over epochs."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on build machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from polarprune.common.atomicio import write_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def write_plots(run_dir: Path, model, history: list[dict]) -> None:
    if history:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        epochs = [row["epoch"] for row in history]
        left.plot(epochs, [row["kept_flops"] for row in history], marker="o")
        left.set(xlabel="epoch", ylabel="kept FLOPs ratio", title="kept FLOPs", ylim=(0, 1.05))
        right.plot(epochs, [row["test_accuracy"] for row in history], marker="o", label="test")
        right.plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train")
        right.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        right.legend()
        _save(fig, run_dir / "progress.png")
    channel_gates = list(getattr(model, "channel_gates", {}).values())
    if channel_gates:
        channel = torch.cat([g.score.detach().cpu() for g in channel_gates])
        block = [g.score.detach().cpu() for g in getattr(model, "block_gates", {}).values()]
        fig, axes = plt.subplots(1, 2 if block else 1, figsize=(10 if block else 5, 3.5), squeeze=False)
        axes[0][0].hist(channel.numpy(), bins=50)
        axes[0][0].axvline(0, color="k", lw=0.8)
        axes[0][0].set(xlabel="gate score (open if > 0)", ylabel="channels", title="channel gate scores")
        if block:
            axes[0][1].hist(torch.cat(block).numpy(), bins=20)
            axes[0][1].axvline(0, color="k", lw=0.8)
            axes[0][1].set(xlabel="gate score (open if > 0)", ylabel="blocks", title="block gate scores")
        _save(fig, run_dir / "gate_scores.png")
