"""The shared training loop: data, optimisers, per-epoch checkpoints, resume, metrics and plots.

A run directory `<out_dir>/<name>/` holds checkpoint.pt (resume state), log.jsonl (one row per epoch),
mask.json (the static sub-network: kept channels of each traced group, closed blocks), network.pt (the
trained network for export: `training.network_file`), metrics.json and plots. Every write is atomic; a run
is resumable from its last completed epoch. Under torchrun the same loop runs on every rank
(training/distributed.py); rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from polarprune.common.atomicio import write_json, write_text
from polarprune.common.results import provenance
from polarprune.common.energy import EnergyMeter, EnergyReading

from .checkpoint import describe_model, load_checkpoint, save_checkpoint, trained_model
from .config import PLACEMENT_KEYS, ConfigError, TrainConfig, changed_keys
from .data import BatchIterator, DatasetInfo, FolderOptions, describe_splits, load_splits
from .distributed import Cluster, check_consensus, fingerprint, start_cluster, structure_key
from .errors import TrainingError
from .flops import count_params
from .gates import Gate
from .gating import GatedNetwork, cut, mask_problem
from .graph import GraphError, NetworkGraph, trace_network
from .losses import TaskLoss
from .mask import mask_document, save_mask
from .methods import RunContext, make_method
from .network_file import NETWORK_FILE, save_network
from .networks import NetworkError, NetworkInfo, build_network, load_weights, read_weights
from .plots import write_plots
from .pruning_report import pruning_report, report_markdown, write_pruning_report

# Keys that may differ between the interrupted run and its resume (they do not change the result).
# A resume may also move the run to another device or thread count and lengthen it (not once it has
# finished); the run's latency table travels in its checkpoint (a moved run folder resumes).
RESUME_FREE_KEYS = PLACEMENT_KEYS | {"device", "threads", "epochs", "latency_cache"}


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


def cosine_schedule(total_steps: int, restart: Callable[[], int | None] = lambda: None) -> Callable[[int], float]:
    """The weights' learning-rate factor at a step: one cosine from 1 to 0 over the run; once `restart()`
    names a step r (`Method.schedule_restart`), a new cosine from 1 at r to 0 at the end."""
    def factor(step: int) -> float:
        start = restart()
        if start is None or not 0 <= start < total_steps or step < start:
            start = 0
        return 0.5 * (1 + math.cos(math.pi * (min(step, total_steps) - start) / (total_steps - start)))
    return factor


def make_optimizers(model, cfg: TrainConfig, total_steps: int, done_steps: int = 0,
                    restart: Callable[[], int | None] = lambda: None):
    """SGD + cosine for the weights (`cosine_schedule`); plain SGD with momentum for gate scores. Not Adam
    for the scores: Adam normalises away gradient size, so every gate moved in lockstep under the shared
    FLOPs push and they all closed together (measured; README). With SGD a gate closes when its cost
    outweighs its use."""
    score_ids = {id(m.score) for m in model.modules() if isinstance(m, Gate)}
    named = list(model.named_parameters())
    weights = [(n, p) for n, p in named if id(p) not in score_ids]
    scores = [p for n, p in named if id(p) in score_ids]
    weight_groups = [
        {"params": [p for n, p in weights if p.dim() > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in weights if p.dim() <= 1], "weight_decay": 0.0},  # BN and biases
    ]
    sgd = torch.optim.SGD(weight_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    gate_sgd = torch.optim.SGD(scores, lr=cfg.gate_lr, momentum=cfg.gate_momentum) if scores else None
    cosine = cosine_schedule(total_steps, restart)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sgd, cosine)
    # A resumed run (or a model replaced mid-run) continues its schedule where it was.
    scheduler.last_epoch = done_steps
    for group, base_lr in zip(sgd.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * cosine(done_steps)
    return sgd, gate_sgd, scheduler


def train_step(model, method, sgd, gate_sgd, scheduler, images, labels, progress: float, forward=None,
               task_loss: TaskLoss = TaskLoss()):
    """One optimisation step, in the order methods rely on. Returns (task loss, logits, method logs).
    `forward` is what runs the batch when it is not `model` itself (the DDP wrapper of a parallel run)."""
    logits = (forward or model)(images)
    loss = task_loss(logits, images, labels)
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
    same config draws the same network and batches (every method of `make compare` starts from the same network)."""
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


