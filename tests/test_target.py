"""The gates reach the target themselves: units of round_to, the constraint, moves that land near the band,
and the freeze that waits for the learned ratio to hold the band."""
import pytest
import torch

from polarprune.training.config import make_config
from polarprune.training.gates import TargetConstraint
from polarprune.training.gating import GatedNetwork
from polarprune.training.graph import trace_network
from polarprune.training.mask import unit_sizes
from polarprune.training.methods.base import RunContext
from polarprune.training.methods.polarized import PolarizedMethod
from polarprune.training.networks import NetworkInfo, build_network


@pytest.fixture(scope="module")
def graph():
    info = NetworkInfo("resnet20", 1, 10, (16, 16))
    return trace_network(build_network(info), info.example_input())


def test_constraint_pulls_harder_the_longer_the_target_is_missed():
    constraint = TargetConstraint(lr=1.0)
    ratio = torch.tensor(0.8, requires_grad=True)
    pulls = []
    for _ in range(3):
        ratio.grad = None
        constraint(ratio, 0.5).backward()
        pulls.append(float(ratio.grad))
    assert pulls[0] == 0 and pulls[1] < pulls[2]  # multipliers start at 0 and rise while above the target
    assert constraint.lambda1 == pytest.approx(0.9) and constraint.lambda2 == pytest.approx(0.27)
    for _ in range(10):  # below a target that still ramps: lambda1 falls to 0, not below
        constraint(torch.tensor(0.3), 0.5, ramping=True)
    assert constraint.lambda1 == 0
    below = torch.tensor(0.3, requires_grad=True)
    constraint(below, 0.5).backward()  # the target is final: an equality, lambda1 turns negative
    assert float(below.grad) < 0 and constraint.lambda1 < 0  # gradient descent raises the ratio: gates reopen
    for restart, expected in ((True, -0.05), (False, 2.95)):  # lambda1 built up above the target, then below it
        pulled = TargetConstraint(1.0, restart=restart)
        pulled.lambda1 = 3.0
        pulled(torch.tensor(0.45), 0.5, tolerance=0.02)
        assert pulled.lambda1 == pytest.approx(expected)  # restart: from 0, pulling up at once; else still closing
    holding = TargetConstraint(1.0)
    holding.lambda1 = 3.0
    holding(torch.tensor(0.49), 0.5, tolerance=0.02)  # below the target but in the band: no restart
    assert holding.lambda1 == pytest.approx(2.99)
    again = TargetConstraint(1.0)
    again.load_state_dict(constraint.state_dict())
    assert again.state_dict() == constraint.state_dict()


def test_gates_decide_deployable_units_and_narrow_groups_have_none(graph):
    gated = GatedNetwork(graph, round_to=16)
    stage1, stage3 = gated.channel_gate("layer1.0.conv1"), gated.channel_gate("layer3.0.conv1")
    assert stage1.fixed and not stage1.learns  # 16 wide: leaves only with its block
    assert stage3.sizes == unit_sizes(64, 16) == [16] * 4 and stage3.learns
    with torch.no_grad():
        for gate in gated.channel_gates.values():
            gate.score.copy_(torch.randn(gate.score.shape) - 1.0)  # most units closed
    gated(torch.randn(2, 1, 16, 16))
    widths, _ = gated.kept_widths()
    for name, width in widths.items():
        width = float(width)
        assert width % 16 == 0 and width >= 16, (name, width)  # at least one unit, whole units
    mask = gated.mask()
    for name, width in widths.items():
        assert len(mask.kept_channels[name]) == float(width.detach() if torch.is_tensor(width) else width)  # the mask is the network the step ran


def test_the_target_term_moves_only_gates_whose_flip_lands_near_the_band(graph):
    gated = GatedNetwork(graph, round_to=16)
    gated(torch.randn(2, 1, 16, 16))
    ratio = gated.kept_ratio()
    banded = gated.band_ratio(gated.macs_cost, target=float(ratio) - 0.03, tolerance=0.02)
    assert float(banded) == pytest.approx(float(ratio))
    banded.backward(retain_graph=True)
    block = gated.block_gate("layer1.0").score.grad.clone()  # a block is ~0.11 of the MACs: overshoots the band
    unit = gated.channel_gate("layer3.0.conv1").score.grad.clone()  # a unit of 16 of 64 channels: lands in it
    assert float(block.abs().sum()) == 0 and float(unit.abs().sum()) > 0
    exact = gated.kept_ratio()  # the same gradient as the ratio itself, restricted to the units chosen
    exact.backward()
    assert torch.allclose(gated.channel_gate("layer3.0.conv1").score.grad, 2 * unit)


