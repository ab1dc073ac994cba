"""The Python API's errors: one line that says what to pass instead."""
from __future__ import annotations

import pytest
import torch

from polarprune.training.api import ApiError, ProgramError, load_pruned, polarize, save_for_export
from polarprune.training.graph import GraphError
from polarprune.training.networks import load_weights

from user_networks import VGG


def test_a_cli_setting_name_is_answered_with_the_api_name():
    with pytest.raises(ApiError, match="unknown setting 'target_flops_ratio'; did you mean 'target_flops'"):
        polarize(VGG(), torch.randn(2, 3, 32, 32), target_flops_ratio=0.5)
    with pytest.raises(ApiError, match="did you mean 'round_to'"):
        polarize(VGG(), torch.randn(2, 3, 32, 32), roundto=4)


def test_a_wrong_input_names_the_expected_shape_in_one_line():
    with pytest.raises(GraphError, match=r"first layer features.0 expects 3 input channels, \(N, 3, H, W\)") as caught:
        polarize(VGG(), torch.randn(2, 1, 32, 32))
    assert "\n" not in str(caught.value) and "ShapeProp" not in str(caught.value)
    with pytest.raises(ApiError, match="one batch tensor .* got a list"):
        polarize(VGG(), [torch.randn(2, 3, 32, 32)])


def test_load_pruned_says_what_a_wrong_file_is(tmp_path):
    torch.save(VGG().state_dict(), tmp_path / "weights.pt")
    (tmp_path / "garbage.pt2").write_bytes(b"not a program")
    with pytest.raises(ProgramError, match="a torch.save file .* load_state_dict"):
        load_pruned(tmp_path / "weights.pt")
    with pytest.raises(ProgramError, match="not a zip archive"):
        load_pruned(tmp_path / "garbage.pt2")
    with pytest.raises(ProgramError, match="no such file"):
        load_pruned(tmp_path / "missing.pt2")


def test_save_for_export_checks_its_inputs(tmp_path):
    network = VGG().eval()
    with pytest.raises(ApiError, match=r"one integer class per image \(8\)"):
        save_for_export(tmp_path, network, network, torch.randn(8, 3, 32, 32), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ApiError, match="must be an nn.Module"):
        save_for_export(tmp_path, "pruned.pt2", network, torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ApiError, match=r"one number per input channel \(3\)"):
        save_for_export(tmp_path, network, network, torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long),
                        normalization={"mean": [0.5], "std": [0.5]})
    assert not list(tmp_path.iterdir())  # nothing written before the checks pass


def test_a_data_parallel_state_dict_loads_without_its_prefix():
    source, target = VGG(), VGG()
    load_weights(target, {f"module.{k}": v for k, v in source.state_dict().items()}, "init_weights")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_a_wrong_cut_fails_the_shared_equivalence_check_naming_the_layer(monkeypatch):
    """prune() runs the export stage's equivalence check: a cut that changes a layer is refused (exit code 1),
    naming the first layer whose kept channels diverge, and the gated network keeps its training mode."""
    import polarprune.training.api as api
    from polarprune.training.equivalence import EquivalenceError

    real_cut = api.cut

    def damaged_cut(graph, mask, network):
        pruned = real_cut(graph, mask, network)
        with torch.no_grad():
            pruned.get_submodule("features.4").weight.add_(0.5)
        return pruned

    monkeypatch.setattr(api, "cut", damaged_cut)
    gated = polarize(VGG(), torch.randn(2, 3, 32, 32), target_flops=0.5, round_to=8)
    gated.train()
    with pytest.raises(EquivalenceError, match=r"first diverging layer: features\.4 ") as caught:
        gated.prune()
    assert caught.value.exit_code == 1 and gated.training