def train_epoch(step, batches, done_steps: int, total_steps: int,
                after_step=None) -> tuple[float, int, int, dict[str, float]]:
    """One pass over `batches` with `step(images, labels, progress)` (a bound `train_step`); the summed task
    loss, correct predictions and examples of this rank, and the method's logs of the last step.
    `after_step(progress)` (progress: share of steps done) may hand back the step function to go on with."""
    loss_sum, correct, seen, logs = 0.0, 0, 0, {}
    for index, (images, labels) in enumerate(batches):
        loss, logits, logs = step(images, labels, (done_steps + index) / total_steps)
        if after_step is not None:
            step = after_step((done_steps + index + 1) / total_steps) or step
        loss_sum += float(loss) * labels.numel()
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.numel()
        if hasattr(batches, "set_postfix"):
            batches.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                kept_flops=f"{logs.get('kept_flops', 1.0):.3f}")
    return loss_sum, correct, seen, logs


def swap_optimizers(old_model, new_model, sgd, method, cfg: TrainConfig, total_steps: int, done_steps: int):
    """Optimisers for the network a method handed back mid-run, the schedule where it was and, where the
    method can map them (`Method.carry_momentum`), the momentum of the weights it kept."""
    momentum = {name: sgd.state[p]["momentum_buffer"] for name, p in old_model.named_parameters()
                if "momentum_buffer" in sgd.state.get(p, {})}
    sgd, gate_sgd, scheduler = make_optimizers(new_model, cfg, total_steps, done_steps, method.schedule_restart)
    carried = method.carry_momentum(momentum)
    for name, p in new_model.named_parameters():
        if name in carried:
            sgd.state[p]["momentum_buffer"] = carried[name].to(p.device).clone()
    return sgd, gate_sgd, scheduler


