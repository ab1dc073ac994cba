"""finalize_mask (rounding, floors, the target band) and mask.json validation."""
import json

import pytest
import torch

from training.arch import SpecError, make_spec
from training.flops import layer_costs
from training.mask import GateDecision, Mask, finalize_mask, load_mask, mask_document, mask_macs, save_mask
from training.models import build_model


def decisions_for(spec, open_share, block_open=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = {}
    units = spec["blocks"] if spec["family"] == "resnet" else spec["layers"]
    for unit in units:
        width = unit["mid"] if spec["family"] == "resnet" else unit["out"]
        conf = torch.rand(width, generator=generator)
        out[unit["name"]] = GateDecision(conf < open_share, 1 - conf, block_open, 0.9)
    return out


@pytest.fixture(scope="module")
def resnet():
    spec = make_spec("resnet20", 1, 10, (28, 28))
    return spec, layer_costs(build_model(spec))


def ratio(spec, costs, mask):
    full = Mask({b["name"]: list(range(b["mid"])) for b in spec["blocks"]})
    return mask_macs(costs, spec, mask) / mask_macs(costs, spec, full)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("open_share", [0.1, 0.5, 0.95])
def test_final_mask_lands_in_the_band_with_rounded_widths(resnet, target, open_share):
    spec, costs = resnet
    mask = finalize_mask(spec, decisions_for(spec, open_share), costs, 16, target, 0.02)
    assert abs(ratio(spec, costs, mask) - target) <= 0.03
    assert all(len(kept) % 16 == 0 and len(kept) >= 16 for kept in mask.kept_channels.values())
    assert set(mask.kept_channels).isdisjoint(mask.closed_blocks)


def test_without_a_target_the_gates_decide(resnet):
    spec, costs = resnet
    decisions = decisions_for(spec, 0.6)
    decisions["layer2.1"].block_open = False
    decisions["layer3.0"].channel_open[:] = False  # every channel shut: the block goes
    mask = finalize_mask(spec, decisions, costs, 16, None, 0.02)
    assert mask.closed_blocks == ["layer2.1", "layer3.0"]
    # 64 * 0.6 open rounds to a multiple of 16, and the most confident channels are the kept ones
    kept = mask.kept_channels["layer3.1"]
    assert len(kept) == 16 * round(int(decisions["layer3.1"].channel_open.sum()) / 16)
    opened = set(torch.nonzero(decisions["layer3.1"].channel_open).flatten().tolist())
    assert set(kept) <= opened or opened <= set(kept)  # rounding down drops, rounding up adds


def test_plain_layers_keep_at_least_one_group():
    spec = make_spec("vgg16", 3, 10, (32, 32))
    costs = layer_costs(build_model(spec))
    mask = finalize_mask(spec, decisions_for(spec, 0.0), costs, 16, None, 0.02)
    assert mask.closed_blocks == []
    assert all(len(kept) == 16 for kept in mask.kept_channels.values())


def test_mask_json_round_trip_and_tampering(tmp_path, resnet):
    spec, costs = resnet
    mask = finalize_mask(spec, decisions_for(spec, 0.5), costs, 16, 0.5, 0.02)
    path = tmp_path / "mask.json"
    save_mask(path, mask_document("resnet20", spec, mask, costs, 16))
    document, loaded = load_mask(path)
    assert loaded == mask and document["pruned_flops"] == int(mask_macs(costs, spec, mask))
    tampered = json.loads(path.read_text())
    first = next(iter(tampered["kept_channels"]))
    tampered["kept_channels"][first] = tampered["kept_channels"][first][:-1]
    path.write_text(json.dumps(tampered))
    with pytest.raises(SpecError, match="pruned_spec does not match"):
        load_mask(path)
    tampered["kept_channels"][first] = [0, 0]
    path.write_text(json.dumps(tampered))
    with pytest.raises(SpecError, match="distinct"):
        load_mask(path)
    path.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_mask(path)
    with pytest.raises(SpecError, match="make train"):
        load_mask(tmp_path / "missing.json")
