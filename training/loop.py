"""The shared training loop: data, optimisers, per-epoch checkpoints, resume, metrics and plots.

A run directory `<out_dir>/<name>/` holds checkpoint.pt (resume state), log.jsonl (one row per epoch),
mask.json (the architecture spec of the static sub-network), metrics.json and plots. Every write is
atomic; a run is resumable from its last completed epoch. Under torchrun the same loop runs on every
rank (training/distributed.py); rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.atomicio import write_json, write_text
from common.results import provenance
from common.energy import EnergyMeter, EnergyReading

from .arch import make_spec
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import BatchIterator, DatasetInfo, FolderOptions, describe_splits, load_splits
from .distributed import Cluster, check_consensus, fingerprint, start_cluster, structure_key
from .errors import TrainingError
from .flops import count_macs, count_params, layer_costs
from .mask import mask_document, save_mask
from .methods import RunContext, make_method
from .models import build_model
from .plots import write_plots

# Keys that may differ between the interrupted run and its resume (they do not change the result).
RESUME_FREE_KEYS = {"progress", "device", "threads", "epochs", "out_dir", "name"}  # a moved run folder resumes


class RunError(TrainingError, RuntimeError):
    """A run directory in a state that the requested action would damage or cannot use."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device 'cuda' requested but torch sees no CUDA device; use device=auto or cpu")
    return torch.device(name)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_gate_score(name: str) -> bool:
    return name.endswith(".gate.score") or name.endswith(".block_gate.score")