def check_resumable(cfg: TrainConfig, state: dict[str, Any], checkpoint_path: Path) -> None:
    """RunError unless `state` can be resumed with `cfg`: the same result-changing keys, optimiser and RNG
    states present."""
    changed = changed_keys(state["config"], cfg, RESUME_FREE_KEYS)
    if changed:
        newer = [key for key in changed if key not in state["config"]]
        raise RunError(f"--resume with a different config: {', '.join(changed)} changed"
                       + (f" ({', '.join(newer)}: newer than the run, which did not record it; train a new run)"
                          if newer else ""))
    planned = state["config"].get("epochs")
    if state["epoch"] == planned and cfg.epochs > planned:
        raise RunError(f"--resume with epochs={cfg.epochs}: {checkpoint_path} is a finished run of {planned} epochs, "
                       "saved as the network it deploys, so it cannot train on: train a new, longer run")
    lacking = [key for key in ("optimizer", "rng") if key not in state]
    if lacking:
        raise RunError(f"--resume: {checkpoint_path} holds no {' or '.join(lacking)} state, so the run cannot "
                       "go on from it")


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
    network_info, graph = traced_network(cfg, info, state, cluster)
    method = make_method(cfg, graph)
    model = method.build_model()
    task_loss = TaskLoss(cfg.label_smoothing, _teacher(cfg, network_info, cluster, device),
                         cfg.distill_weight, cfg.distill_temperature)
    steps_per_epoch = len(train_batches)
    total_steps = cfg.epochs * steps_per_epoch
    ctx = RunContext(device, lambda: val_batches.epoch(0), cfg.epochs, steps_per_epoch, cluster, run_dir)

    start_epoch, history, train_seconds, energy = 0, [], 0.0, None
    if state is not None:
        check_resumable(cfg, state, checkpoint_path)
        method.load_state_dict(state.get("method_state", {}))
        model = method.restore_model()
        model.load_state_dict(state["model"], strict=True)
        start_epoch, history = state["epoch"], state.get("history", [])
        train_seconds = state.get("train_seconds", 0.0)
        energy = EnergyReading.from_dict(state["energy"]) if state.get("energy") else None
    model.to(device)
    method.prepare(model, ctx)
    sgd, gate_sgd, scheduler = make_optimizers(model, cfg, total_steps, start_epoch * steps_per_epoch,
                                               method.schedule_restart)
    if state is not None and start_epoch < cfg.epochs:  # a finished run takes no step (and its optimisers
        sgd.load_state_dict(state["optimizer"])          # are those of the network it cut, not of the
        if gate_sgd is not None and state.get("gate_optimizer"):  # gated one it saved): it only finishes again
            gate_sgd.load_state_dict(state["gate_optimizer"])
    if state is not None:
        set_rng_state(state["rng"])

    def checkpoint_state(epochs_done: int) -> dict[str, Any]:
        return {"config": cfg.to_dict(), "network": network_info.describe(), "model": model.state_dict(),
                "trained_model": describe_model(model, graph), "optimizer": sgd.state_dict(),
                "gate_optimizer": gate_sgd.state_dict() if gate_sgd is not None else None,
                "epoch": epochs_done, "method_state": method.state_dict(), "rng": rng_state(),
                "history": history, "train_seconds": train_seconds,
                "energy": energy.to_dict() if energy is not None else None}

    show = cfg.progress and cluster.is_main
    forward, forward_key = model, None
    meter = EnergyMeter(scope=f"training steps of {cluster.world_size} processes" if cluster.distributed
                        else "training steps")

    def take(new_model, done_steps: int) -> bool:
        """Go on with the model the method handed back: fresh optimisers for new shapes, DDP re-wrapped for a
        new network or newly frozen gates. Whether anything changed."""
        nonlocal model, sgd, gate_sgd, scheduler, forward, forward_key
        changed = new_model is not model
        if changed:
            old_model, model = model, new_model.to(device)
            method.prepare(model, ctx)
            sgd, gate_sgd, scheduler = swap_optimizers(old_model, model, sgd, method, cfg, total_steps, done_steps)
        if structure_key(model) != forward_key:
            forward, forward_key = cluster.wrap(model, device), structure_key(model)
            changed = True
        model.train()
        return changed

    def bound_step():
        return partial(train_step, model, method, sgd, gate_sgd, scheduler, forward=forward, task_loss=task_loss)

    def after_step(progress: float):
        done = round(progress * total_steps)
        return bound_step() if take(method.between_steps(model, progress, ctx), done) else None

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        meter.start()
        take(method.start_epoch(model, epoch, ctx), epoch * steps_per_epoch)
        bar = tqdm(train_batches.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not show, leave=False)
        loss_sum, correct, seen, logs = train_epoch(bound_step(), bar, epoch * steps_per_epoch, total_steps,
                                                    after_step)
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
               **({"kept_latency": logs["kept_latency"]} if "kept_latency" in logs else {}),
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
    metrics = finish_run(cfg, run_dir, method, model, test_batches, device, history, train_seconds, graph,
                         network_info, cluster, energy, parallel if cluster.distributed else None, data.summary,
                         val_batches)
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


def traced_network(cfg: TrainConfig, info: DatasetInfo, state: dict | None,
                   cluster: Cluster) -> tuple[NetworkInfo, NetworkGraph]:
    """The run's network for this data (built, with `init_weights` on a fresh run) and its trace; a network
    that cannot be traced or does not output one logit per class is a config error."""
    network_info = NetworkInfo(cfg.model, info.in_channels, info.num_classes, tuple(info.input_size),
                               cfg.model_args)
    try:
        graph = trace_network(_network(cfg, network_info, state, cluster), network_info.example_input())
    except GraphError as error:
        raise ConfigError(f"config key 'model': {error}", "model") from None
    if graph.output_shape != (info.num_classes,):
        raise ConfigError(f"config key 'model_args': {cfg.model} outputs {list(graph.output_shape)} per image, "
                          f"but {info.name} has {info.num_classes} classes", "model_args")
    return network_info, graph


def _network(cfg: TrainConfig, network_info: NetworkInfo, state: dict | None, cluster: Cluster):
    """The run's plain network: built, and holding `init_weights` when a fresh run starts from them (rank
    0 reads the file and hands the weights to the others)."""
    try:
        network = build_network(network_info)
        if cfg.init_weights and state is None:
            load_weights(network, cluster.from_main(lambda: read_weights(cfg.init_weights)),
                         f"init_weights {cfg.init_weights}")
    except NetworkError as error:
        key = "init_weights" if str(error).startswith("init_weights") else "model"
        raise ConfigError(f"config key {key!r}: {error}", key) from None
    return network


