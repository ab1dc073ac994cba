"""MAC counting against the analytic count, and the gated count against the physical one."""
import torch

from polarprune.training.flops import count_macs
from polarprune.training.gating import cut, full_mask, kept_macs, mask_macs
from polarprune.training.graph import trace_network
from polarprune.training.mask import Mask
from polarprune.training.networks import NetworkInfo, build_network


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


def _network(model: str, in_channels: int, size: int):
    info = NetworkInfo(model, in_channels, 10, (size, size))
    network = build_network(info)
    return network, trace_network(network, info.example_input())


def test_resnet20_matches_the_analytic_count():
    network, _ = _network("resnet20", 3, 32)
    macs = count_macs(network, (3, 32, 32))
    assert macs == analytic_cifar_resnet_macs(3)
    assert abs(macs / 1e6 - 40.55) < 0.01  # the figure quoted in the literature


def test_resnet56_matches_the_analytic_count():
    network, _ = _network("resnet56", 3, 32)
    assert count_macs(network, (3, 32, 32)) == analytic_cifar_resnet_macs(9)


def test_gated_count_equals_the_physical_count_of_the_pruned_network():
    network, graph = _network("resnet20", 1, 28)
    closed = ["layer1.1", "layer2.0", "layer3.2"]
    gone = {g for b in closed for g in graph.groups_inside(b)}
    mask = Mask({g: list(range(0, grp.width, 2)) for g, grp in graph.prunable().items() if g not in gone}, closed)
    assert mask_macs(graph, mask) == count_macs(cut(graph, mask, graph.module), (1, 28, 28))
    assert mask_macs(graph, full_mask(graph)) == count_macs(network, (1, 28, 28))


def test_vgg_gated_count_couples_consecutive_layers():
    _, graph = _network("vgg16", 3, 32)
    kept = {g: list(range(grp.width // 2)) for g, grp in graph.prunable().items()}
    widths = {g: torch.tensor(float(len(k)), requires_grad=True) for g, k in kept.items()}
    value = kept_macs(graph, widths, {})
    assert int(value) == count_macs(cut(graph, Mask(kept), graph.module), (3, 32, 32))
    value.backward()
    # a middle layer's width scales its own conv and the next one: both show in its gradient
    assert all(w.grad > 0 for w in widths.values())
