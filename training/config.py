"""Training configuration: one dataclass, loaded from YAML plus `--set key=value` overrides.

Unknown keys, wrong types and impossible values are refused with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import io
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .arch import MODEL_NAMES
from .data import DATASETS, FolderOptions
from .errors import ConfigError
from .methods import REGISTRY
from .methods.activation_density import ActivationDensitySettings
from .methods.flipout import FlipOutSettings
from .methods.polarized import PolarizedSettings
from .methods.torch_pruning import TorchPruningSettings

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig(PolarizedSettings, ActivationDensitySettings, FlipOutSettings, TorchPruningSettings):
    """Every key of a training run: the ones below, and each method's own (its `*Settings` dataclass, in
    training/methods/<method>.py, with the method's `config_problems` validating them)."""
    # what to train
    dataset: str = "fashion_mnist"
    data_dir: str | None = None          # None: the embedded Fashion-MNIST (data/fashion-mnist or Debian's copy)
    model: str = "resnet20"             # a built-in name, or your own network: "package.module:Callable"
    model_args: dict = dataclasses.field(default_factory=dict)  # keyword arguments for your Callable
    init_weights: str | None = None      # start from these weights: a state dict file or a dense run's checkpoint
    method: str = "polarized"
    # budget
    epochs: int = 4
    batch_size: int = 128
    eval_batch_size: int = 500
    train_subset: int | None = None      # limit training examples (quick runs)
    test_subset: int | None = None       # evaluate on the first N test examples only (quick runs, tests)
    val_size: int = 2000                 # held out of the train split: dynamic-gate consensus, model selection
    # optimiser (SGD + cosine for weights, SGD with momentum for gate scores)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0         # cross-entropy label smoothing
    distill_from: str | None = None      # a finished run (e.g. runs/<name>_dense) whose logits the run learns from
    distill_weight: float = 0.5          # (1 - w) * cross-entropy + w * distillation
    distill_temperature: float = 4.0
    round_to: int = 16                   # pruned widths are multiples of this (onnxruntime's fast conv path)
    # The pruning methods' own keys come from their settings classes (below the class name): polarized
    # (target_flops_ratio, flops_weight, the gate schedule, ...), activation_density, flipout, torch_pruning
    # (tp_*; its kept-MACs target is target_flops_ratio too).
    # --- dataset image_folder only (training/data/readers/image_folder.py says what each does) ---------
    image_size: int = FolderOptions.image_size           # side of the square network input
    resize: int | None = FolderOptions.resize            # shorter side scaled to this first (None: image_size)
    crop: str = FolderOptions.crop                       # training window: "center" or "random"
    horizontal_flip: bool = FolderOptions.horizontal_flip
    normalize_mean: tuple[float, ...] | None = FolderOptions.normalize_mean  # None: measured on train/
    normalize_std: tuple[float, ...] | None = FolderOptions.normalize_std
    skip_bad_images: bool = FolderOptions.skip_bad_images  # leave unreadable images out, counted in metrics.json
    # --- end of image_folder -----------------------------------------------------------------------------
    # run
    seed: int = 0
    device: str = "auto"
    threads: int | None = None           # torch intra-op threads (None: torch's default)
    out_dir: str = "runs"
    name: str | None = None              # run directory name (default: the config file's stem)
    progress: bool = True

    def validate(self) -> "TrainConfig":
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r}: {why} (got {getattr(self, key)!r})", key)
        hints = get_type_hints(TrainConfig)
        for f in fields(self):  # NaN slips through every comparison below; inf is never meant
            value = getattr(self, f.name)
            if float in get_args(hints[f.name]) + (hints[f.name],) and value is not None:
                need(math.isfinite(value), f.name, "must be a finite number")
        need(self.dataset in DATASETS, "dataset", f"must be one of {', '.join(DATASETS)}")
        need(self.model in MODEL_NAMES or ":" in self.model, "model",
             f"must be a built-in network ({', '.join(MODEL_NAMES)}) or an import path 'package.module:Callable'")
        need(not self.model_args or self.model not in MODEL_NAMES, "model_args",
             "built-in networks take no arguments (the data set sets their input and classes)")
        need(self.method in REGISTRY, "method", f"must be one of {', '.join(REGISTRY)}")
        need(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")
        need(self.epochs >= 1, "epochs", "must be at least 1")
        need(self.batch_size >= 1, "batch_size", "must be at least 1")
        need(self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
        need(self.train_subset is None or self.train_subset >= self.batch_size, "train_subset",
             "must be at least batch_size")
        need(self.val_size >= 0, "val_size", "must be >= 0")
        need(self.test_subset is None or self.test_subset >= 1, "test_subset", "must be at least 1")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(0 <= self.distill_weight <= 1, "distill_weight", "must be in [0, 1]")
        need(self.distill_temperature > 0, "distill_temperature", "must be > 0")
        need(self.round_to >= 1, "round_to", "must be at least 1")
        need(self.lr > 0, "lr", "must be a positive number")
        for key in ("momentum", "weight_decay"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(self.threads is None or self.threads >= 1, "threads", "must be at least 1")
        for key, why in FolderOptions.from_config(self.to_dict()).problems(self.dataset):  # image_folder's keys
            need(False, key, why)
        for name, method in REGISTRY.items():  # each method checks its own keys
            for key, why in method.config_problems(self, chosen=name == self.method):
                need(False, key, why)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that never change what a run trains, only where it is written and how it reports progress.
PLACEMENT_KEYS = frozenset({"name", "out_dir", "progress"})


def changed_keys(recorded: dict[str, Any], cfg: TrainConfig, free: frozenset[str] = PLACEMENT_KEYS) -> list[str]:
    """The keys outside `free` in which a run's recorded config differs from `cfg`: the one "same run?"
    test (a resume and a reused run ask it with their own `free` keys). A key the record lacks (added to
    the config after the run was made) counts as changed: its default need not be what the code did then
    (`lr_restart_at_freeze` arrived switched on)."""
    return sorted(key for key, value in cfg.to_dict().items()
                  if key not in free and (key not in recorded or recorded[key] != value))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check/convert one value against its field type; YAML and --set strings both pass through here."""
    allowed = get_args(annotation) if get_origin(annotation) is not None else (annotation,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key!r}: may not be empty", key)
    for kind in (t for t in allowed if t is not type(None)):
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind is str:
            if isinstance(value, str):
                return value
        elif kind is dict:
            if isinstance(value, str):  # --set model_args='{width: 8}'
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass
            if isinstance(value, dict) and all(isinstance(k, str) for k in value):
                return value
        elif get_origin(kind) is tuple:  # a YAML list, or "a,b,c" from --set
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, (list, tuple)):
                try:
                    return tuple(_coerce(key, item, get_args(kind)[0]) for item in items)
                except ConfigError:
                    pass
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key {key!r}: expected {names}, got {value!r}", key)


def make_config(values: dict[str, Any]) -> TrainConfig:
    hints = get_type_hints(TrainConfig)
    known = [f.name for f in fields(TrainConfig)]
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r}: keys must be names, not {type(key).__name__}", str(key))
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key {key!r}; {hint}", key)
    return TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()}).validate()


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = value
    return overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML error marks then say which file, not "<unicode string>"
    try:
        loaded = yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())  # PyYAML's message spans lines; an error is one line
        raise ConfigError(f"config file {path} is not valid YAML: {detail}") from None
    if loaded is None:
        raise ConfigError(f"config file {path} is empty; write `{{}}` in it to take every default")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, "
                          f"not a {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The config of a YAML file (optional) with `--set key=value` overrides on top; errors say which of
    the two the offending key came from."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        values.update(read_config_file(path))
        origin = dict.fromkeys(map(str, values), f"config file {path}")
        values.setdefault("name", Path(path).stem)
    for key, value in parse_overrides(list(overrides)).items():
        values[key], origin[key] = value, f"--set {key}={value}"
    try:
        return make_config(values)
    except ConfigError as error:
        source = origin.get(error.key) if error.key else None
        if source is None:
            raise
        raise ConfigError(f"{source}: {error}", error.key) from None