def _teacher(cfg: TrainConfig, network_info: NetworkInfo, cluster: Cluster, device: torch.device):
    """The finished run named by `distill_from`, in eval mode on `device` (None without one). It must have
    seen the same inputs and classes."""
    if not cfg.distill_from:
        return None
    path = Path(cfg.distill_from) / "checkpoint.pt"
    state = cluster.from_main(lambda: load_checkpoint(path))
    theirs = state["network"]
    if (theirs["in_channels"], list(theirs["input_size"]), theirs["num_classes"]) != (
            network_info.in_channels, list(network_info.input_size), network_info.num_classes):
        raise ConfigError(f"config key 'distill_from': {path} was trained on other inputs or classes", "distill_from")
    teacher, _ = trained_model(state, path)
    return teacher.to(device).eval()


def data_source(cfg: TrainConfig) -> dict[str, Any]:
    """Where the run's images come from, as network.pt records it for export (a config-like mapping:
    dataset, data_dir, seed and the image-folder options)."""
    folder = {key: list(value) if isinstance(value, tuple) else value
              for key, value in dataclasses.asdict(FolderOptions.from_config(cfg.to_dict())).items()}
    return {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "seed": cfg.seed, **folder}


def finish_run(cfg, run_dir, method, model, test_batches, device, history, train_seconds, graph: NetworkGraph,
               network_info: NetworkInfo, cluster: Cluster = Cluster(), energy: EnergyReading | None = None,
               parallel=None, data=None, val_batches=None):
    """Evaluate exactly the static sub-network (on the test split, and on the validation split that method
    choices are made on), and write mask.json, network.pt (export's input), metrics.json and plots (rank 0)."""
    test_accuracy, _ = evaluate(model, test_batches.epoch(0), device, cluster)
    # every rank walks the whole validation split: no sum over ranks
    val_accuracy = evaluate(model, val_batches.epoch(0), device)[0] if val_batches is not None and len(val_batches) else None
    mask = method.final_mask(model)
    document = mask_document(mask, mask_problem(graph), network_info.describe(), cfg.round_to)
    dense_flops, pruned_flops = document["dense_flops"], document["pruned_flops"]
    dense_params, pruned_params = count_params(graph.module), count_params(cut(graph, mask, graph.module))
    metrics = {
        "dataset": cfg.dataset, "model": cfg.model, "method": cfg.method, "epochs": cfg.epochs,
        "test_accuracy": test_accuracy, "val_accuracy": val_accuracy, "dense_flops": dense_flops, "pruned_flops": pruned_flops,
        "flops_ratio": pruned_flops / dense_flops,
        "dense_params": dense_params, "pruned_params": pruned_params, "params_ratio": pruned_params / dense_params,
        "target_flops_ratio": cfg.target_flops_ratio if method.uses_gates else None,
        "kept_channels": {name: len(kept) for name, kept in mask.kept_channels.items()},
        "removed_blocks": mask.closed_blocks, "train_seconds": train_seconds,
        "train_energy": energy.to_dict() if energy is not None else None,
        "device": str(device), "distributed": parallel, "data": data, **method.summary(),
        "config": cfg.to_dict(),  # what was trained, readable without loading the checkpoint
        "provenance": provenance(),
    }
    if cluster.is_main:
        save_mask(run_dir / "mask.json", document)
        plain = model.plain() if isinstance(model, GatedNetwork) else model
        save_network(run_dir / NETWORK_FILE, plain, network_info, mask, cfg.method, data_source(cfg),
                     {"mean": data["mean"], "std": data["std"]}, metrics["provenance"])
        write_plots(run_dir, model, history)
        report = pruning_report(graph, mask, metrics["target_flops_ratio"], cfg.round_to,  # pruning.md/.json/.png
                                metrics.get("projection") if isinstance(metrics.get("projection"), dict) else None)
        write_pruning_report(run_dir, report)
        print(report_markdown(report), flush=True)
        write_json(run_dir / "metrics.json", metrics)  # last: its presence marks a finished run
    return metrics