def _pushed(gated, target, **kwargs):
    """Which gates the target term reaches at `target`: {gate name: per-unit gradient is non-zero}."""
    for gate in gated.gates().values():
        gate.score.grad = None
    gated(torch.randn(2, 1, 16, 16))
    gated.band_ratio(gated.macs_cost, target, tolerance=0.02, **kwargs).backward()
    return {name: (g.score.grad != 0).tolist() for name, g in gated.gates().items()
            if g.learns and g.score.grad is not None}


def _closed_state(graph, blocks):
    gated = GatedNetwork(graph, round_to=16)
    _close(gated, blocks)
    gated(torch.randn(2, 1, 16, 16))
    return gated, float(gated.kept_ratio().detach())


BLOCK = 0.1172  # a ResNet-20 block's share of the MACs at 16x16; a stage's first block (stride 2) is 0.0879


def test_once_the_target_is_final_only_flips_that_land_in_the_band_are_pushed(graph):
    gated, now = _closed_state(graph, ["layer1.1", "layer3.2"])
    target = now - BLOCK / 2 + 0.005  # stage-2 units land in the band; stage-3 units and first blocks land nearer
    ramping = _pushed(gated, target)
    assert any(ramping["block_gates.layer2__0"]) and any(ramping["channel_gates.layer3__1__conv1"])
    final = _pushed(gated, target, final=True)
    pushed = {k for k, v in final.items() if any(v)}
    assert pushed == {f"channel_gates.layer2__{i}__conv1" for i in range(3)}


def test_when_no_single_flip_lands_nearer_the_term_carries_the_ratio_across_the_target(graph):
    closed = ["layer1.1", "layer2.1", "layer3.1"]  # 0.648 under a 0.7 target: the stall of the seed studies
    gated, now = _closed_state(graph, closed)
    target = now + 0.45 * BLOCK  # reopening a block lands past the target, further than now; units are open
    assert not any(any(v) for v in _pushed(gated, target).values())  # the nearer-only rule: stuck
    final = _pushed(gated, target, final=True)
    pushed = {k for k, v in final.items() if any(v)}
    assert pushed == {f"block_gates.{b.replace('.', '__')}" for b in closed}


def test_within_the_band_the_term_holds_the_gates_its_push_keeps(graph):
    gated, now = _closed_state(graph, ["layer1.1", "layer3.2"])
    assert not any(any(v) for v in _pushed(gated, now, final=True).values())  # no flip stays in the band
    held = _pushed(gated, now, final=True, hold=3.0)  # lambda1 > 0: the closed gates are held closed
    assert {k for k, v in held.items() if any(v)} == {"block_gates.layer1__1", "block_gates.layer3__2"}
    assert float(gated.block_gate("layer1.1").score.grad) > 0  # descent lowers the score: stays closed


def _method(graph, **overrides):
    cfg = make_config({"method": "polarized", "model": "resnet20", "round_to": 16, "epochs": 1,
                       "ramp_fraction": 0.4, "freeze_fraction": 0.8, "freeze_patience": 0.05, "flops_tolerance": 0.02,
                       **overrides})
    method = PolarizedMethod(cfg, graph)
    return method, method.build_model(), RunContext(torch.device("cpu"), lambda: [], 1, 100)


def _close(gated, blocks):
    with torch.no_grad():
        for name in blocks:
            gated.block_gate(name).score.fill_(-3.0)


def test_the_mask_freezes_once_the_learned_ratio_held_the_band(graph):
    method, gated, ctx = _method(graph)
    _close(gated, ["layer1.0", "layer2.0", "layer3.0", "layer1.1"])
    learned = method.learned_ratio(gated, ctx)
    method.cfg.target_flops_ratio = learned  # a target the gates hold exactly
    for step in range(30, 40):  # before the target is final: no freeze
        assert method.between_steps(gated, step / 100, ctx) is gated and method.mask is None
    for step in range(40, 44):  # in band for 4 steps: not yet the 5 the patience asks
        method.between_steps(gated, step / 100, ctx)
    assert method.mask is None
    cut = method.between_steps(gated, 0.44, ctx)
    assert method.mask is not None and cut is not gated  # frozen and cut at a step, not an epoch
    assert method.freeze_point["reason"] == "in band" and method.freeze_point["step"] == 44
    assert method.projection["flipped_flops_share"] == 0 and method.projection["learned_flops_ratio"] == pytest.approx(learned)