def make_optimizers(model, cfg: TrainConfig, total_steps: int, done_steps: int = 0):
    """SGD + cosine for the weights; plain SGD with momentum for gate scores. Not Adam for the scores:
    Adam normalises away gradient size, so every gate moved in lockstep under the shared FLOPs push and
    they all closed together (measured; README). With SGD a gate closes when its cost outweighs its use."""
    named = list(model.named_parameters())
    weights = [(n, p) for n, p in named if not is_gate_score(n)]
    scores = [p for n, p in named if is_gate_score(n)]
    weight_groups = [
        {"params": [p for n, p in weights if p.dim() > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in weights if p.dim() <= 1], "weight_decay": 0.0},  # BN and biases
    ]
    sgd = torch.optim.SGD(weight_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    gate_sgd = torch.optim.SGD(scores, lr=cfg.gate_lr, momentum=0.9) if scores else None
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, cosine)
    # A resumed run (or a model replaced mid-run) continues its schedule where it was.
    scheduler.last_epoch = done_steps
    for group, base_lr in zip(sgd.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * cosine(done_steps)
    return sgd, gate_sgd, scheduler


def train_step(model, method, sgd, gate_sgd, scheduler, images, labels, progress: float, forward=None):
    """One optimisation step, in the order methods rely on. Returns (task loss, logits, method logs).
    `forward` is what runs the batch when it is not `model` itself (the DDP wrapper of a parallel run)."""
    logits = (forward or model)(images)
    loss = F.cross_entropy(logits, labels)
    extra, logs = method.extra_loss(model, progress)
    total = loss if extra is None else loss + extra
    sgd.zero_grad(set_to_none=True)
    if gate_sgd is not None:
        gate_sgd.zero_grad(set_to_none=True)
    total.backward()
    method.before_step(model)
    sgd.step()
    if gate_sgd is not None:
        gate_sgd.step()
    scheduler.step()
    method.after_step(model)
    return loss.detach(), logits.detach(), logs


@torch.no_grad()
def evaluate(model, batches, device, cluster: Cluster = Cluster()) -> tuple[float, float]:
    """(accuracy, mean loss) over the batches of every rank."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    model.train(was_training)
    correct, total, loss_sum = cluster.sum([correct, total, loss_sum])
    return correct / max(total, 1), loss_sum / max(total, 1)


@dataclasses.dataclass
class RunData:
    """A run's data as the loop walks it: what the set is, its three batch iterators and their summary."""
    info: DatasetInfo
    train: BatchIterator
    val: BatchIterator
    test: BatchIterator
    summary: dict[str, Any]


def seed_and_load(cfg: TrainConfig, device: torch.device, shard: tuple[int, int] = (0, 1)) -> RunData:
    """Seed python, numpy and torch with cfg.seed, then load the splits, in the order every run does: the
    same config draws the same network and batches (bench/torch_pruning_peer.py starts from the dense run)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    info, train_set, val_set, test_set = load_splits(cfg.dataset, cfg.data_dir, cfg.train_subset,
                                                     cfg.val_size, cfg.seed, FolderOptions.from_config(cfg.to_dict()))
    if cfg.test_subset:
        test_set = test_set.subset(torch.arange(min(cfg.test_subset, len(test_set))))
    return RunData(
        info,
        BatchIterator(train_set, info, cfg.batch_size, train=True, seed=cfg.seed, device=device, shard=shard),
        BatchIterator(val_set, info, cfg.eval_batch_size, train=False, seed=cfg.seed, device=device),
        BatchIterator(test_set, info, cfg.eval_batch_size, train=False, seed=cfg.seed, device=device, shard=shard),
        describe_splits(info, train_set, val_set, test_set))


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) one training run; returns the metrics written to metrics.json (on every rank)."""
    cluster, device = start_cluster(pick_device(cfg.device))
    try:
        return _train(cfg, resume, cluster, device)
    finally:
        cluster.close()


def _train(cfg: TrainConfig, resume: bool, cluster: Cluster, device: torch.device) -> dict[str, Any]:
    run_dir = Path(cfg.out_dir) / (cfg.name or f"{cfg.dataset}_{cfg.model}_{cfg.method}")
    checkpoint_path = run_dir / "checkpoint.pt"

    def resume_state() -> dict[str, Any] | None:
        if checkpoint_path.exists() and not resume:
            raise RunError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another name")
        if resume and not checkpoint_path.exists():
            raise RunError(f"--resume: {checkpoint_path} does not exist")
        return load_checkpoint(checkpoint_path) if resume else None

    # Rank 0 reads the run folder and hands it to the others: nodes need not share a file system.
    state = cluster.from_main(resume_state)
    data = seed_and_load(cfg, device, cluster.shard)
    info, train_batches, val_batches, test_batches = data.info, data.train, data.val, data.test
    spec = make_spec(cfg.model, info.in_channels, info.num_classes, info.input_size)
    method = make_method(cfg, spec)
    model = method.build_model()
    steps_per_epoch = len(train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    ctx = RunContext(device, lambda: val_batches.epoch(0), cfg.epochs, steps_per_epoch, cluster)

    start_epoch, history, train_seconds, energy = 0, [], 0.0, None
    if state is not None:
        defaults = TrainConfig().to_dict()  # keys newer than the checkpoint: it ran with their defaults
        changed = {k for k in cfg.to_dict() if k not in RESUME_FREE_KEYS
                   and state["config"].get(k, defaults[k]) != getattr(cfg, k)}
        if changed:
            raise RunError(f"--resume with a different config: {', '.join(sorted(changed))} changed")
        lacking = [key for key in ("optimizer", "rng") if key not in state]
        if lacking:
            raise RunError(f"--resume: {checkpoint_path} holds no {' or '.join(lacking)} state; it can be "
                           "exported but not resumed")
        model = model_from_checkpoint(state, checkpoint_path)
        method.load_state_dict(state.get("method_state", {}))
        start_epoch, history = state["epoch"], state.get("history", [])
        train_seconds = state.get("train_seconds", 0.0)
        energy = EnergyReading.from_dict(state["energy"]) if state.get("energy") else None
    model.to(device)
    method.prepare(model, ctx)
    sgd, gate_sgd, scheduler = make_optimizers(model, cfg, total_steps, start_epoch * steps_per_epoch)
    if state is not None:
        sgd.load_state_dict(state["optimizer"])
        if gate_sgd is not None and state.get("gate_optimizer"):
            gate_sgd.load_state_dict(state["gate_optimizer"])
        set_rng_state(state["rng"])

    def checkpoint_state(epochs_done: int) -> dict[str, Any]:
        return {"config": cfg.to_dict(), "spec": model.spec,
                "gates": vars(method.gate_options()) if model.gated else None,
                "model": model.state_dict(), "optimizer": sgd.state_dict(),
                "gate_optimizer": gate_sgd.state_dict() if gate_sgd is not None else None,
                "epoch": epochs_done, "method_state": method.state_dict(), "rng": rng_state(),
                "history": history, "train_seconds": train_seconds,
                "energy": energy.to_dict() if energy is not None else None}

    show = cfg.progress and cluster.is_main
    forward, forward_key = model, None
    meter = EnergyMeter(scope=f"training steps of {cluster.world_size} processes" if cluster.distributed
                        else "training steps")
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        meter.start()
        new_model = method.start_epoch(model, epoch, ctx)
        if new_model is not model:  # the method resized the network: fresh optimisers for the new shapes
            model = new_model.to(device)
            method.prepare(model, ctx)
            sgd, gate_sgd, scheduler = make_optimizers(model, cfg, total_steps, epoch * steps_per_epoch)
        if structure_key(model) != forward_key:  # a new network or newly frozen gates: DDP must re-wrap
            forward, forward_key = cluster.wrap(model, device), structure_key(model)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        logs: dict[str, float] = {}
        bar = tqdm(train_batches.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not show, leave=False)
        for step, (images, labels) in enumerate(bar):
            progress = (epoch * steps_per_epoch + step) / total_steps
            loss, logits, logs = train_step(model, method, sgd, gate_sgd, scheduler, images, labels, progress,
                                            forward=forward)
            loss_sum += float(loss) * labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            kept_flops=f"{logs.get('kept_flops', 1.0):.3f}")
        method.end_epoch(model, epoch, ctx)
        cluster.sync_buffers(model)
        train_seconds += time.perf_counter() - started
        energy = add_energy(energy, meter.stop(), cluster)
        loss_sum, correct, seen = cluster.sum([loss_sum, correct, seen])
        test_accuracy, test_loss = evaluate(model, tqdm(test_batches.epoch(0), total=len(test_batches),
                                                        desc="eval", disable=not show, leave=False),
                                            device, cluster)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "test_loss": test_loss, "test_accuracy": test_accuracy, "kept_flops": logs.get("kept_flops", 1.0),
               "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started}
        history.append(row)
        if cluster.is_main:
            print(json.dumps(row), flush=True)
            write_text(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            save_checkpoint(checkpoint_path, checkpoint_state(epoch + 1))

    # The static sub-network is fixed before the last save, so checkpoint.pt holds what export will cut.
    model = method.finish(model, ctx)
    ranks = cluster.gather(fingerprint(model))
    check_consensus(ranks)
    if cluster.is_main:
        save_checkpoint(checkpoint_path, checkpoint_state(cfg.epochs))
    parallel = {"world_size": cluster.world_size, "backend": cluster.backend, "rank_fingerprints": ranks}
    metrics = finish_run(cfg, run_dir, method, model, test_batches, device, history, train_seconds, spec,
                         cluster, energy, parallel if cluster.distributed else None, data.summary)
    cluster.barrier()  # every rank returns once rank 0's artifacts exist
    return metrics


def add_energy(total: EnergyReading | None, epoch: EnergyReading, cluster: Cluster) -> EnergyReading:
    """`total` plus one epoch's energy over all ranks. CPU-time estimates add up over ranks; a hardware
    counter (RAPL, NVML) already covers its whole machine, so only local rank 0's reading counts."""
    parts = sorted(epoch.component_joules)
    counted = [epoch.component_joules[k] if epoch.sources[k] == "estimate" or cluster.local_rank == 0 else 0.0
               for k in parts]
    *joules, cpu_seconds = cluster.sum(counted + [epoch.cpu_seconds])
    epoch = dataclasses.replace(epoch, joules=sum(joules), cpu_seconds=cpu_seconds,
                                component_joules=dict(zip(parts, joules)))
    return epoch if total is None else total + epoch


def finish_run(cfg, run_dir, method, model, test_batches, device, history, train_seconds, dense_spec,
               cluster: Cluster = Cluster(), energy: EnergyReading | None = None, parallel=None, data=None):
    """Evaluate exactly the static sub-network, and write mask.json, metrics.json and plots (rank 0)."""
    test_accuracy, _ = evaluate(model, test_batches.epoch(0), device, cluster)
    mask = method.final_mask(model)
    costs = layer_costs(build_model(dense_spec))
    document = mask_document(cfg.model, dense_spec, mask, costs, cfg.round_to)
    dense_net = build_model(dense_spec)
    pruned_net = build_model(document["pruned_spec"])
    dense_flops, pruned_flops = count_macs(dense_net), count_macs(pruned_net)
    metrics = {
        "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method, "epochs": cfg.epochs,
        "test_accuracy": test_accuracy, "dense_flops": dense_flops, "pruned_flops": pruned_flops,
        "flops_ratio": pruned_flops / dense_flops,
        "dense_params": count_params(dense_net), "pruned_params": count_params(pruned_net),
        "params_ratio": count_params(pruned_net) / count_params(dense_net),
        "target_flops_ratio": cfg.target_flops_ratio if method.uses_gates else None,
        "kept_channels": {name: len(kept) for name, kept in mask.kept_channels.items()},
        "removed_blocks": mask.closed_blocks, "train_seconds": train_seconds,
        "train_energy": energy.to_dict() if energy is not None else None,
        "device": str(device), "distributed": parallel, "data": data, **method.summary(),
        "provenance": provenance(),
    }
    if cluster.is_main:
        save_mask(run_dir / "mask.json", document)
        write_plots(run_dir, model, history)
        write_json(run_dir / "metrics.json", metrics)  # last: its presence marks a finished run
    return metrics
