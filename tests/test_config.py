"""Configs: YAML + overrides, and bad input refused with the key named."""
from pathlib import Path

import pytest

from polarprune.training.config import ConfigError, changed_keys, load_config, make_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: resnet32\nepochs: 3\n")
    cfg = load_config(path, ["target_flops_ratio=0.4", "train_subset=none", "dynamic_gates=true"])
    assert (cfg.model, cfg.epochs, cfg.target_flops_ratio, cfg.train_subset, cfg.dynamic_gates) == \
        ("resnet32", 3, 0.4, None, True)
    assert cfg.name == "run"


def test_shipped_configs_load():
    import pathlib
    configs = sorted(pathlib.Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize("values, key", [
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"epochs": "three"}, "epochs"),
    ({"epochs": 0}, "epochs"),
    ({"target_flops_ratio": 0.0}, "target_flops_ratio"),
    ({"target_flops_ratio": 1.5}, "target_flops_ratio"),
    ({"model": "resnet1000"}, "model"),
    ({"dataset": "imagenet22k"}, "dataset"),
    ({"device": "tpu"}, "device"),
    ({"round_to": 0}, "round_to"),
    ({"dynamic_gates": "maybe"}, "dynamic_gates"),
    ({"epochs": 2.5}, "epochs"),
    # each method validates its own keys, whichever method the run uses
    ({"method": "dense", "ramp_fraction": 0.05}, "ramp_fraction"),
    ({"method": "dense", "projection": "snap"}, "projection"),
    ({"method": "polarized", "density_stop": 0}, "density_stop"),
    ({"method": "polarized", "final_sparsity": 1.0}, "final_sparsity"),
    ({"method": "flipout", "flops_weight": -1}, "flops_weight"),
])
def test_bad_values_are_refused_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        make_config(values)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["epochs"])


def test_a_method_checks_the_rest_of_the_run_only_when_it_runs():
    # dynamic gates vote on the validation set: polarized needs one, a dense run does not care
    assert make_config({"method": "dense", "dynamic_gates": True, "val_size": 0}).val_size == 0
    with pytest.raises(ConfigError, match="config key 'val_size': dynamic gates need a validation set"):
        make_config({"method": "polarized", "dynamic_gates": True, "val_size": 0})
    # FlipOut's halvings must fit its epochs; a polarized run with the same keys is fine
    assert make_config({"method": "polarized", "final_sparsity": 0.875, "epochs": 3}).epochs == 3
    with pytest.raises(ConfigError, match="config key 'final_sparsity'.*needs epochs >= 4"):
        make_config({"method": "flipout", "final_sparsity": 0.875, "epochs": 3})


def test_every_method_key_belongs_to_one_method():
    """The config is the common keys plus each method's settings dataclass; no key is declared twice."""
    import dataclasses
    from polarprune.training.config import TrainConfig
    from polarprune.training.methods import REGISTRY
    owned = [f.name for m in REGISTRY.values() if m.settings for f in dataclasses.fields(m.settings)]
    assert len(owned) == len(set(owned))
    common = set(TrainConfig.__dataclass_fields__) - set(owned)
    assert {"target_flops_ratio", "density_every", "final_sparsity"} <= set(owned)
    assert {"epochs", "lr", "round_to", "method"} <= common


def test_same_run_is_one_predicate_with_the_free_keys_of_the_question():
    from polarprune.training.loop import RESUME_FREE_KEYS

    cfg = make_config({"epochs": 3, "name": "b", "threads": 2})
    recorded = {**make_config({"epochs": 2, "name": "a", "lr": 0.2}).to_dict()}
    assert changed_keys(recorded, cfg) == ["epochs", "lr", "threads"]  # name only places the run
    assert changed_keys(recorded, cfg, RESUME_FREE_KEYS) == ["lr"]  # a resume may lengthen or move a run
    # a key newer than the recorded run is a change: its default need not be what the run did
    del recorded["lr_restart_at_freeze"]
    assert changed_keys(recorded, cfg, RESUME_FREE_KEYS) == ["lr", "lr_restart_at_freeze"]


def test_a_resume_names_the_keys_newer_than_its_run():
    from polarprune.training.loop import RunError, check_resumable

    cfg = make_config({"epochs": 2})
    recorded = cfg.to_dict()
    del recorded["lr_restart_at_freeze"]  # a run made before the restart existed: one cosine
    state = {"config": recorded, "epoch": 1, "optimizer": {}, "rng": {}}
    with pytest.raises(RunError, match=r"lr_restart_at_freeze changed \(lr_restart_at_freeze: newer than the run"):
        check_resumable(cfg, state, Path("runs/old/checkpoint.pt"))
    check_resumable(cfg, {**state, "config": cfg.to_dict()}, Path("runs/old/checkpoint.pt"))  # the same run resumes
