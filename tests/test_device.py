"""Tensors that training builds for a model follow the model's device and dtype (issue 12, bug 1).

A CUDA run puts the model on the GPU before the methods measure or resize it; a dummy input made on the
CPU then crashes the first forward. No GPU here, so the same mistake is caught with the `meta` device
(no data, shapes only: any CPU tensor meeting meta weights raises) and with float64 weights (a float32
input raises).
"""
import pytest
import torch

from polarprune.training.config import make_config
from polarprune.training.flops import count_macs
from polarprune.training.graph import trace_network
from polarprune.training.methods.activation_density import ActivationDensityMethod
from polarprune.training.networks import NetworkInfo, build_network

INFO = NetworkInfo("resnet20", 1, 10, (16, 16))


def record_input_placement(model: torch.nn.Module) -> list[tuple[torch.device, torch.dtype]]:
    """(device, dtype) of every input the model is called with, from here on."""
    seen = []
    model.register_forward_pre_hook(lambda _module, inputs: seen.append((inputs[0].device, inputs[0].dtype)))
    return seen


@pytest.mark.parametrize("placement", ["meta", "float64"])
def test_cost_measurement_feeds_the_model_where_it_lives(placement):
    expected = count_macs(build_network(INFO), INFO.input_shape)
    model = build_network(INFO)
    model = model.to("meta") if placement == "meta" else model.double()
    seen = record_input_placement(model.get_submodule("stem.conv"))  # the trace runs a copy of the graph
    assert count_macs(model, INFO.input_shape) == expected
    device, dtype = seen[-1]
    assert (device.type, dtype) == (("meta", torch.float32) if placement == "meta" else ("cpu", torch.float64))


def test_activation_density_resizes_a_model_that_lives_off_the_cpu_dtype():
    """What `loop._train` hands the method after `model.to(device)`: resizing traces the placed model."""
    graph = trace_network(build_network(INFO), INFO.example_input())
    density = ActivationDensityMethod(make_config({"method": "activation_density", "model": "resnet20",
                                                   "round_to": 4}), graph)
    model = density.build_model().double()
    density.meter.positive = {u: torch.ones(w, dtype=torch.float64) for u, w in density.dense_widths.items()}
    density.meter.seen = {u: 4 for u in density.dense_widths}  # density 0.25 everywhere
    smaller = density.resize(model, epoch=1)
    assert smaller is not model
    assert {p.dtype for p in smaller.parameters()} == {torch.float64}  # cut layers keep the model's dtype
    assert count_macs(smaller, INFO.input_shape) < count_macs(model, INFO.input_shape)
