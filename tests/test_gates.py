"""Gates: hard forward values, straight-through gradients, polarization, gradients reach every parameter."""
import copy

import pytest
import torch

from polarprune.training.gates import Gate, kept_target, polarization, polarizer, straight_through
from polarprune.training.gating import GatedBatchNorm2d, GatedNetwork, gate_channels
from polarprune.training.graph import trace_network
from polarprune.training.networks import NetworkInfo, build_network


def test_straight_through_forward_is_hard_and_backward_is_sigmoid():
    logits = torch.tensor([-2.0, -0.1, 0.3, 4.0], requires_grad=True)
    values, probs = straight_through(logits)
    assert values.tolist() == [0.0, 0.0, 1.0, 1.0]
    values.backward(torch.ones(4))
    sig = torch.sigmoid(logits.detach())
    assert torch.allclose(logits.grad, sig * (1 - sig))


def test_min_open_keeps_the_highest_scores():
    values, _ = straight_through(torch.tensor([-3.0, -1.0, -2.0]), min_open=1)
    assert values.tolist() == [0.0, 1.0, 0.0]
    batch, _ = straight_through(torch.tensor([[-3.0, -1.0], [-1.0, -3.0]]), min_open=1)
    assert batch.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_frozen_gate_is_constant_and_passes_no_gradient():
    gate = Gate([1] * 4, init_score=1.0)
    gate.freeze(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    values = gate()
    assert values.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert not values.requires_grad


def test_a_gate_loaded_frozen_stops_training_like_one_frozen_in_place():
    frozen = Gate([1] * 4, dynamic_in=3)
    frozen.freeze(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    loaded = Gate([1] * 4, dynamic_in=3)
    loaded.load_state_dict(frozen.state_dict())
    assert loaded.is_frozen and torch.equal(loaded(), frozen())
    assert not any(p.requires_grad for p in loaded.parameters())  # a resumed run must not wait for them
    open_gate = Gate([1] * 4)
    open_gate.load_state_dict(Gate([1] * 4).state_dict())
    assert open_gate.score.requires_grad


def test_polarization_drives_gates_to_zero_or_one():
    torch.manual_seed(0)
    scores = torch.nn.Parameter(torch.randn(64) * 0.1)
    optimizer = torch.optim.Adam([scores], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        polarization(torch.sigmoid(scores), t=0.2).backward()
        optimizer.step()
    probs = torch.sigmoid(scores.detach())
    assert ((probs < 0.05) | (probs > 0.95)).all(), probs
    assert 0 < (probs > 0.5).sum() < 64  # two groups, not a collapse to one side


def _polarize_against_a_target(center: str, target: float = 0.3) -> torch.Tensor:
    """The method's pairing on a toy: the polarizer splits, a kept-share term (like the FLOPs term) sets
    the split point."""
    torch.manual_seed(1)
    scores = torch.nn.Parameter(torch.randn(100) * 0.1 + 1.0)
    optimizer = torch.optim.Adam([scores], lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        values, probs = straight_through(scores)
        loss = polarization(probs, t=0.0, center=center) + 5.0 * (values.mean() - target).abs()
        loss.backward()
        optimizer.step()
    return scores.detach()


def test_threshold_centred_polarizer_settles_decided_gates_on_the_target():
    scores = _polarize_against_a_target("threshold")
    probs = torch.sigmoid(scores)
    assert abs(float((scores > 0).float().mean()) - 0.3) <= 0.03
    assert float(((probs < 0.1) | (probs > 0.9)).float().mean()) > 0.95


def test_mean_centred_polarizer_leaves_gates_at_the_boundary():
    # Why the default centre is the threshold: Zhuang's mean centre splits at mean(p) = 0.3, so closed
    # gates between 0.3 and 0.5 are pushed open while the target pushes them shut.
    probs = torch.sigmoid(_polarize_against_a_target("mean"))
    assert float(((probs > 0.3) & (probs < 0.7)).float().mean()) > 0.3


def _gated(model: str, in_channels: int, dynamic: bool = False) -> GatedNetwork:
    info = NetworkInfo(model, in_channels, 10, (16, 16))
    return GatedNetwork(trace_network(build_network(info), info.example_input()), dynamic=dynamic)


def _all_parameters_get_gradients(model: GatedNetwork, shape):
    model.train()
    model(torch.randn(4, *shape)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    gate_grads = [g.score.grad.abs().sum() for g in model.gates().values()]
    assert gate_grads and all(g > 0 for g in gate_grads)


def test_every_parameter_of_a_gated_resnet_receives_a_gradient():
    _all_parameters_get_gradients(_gated("resnet20", 1), (1, 16, 16))


def test_every_parameter_of_a_dynamic_gated_resnet_receives_a_gradient():
    torch.manual_seed(0)
    model = _gated("resnet20", 3, dynamic=True)
    for gate in model.gates().values():  # zero-initialised heads get a gradient only through real inputs
        torch.nn.init.normal_(gate.head.weight, std=0.1)
    _all_parameters_get_gradients(model, (3, 16, 16))


def test_every_parameter_of_a_gated_vgg_receives_a_gradient():
    _all_parameters_get_gradients(_gated("vgg16", 3), (3, 16, 16))


def test_gates_evaluated_together_give_each_gates_own_values_and_gradients():
    # GatedNetwork.forward evaluates its static gates in one call (training.gates.StaticGates); the traced
    # network alone (gated.network) has every gate evaluate itself at each of its points.
    torch.manual_seed(0)
    info = NetworkInfo("resnet20", 1, 10, (16, 16))
    together = GatedNetwork(trace_network(build_network(info), info.example_input()), round_to=4, score_clamp=3.0)
    with torch.no_grad():
        for gate in together.gates().values():
            gate.score.copy_(torch.randn(gate.score.shape) * 2)  # some open, some closed, some past the clamp
        together.channel_gate("layer3.0.conv1").score.fill_(-5.0)  # clamped to a tie: min_open picks a unit
    alone = copy.deepcopy(together)
    x = torch.randn(4, 1, 16, 16)
    results = []
    for model, forward in ((together, together), (alone, alone.network)):
        out = forward(x)
        loss = out.logsumexp(1).sum() + 3 * model.kept_ratio() + polarizer(*model.gate_probs(), t=0.1)
        loss.backward()
        results.append((out.detach(), {n: p.detach().clone() for n, p in model.named_parameters()},
                        {n: p.grad for n, p in model.named_parameters()},
                        {n: g.last_values.detach() for n, g in model.gates().items() if g.last_values is not None}))
    assert together.static_gates is not None and alone.static_gates is None
    assert int(results[0][3]["channel_gates.layer3__0__conv1"].sum()) == 1
    (out, params, grads, values), (out_alone, params_alone, grads_alone, values_alone) = results
    assert torch.equal(out, out_alone)
    for mine, theirs in ((params, params_alone), (grads, grads_alone), (values, values_alone)):
        assert mine.keys() == theirs.keys()
        differing = [n for n in mine if not torch.equal(mine[n], theirs[n])]
        assert not differing, differing


def test_kept_target_ramps_after_warm_up():
    assert kept_target(0.05, 0.5, 0.1, 0.5) == 1.0
    assert kept_target(0.3, 0.5, 0.1, 0.5) == pytest.approx(0.75)
    assert kept_target(0.9, 0.5, 0.1, 0.5) == 0.5


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("width", [6, 1])
def test_gated_batchnorm_equals_batchnorm_times_gate(momentum, width):
    torch.manual_seed(0)
    plain, gated = torch.nn.BatchNorm2d(6, momentum=momentum), GatedBatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    gated.load_state_dict(plain.state_dict())
    scores = (torch.tensor([1.0, -1.0, 2.0, -0.5, 0.3, -2.0]) if width == 6 else torch.tensor([-1.0]))
    for step in range(3):
        x = torch.randn(4, 6, 5, 5, requires_grad=True)
        upstream = torch.randn(4, 6, 5, 5)
        results = []
        for module, fused in ((gated, True), (plain, False)):
            s = scores.clone().requires_grad_(True)
            values, _ = straight_through(s)
            out = module(x, values) if fused else gate_channels(module(x), values)
            x.grad = None
            module.zero_grad()
            out.backward(upstream)
            grads = (x.grad, module.weight.grad, module.bias.grad, s.grad)
            results.append((out.detach(), *(g.clone() for g in grads)))
        for fused_value, plain_value in zip(*results):
            assert torch.allclose(fused_value, plain_value, rtol=1e-5, atol=1e-6)
        assert torch.equal(results[0][0], results[1][0])  # forward values exactly
        for key, value in plain.state_dict().items():  # running stats and num_batches_tracked
            assert torch.equal(gated.state_dict()[key], value), key
    assert results[0][4].abs().sum() > 0  # a closed block gate still gets the task gradient
    plain.eval(), gated.eval()
    x = torch.randn(2, 6, 5, 5)
    values = (scores > 0).float()
    assert torch.equal(gated(x, values), gate_channels(plain(x), values))