def test_gates_that_miss_the_band_freeze_at_the_latest_and_the_projection_reports_its_flips(graph):
    method, gated, ctx = _method(graph, target_flops_ratio=0.5)
    for step in range(40, 80):  # every gate open: far above the band
        method.between_steps(gated, step / 100, ctx)
    assert method.mask is None
    method.between_steps(gated, 0.8, ctx)
    assert method.freeze_point["reason"] == "latest (freeze_fraction)"
    report = method.projection
    assert report["learned_flops_ratio"] == pytest.approx(1.0)
    assert abs(report["final_flops_ratio"] - 0.5) <= 0.02
    assert report["flipped_flops_share"] == pytest.approx(1.0 - report["final_flops_ratio"])
    shares = report["closed_flops_share"]
    assert shares["blocks"] + shares["channels"] == pytest.approx(1.0 - report["final_flops_ratio"])


@pytest.mark.parametrize("progress", [0.3, 0.6])  # the target ramping, then final
def test_the_api_penalty_is_the_training_methods_gate_loss(progress):
    from polarprune.training.api import polarize
    info = NetworkInfo("resnet20", 1, 10, (16, 16))
    network = build_network(info)
    images = torch.randn(4, 1, 16, 16)
    gated = polarize(network, images, target_flops=0.5, ramp_fraction=0.4)
    method, twin, _ = _method(gated.graph, target_flops_ratio=0.5)
    twin.load_state_dict(gated.state_dict())
    _close(gated, ["layer1.0"])
    _close(twin, ["layer1.0"])
    losses, grads = [], []
    for net, loss_of in ((gated, lambda: gated.penalty(progress)), (twin, lambda: method.extra_loss(twin, progress)[0])):
        for _ in range(3):  # the multipliers rise between calls alike
            net.zero_grad()
            net(images)
            loss = loss_of()
            loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([g.score.grad.reshape(-1) for g in net.gates().values() if g.score.grad is not None]))
    assert losses[0] == pytest.approx(losses[1]) and losses[0] != 0
    assert torch.allclose(grads[0], grads[1])


def test_out_of_the_band_the_polarizer_spares_the_gates_the_target_term_moves(graph):
    from polarprune.training.gates import gate_loss
    grads = {}
    for release in (True, False):
        gated = GatedNetwork(graph, round_to=16)
        _close(gated, ["layer1.0", "layer2.0", "layer3.0", "layer1.1"])
        with torch.no_grad():
            for gate in gated.channel_gates.values():
                gate.score.uniform_(-2.5, 2.5, generator=torch.Generator().manual_seed(0))
        gated(torch.randn(2, 1, 16, 16))
        target = float(gated.kept_ratio()) + 0.05  # the ratio lies under the band
        # the target term weighs 0: what reaches the scores is the polarizer's alone
        loss, kept = gate_loss(gated, gated.macs_cost, target, 0.02, 0.0, 1.0, 0.0, release_pulled=release)
        loss.backward()
        pulled = {name: g.pulled.clone() for name, g in gated.gates().items() if g.pulled is not None}
        grads[release] = {name: g.score.grad.clone() for name, g in gated.gates().items() if g.score.grad is not None}
    assert any(p.sum() > 0 for p in pulled.values()) and any((1 - p).sum() > 0 for p in pulled.values())
    for name, moved in pulled.items():
        assert torch.all(grads[True][name][moved > 0] == 0)  # spared: the target term moves these
        assert torch.equal(grads[True][name][moved == 0], grads[False][name][moved == 0])  # the rest still held
    assert any(grads[False][name][moved > 0].abs().sum() > 0 for name, moved in pulled.items())
    # during the ramp, or in the band, nothing is spared
    gated.zero_grad()
    gated(torch.randn(2, 1, 16, 16))
    ramp_loss, _ = gate_loss(gated, gated.macs_cost, kept + 0.05, 0.02, 0.0, 1.0, 0.0, ramping=True)
    ramp_loss.backward()
    assert all(torch.equal(g.score.grad, grads[False][n]) for n, g in gated.gates().items() if g.score.grad is not None)
