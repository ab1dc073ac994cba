"""Tensors that training builds for a model follow the model's device and dtype (issue 12, bug 1).

A CUDA run puts the model on the GPU before the methods measure it; a dummy input made on the CPU then
crashes the first forward. No GPU here, so the same mistake is caught with the `meta` device (no data,
shapes only: any CPU tensor meeting meta weights raises) and with float64 weights (a float32 input raises).
"""
import pytest
import torch

from training.arch import make_spec
from training.config import make_config
from training.flops import count_macs, layer_costs
from training.methods.activation_density import ActivationDensityMethod
from training.methods.base import RunContext
from training.methods.polarized import PolarizedMethod
from training.models import GateOptions, build_model
from training.resize import channel_axes

SPEC = make_spec("resnet20", 1, 10, (16, 16))


def record_input_placement(model: torch.nn.Module) -> list[tuple[torch.device, torch.dtype]]:
    """(device, dtype) of every input the model is called with, from here on."""
    seen = []
    model.register_forward_pre_hook(lambda _module, inputs: seen.append((inputs[0].device, inputs[0].dtype)))
    return seen


def test_cost_measurement_runs_on_a_model_on_the_meta_device():
    dense = build_model(SPEC)
    expected_macs, expected_axes = count_macs(dense), channel_axes(dense)
    on_meta = build_model(SPEC).to("meta")
    seen = record_input_placement(on_meta)
    assert count_macs(on_meta) == expected_macs
    assert channel_axes(on_meta) == expected_axes
    assert seen and all(device.type == "meta" for device, _ in seen)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_cost_measurement_feeds_the_model_its_own_dtype(gated):
    model = build_model(SPEC, GateOptions() if gated else None).double()
    seen = record_input_placement(model)
    reference = build_model(SPEC, GateOptions() if gated else None)
    assert [c.macs for c in layer_costs(model)] == [c.macs for c in layer_costs(reference)]
    assert seen and all(dtype == torch.float64 for _, dtype in seen)


def test_methods_prepare_a_model_that_lives_off_the_cpu():
    """What `loop._train` calls right after `model.to(device)`: the methods measure the placed model."""
    ctx = RunContext(torch.device("meta"), lambda: [], total_epochs=4, steps_per_epoch=1)
    density = ActivationDensityMethod(make_config({"method": "activation_density", "model": "resnet20"}), SPEC)
    plain = build_model(SPEC).to("meta")
    density.prepare(plain, ctx)
    assert density.macs == density.dense_macs
    density._detach()

    polarized = PolarizedMethod(make_config({"method": "polarized", "model": "resnet20"}), SPEC)
    gated = polarized.build_model().double()  # gates read their frozen flag with .item(): no meta here
    polarized.prepare(gated, ctx)
    assert polarized.dense_macs == count_macs(build_model(SPEC))
