"""Data-parallel training across processes: torchrun's environment in, one consensus network out.

Under `torchrun --nproc_per_node=N -m training ...` (WORLD_SIZE > 1) the run uses PyTorch's
DistributedDataParallel: gloo on CPU, NCCL on CUDA. `batch_size` stays the GLOBAL batch: every step,
each rank takes its 1/N share of the same seeded global batch (BatchIterator's shard), so N processes
follow the single-process schedule: steps per epoch, learning rates, the FLOPs ramp and the freeze epoch.
DDP averages every gradient, gate scores included, and broadcasts rank 0's buffers each forward, so all
ranks hold one consensus mask; `fingerprints` checks that at the end. Rank 0 alone writes artifacts.
Without torchrun, `Cluster()` is one process and every collective returns its input.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import TrainingError

BN_STATISTICS = ("running_mean", "running_var")


class DistributedError(TrainingError, RuntimeError):
    """The torchrun environment cannot be used as asked, or the ranks disagree."""


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    # ---- collectives (no-ops in one process) ----------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a CPU tensor (e.g. activation-density counts)."""
        if self.distributed:
            moved = tensor.to(self._device())
            dist.all_reduce(moved)
            tensor.copy_(moved.to(tensor.device))
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def from_main(self, work: Callable[[], Any]) -> Any:
        """`work()` run on rank 0 only, its result (or its exception) handed to every rank."""
        if not self.distributed:
            return work()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", work())
            except Exception as error:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", error)
        dist.broadcast_object_list(box, src=0)
        outcome, value = box[0]
        if outcome == "error":
            raise value
        return value

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # ---- the model ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training step calls: DDP around `model`, or `model` itself in one process."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    @torch.no_grad()
    def sync_buffers(self, model: nn.Module) -> None:
        """Batch-norm statistics averaged over ranks, every other buffer (gate masks, counters) taken
        from rank 0. DDP already broadcasts rank 0's buffers before each forward, but each rank's last
        forward updated them with its own shard: without this the ranks would end an epoch apart."""
        if not self.distributed:
            return
        for name, buffer in model.named_buffers():
            if name.rsplit(".", 1)[-1] in BN_STATISTICS:
                dist.all_reduce(buffer)
                buffer.div_(self.world_size)
            else:
                dist.broadcast(buffer, src=0)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def structure_key(model: nn.Module) -> tuple:
    """What DDP fixes when it wraps a model: which module, which parameters train. A change (a frozen
    gate, a resized network) needs a fresh wrapper."""
    return id(model), tuple((name, p.requires_grad) for name, p in model.named_parameters())


def start_cluster(device: torch.device, timeout_minutes: float = 30.0) -> tuple[Cluster, torch.device]:
    """Join torchrun's process group if WORLD_SIZE > 1; returns the cluster and this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Cluster(), device
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except KeyError as missing:
        raise DistributedError(f"WORLD_SIZE={world_size} but {missing} is not set: launch with torchrun") from None
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, "
                                   "so --nproc_per_node must not exceed the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return Cluster(rank, world_size, local_rank, backend), device


def fingerprint(model: nn.Module) -> dict[str, str]:
    """sha256 of every weight and of every gate's state (scores and frozen masks), bit for bit."""
    weights, gates = hashlib.sha256(), hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest = gates if ".gate." in name or ".block_gate." in name else weights
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"weights_sha256": weights.hexdigest(), "gates_sha256": gates.hexdigest()}


def check_consensus(fingerprints: list[dict[str, str]]) -> None:
    """Raise if any rank's weights or gates differ from rank 0's."""
    for key in ("weights_sha256", "gates_sha256"):
        differing = [rank for rank, fp in enumerate(fingerprints) if fp[key] != fingerprints[0][key]]
        if differing:
            raise DistributedError(f"ranks {differing} ended with different {key.split('_')[0]} than rank 0: "
                                   "the data-parallel run lost its consensus")
