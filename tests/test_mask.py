"""choose_mask (rounding, floors, the target band) and mask.json validation."""
import json

import pytest
import torch

from polarprune.training.gating import full_mask, mask_macs, mask_problem
from polarprune.training.graph import trace_network
from polarprune.training.mask import (GateDecision, Mask, MaskError, choose_mask, closed_by, flipped_cost, load_mask,
                           mask_document, projection_report, save_mask, unit_sizes)
from polarprune.training.networks import NetworkInfo, build_network


def traced(model: str, in_channels: int, size: int):
    info = NetworkInfo(model, in_channels, 10, (size, size))
    return info, trace_network(build_network(info), info.example_input())


def decisions_for(graph, open_share, block_open=True, seed=0, round_to=16):
    generator = torch.Generator().manual_seed(seed)
    channels = {}
    for name, group in graph.prunable().items():
        conf = torch.rand(len(unit_sizes(group.width, round_to)), generator=generator)
        if len(conf) == 1:  # a single unit has no gate that learns: always open
            conf[:] = 0.0
        channels[name] = GateDecision(conf < open_share, 1 - conf)
    blocks = {name: (block_open, 0.9) for name in graph.blocks}
    return channels, blocks


@pytest.fixture(scope="module")
def resnet():
    return traced("resnet20", 1, 28)


def ratio(graph, mask):
    return mask_macs(graph, mask) / mask_macs(graph, full_mask(graph))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("open_share", [0.1, 0.5, 0.95])
def test_final_mask_lands_in_the_band_with_rounded_widths(resnet, target, open_share):
    _, graph = resnet
    channels, blocks = decisions_for(graph, open_share)
    mask = choose_mask(mask_problem(graph, round_to=16), channels, blocks, target, 0.02)
    assert abs(ratio(graph, mask) - target) <= 0.03
    assert all(len(kept) % 16 == 0 and len(kept) >= 16 for kept in mask.kept_channels.values())
    gone = {g for b in mask.closed_blocks for g in graph.groups_inside(b)}
    assert set(mask.kept_channels).isdisjoint(gone)


def test_without_a_target_the_gates_decide(resnet):
    _, graph = resnet
    channels, blocks = decisions_for(graph, 0.6)
    blocks["layer2.1"] = (False, 0.1)
    channels["layer3.0.conv1"].unit_open[:] = False  # every unit shut (a dynamic gates' vote): the block goes
    channels["layer3.1.conv1"] = GateDecision(torch.tensor([True, False, True, False]), torch.tensor([.9, .2, .8, .4]))
    mask = choose_mask(mask_problem(graph, round_to=16), channels, blocks, None, 0.02)
    assert mask.closed_blocks == ["layer2.1", "layer3.0"]
    # the open units, whole: channels 0-15 and 32-47 of the 64
    assert mask.kept_channels["layer3.1.conv1"] == [*range(16), *range(32, 48)]


def test_plain_layers_keep_at_least_one_unit():
    _, graph = traced("vgg16", 3, 32)
    channels, blocks = decisions_for(graph, 0.0)
    mask = choose_mask(mask_problem(graph, round_to=16), channels, blocks, None, 0.02)
    assert mask.closed_blocks == []
    assert all(len(kept) == 16 for kept in mask.kept_channels.values())


def test_mask_json_round_trip_and_tampering(tmp_path, resnet):
    info, graph = resnet
    channels, blocks = decisions_for(graph, 0.5)
    mask = choose_mask(mask_problem(graph, round_to=16), channels, blocks, 0.5, 0.02)
    path = tmp_path / "mask.json"
    save_mask(path, mask_document(mask, mask_problem(graph), info.describe(), 16))
    document, loaded = load_mask(path)
    assert loaded == mask and document["pruned_flops"] == round(mask_macs(graph, mask))
    tampered = json.loads(path.read_text())
    first = next(iter(tampered["kept_channels"]))
    tampered["kept_channels"][first] = [0, 0]
    path.write_text(json.dumps(tampered))
    with pytest.raises(MaskError, match="distinct"):
        load_mask(path)
    tampered["kept_channels"][first] = [0, 999]
    path.write_text(json.dumps(tampered))
    with pytest.raises(MaskError, match=r"within \[0, "):
        load_mask(path)
    del tampered["kept_channels"][first]
    path.write_text(json.dumps(tampered))
    with pytest.raises(MaskError, match=f"no kept channels for group {first}"):
        load_mask(path)
    path.write_text(json.dumps({**tampered, "version": 1}))
    with pytest.raises(MaskError, match="version 1.*retrain"):
        load_mask(path)
    path.write_text("{not json")
    with pytest.raises(MaskError, match="not valid JSON"):
        load_mask(path)
    with pytest.raises(MaskError, match="make train"):
        load_mask(tmp_path / "missing.json")


def test_projection_report_lists_what_the_move_into_the_band_changed(resnet):
    _, graph = resnet
    channels, blocks = decisions_for(graph, 0.95)  # the gates kept almost everything: far above 0.3
    problem = mask_problem(graph, round_to=16)
    learned = choose_mask(problem, channels, blocks, None, 0.02)
    final = choose_mask(problem, channels, blocks, 0.3, 0.02)
    report = projection_report(problem, learned, final)
    assert report["learned_flops_ratio"] == pytest.approx(ratio(graph, learned)) and report["learned_flops_ratio"] > 0.8
    assert report["final_flops_ratio"] == pytest.approx(ratio(graph, final))
    assert report["flipped_groups"] or report["closed_blocks"]
    for name, flip in report["flipped_groups"].items():
        assert flip["kept_before"] == len(learned.kept_channels.get(name, []))
        assert flip["kept_after"] == len(final.kept_channels.get(name, []))
        assert set(flip["closed"]) == set(learned.kept_channels.get(name, [])) - set(final.kept_channels.get(name, []))
    assert projection_report(problem, learned, learned)["flipped_groups"] == {}


@pytest.mark.parametrize("width, round_to, sizes", [(64, 16, [16] * 4), (32, 16, [16, 16]), (16, 16, [16]),
                                                    (40, 16, [16, 24]), (8, 16, [8]), (3, 1, [1, 1, 1])])
def test_groups_shrink_in_whole_units_of_round_to(width, round_to, sizes):
    assert unit_sizes(width, round_to) == sizes


def test_flipped_share_and_what_blocks_and_channels_closed(resnet):
    _, graph = resnet
    problem = mask_problem(graph, round_to=16)
    full = problem.full()
    assert flipped_cost(problem, full, full) == 0
    one_block = Mask({n: k for n, k in full.kept_channels.items() if n not in graph.groups_inside("layer3.2")},
                     ["layer3.2"])
    share = 1 - problem.ratio(one_block)
    assert flipped_cost(problem, full, one_block) == pytest.approx(share)
    assert closed_by(problem, one_block) == pytest.approx({"blocks": share, "channels": 0.0})
    narrower = Mask({**one_block.kept_channels, "layer3.1.conv1": list(range(16))}, ["layer3.2"])
    split = closed_by(problem, narrower)
    assert split["blocks"] == pytest.approx(share)
    assert split["channels"] == pytest.approx(problem.ratio(one_block) - problem.ratio(narrower))
    # closing one block and opening nothing else flips exactly its cost; swapping kept channels flips both
    swapped = Mask({**one_block.kept_channels, "layer3.1.conv1": list(range(16, 32))}, ["layer3.2"])
    assert flipped_cost(problem, narrower, swapped) > 0
