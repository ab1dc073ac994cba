"""MAC counting against the analytic count, and the gated count against the physical one."""
import torch

from training.arch import make_spec, prune_spec
from training.flops import count_macs, gated_macs, layer_costs
from training.models import GateOptions, build_model


def analytic_cifar_resnet_macs(blocks_per_stage: int, hw: int = 32, in_ch: int = 3, classes: int = 10) -> int:
    """He et al.'s CIFAR ResNet with option-A shortcuts: 3x3 convs only, plus the classifier."""
    total = in_ch * 16 * 9 * hw * hw
    width_in = 16
    for stage, width in enumerate((16, 32, 64)):
        size = hw >> stage
        for index in range(blocks_per_stage):
            total += width_in * width * 9 * size * size + width * width * 9 * size * size
            width_in = width
    return total + 64 * classes


def test_resnet20_matches_the_analytic_count():
    macs = count_macs(build_model(make_spec("resnet20", 3, 10, (32, 32))))
    assert macs == analytic_cifar_resnet_macs(3)
    assert abs(macs / 1e6 - 40.55) < 0.01  # the figure quoted in the literature


def test_resnet56_matches_the_analytic_count():
    assert count_macs(build_model(make_spec("resnet56", 3, 10, (32, 32)))) == analytic_cifar_resnet_macs(9)


def test_gated_count_equals_the_physical_count_of_the_pruned_network():
    spec = make_spec("resnet20", 1, 10, (28, 28))
    costs = layer_costs(build_model(spec, GateOptions()))
    kept = {b["name"]: list(range(0, b["mid"], 2)) for b in spec["blocks"]}
    closed = ["layer1.1", "layer2.0", "layer3.2"]
    widths = {n: float(len(k)) for n, k in kept.items()}
    blocks = {b["name"]: float(b["name"] not in closed) for b in spec["blocks"]}
    pruned = build_model(prune_spec(spec, {n: k for n, k in kept.items() if n not in closed}, closed))
    assert gated_macs(costs, widths, blocks) == count_macs(pruned)


def test_vgg_gated_count_couples_consecutive_layers():
    spec = make_spec("vgg16", 3, 10, (32, 32))
    costs = layer_costs(build_model(spec, GateOptions()))
    kept = {layer["name"]: list(range(layer["out"] // 2)) for layer in spec["layers"]}
    widths = {n: torch.tensor(float(len(k)), requires_grad=True) for n, k in kept.items()}
    value = gated_macs(costs, widths, {})
    assert int(value) == count_macs(build_model(prune_spec(spec, kept, [])))
    value.backward()
    # a middle layer's width scales its own conv and the next one: both show in its gradient
    assert all(w.grad > 0 for w in widths.values())
