"""Configs: YAML + overrides, and bad input refused with the key named."""
import pytest

from training.config import ConfigError, load_config, make_config


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
