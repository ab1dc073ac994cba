"""The pruning report: widths before and after, pin reasons, blocks, the projection's share, the files."""
from __future__ import annotations

import json

import pytest
import torch

from polarprune.training.api import polarize
from polarprune.training.pruning_report import FILES, decisions, report_markdown, write_pruning_report

from user_networks import GroupNormNet, resnet18


def test_a_pinned_network_reports_its_pinned_share_and_reasons(tmp_path):
    gated = polarize(GroupNormNet(), torch.randn(2, 3, 16, 16), round_to=4, target_flops=0.5)
    report = gated.summary()
    assert report["groups"]["conv1"]["pinned"] and report["groups"]["conv2"]["kept"] <= 32
    assert report["decisions"]["learned_ratio"] == 1.0  # gates all open: the projection made every cut
    assert report["decisions"]["final_ratio"] == pytest.approx(report["kept_ratio"])
    assert 0 < report["pinned_macs_share"] < 1
    text = report_markdown(report)
    assert f"Pinned layers hold {report['pinned_macs_share']:.3f} of the MACs" in text
    assert "GroupNorm norm normalises across channels" in text
    write_pruning_report(tmp_path, report)
    assert json.loads((tmp_path / FILES["json"]).read_text())["groups"]["conv1"]["pinned"]
    assert (tmp_path / FILES["markdown"]).read_text() == text
    assert (tmp_path / FILES["chart"]).read_bytes()[:4] == b"\x89PNG"


def test_an_unreachable_target_is_said_up_front():
    with pytest.warns(UserWarning, match=r"target 0.050 of the MACs cannot be reached: every mask keeps at least .* in pinned layers"):
        gated = polarize(GroupNormNet(), torch.randn(2, 3, 16, 16), round_to=16, target_flops=0.05)
    assert gated.summary()["unreachable"].startswith("target 0.050")


def test_blocks_and_layers_before_and_after():
    torch.manual_seed(0)
    gated = polarize(resnet18(), torch.randn(2, 3, 32, 32), round_to=4, target_flops=0.5)
    with torch.no_grad():
        gated.block_gate("layer3.1").score.fill_(-3.0)
    mask = gated.mask()
    report = gated.summary(mask)
    assert report["blocks"]["layer3.1"] == "closed" and report["blocks"]["layer1.0"] == "kept"
    assert report["layers"]["layer3.1.conv1"]["macs"][1] == 0
    assert sum(layer["macs"][1] for layer in report["layers"].values()) == report["kept_macs"]
    assert sum(layer["macs"][0] for layer in report["layers"].values()) == report["dense_macs"]


def test_projection_decisions_are_read_tolerantly():
    projection = {"mode": "band", "learned_flops_ratio": 0.62, "final_flops_ratio": 0.51, "target_flops_ratio": 0.5,
                  "flipped_groups": {"conv1": {"kept_before": 32, "kept_after": 16, "opened": [], "closed": [1]}},
                  "closed_blocks": ["layer1.0"], "reopened_blocks": [], "something_new": 3}
    made = decisions(projection)
    assert made["learned_ratio"] == 0.62 and made["final_ratio"] == 0.51
    assert made["groups_moved_by_projection"] == {"conv1": {"kept_before": 32, "kept_after": 16}}
    assert made["blocks_closed_by_projection"] == ["layer1.0"] and made["other"]["something_new"] == 3
