"""Architecture specs of the built-in networks: plain JSON-able dicts (`training.models.build_model`).

What can shrink is not written here: the trace of the built network says it (`training.graph`), as it
does for a user's network.

Two families:
  resnet: stem conv -> basic blocks -> global pool -> linear.
    block = {"name", "in", "mid", "out", "stride", "shortcut": "identity"|"pad"|"conv"}
    `mid` is the inner width (conv1 out = conv2 in). "pad" is He et al.'s option A (subsample + zero
    channels, no weights).
  vgg: conv-bn-relu layers (each prunable) with max-pools between -> global pool -> linear.
    layer = {"name", "in", "out", "pool_after": bool}
"""
from __future__ import annotations

from typing import Any

from .errors import TrainingError

Spec = dict[str, Any]

CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}
# He et al.'s option B: the same CIFAR ResNets with 1x1-conv projections where the shape changes, so
# every residual stream has weights that can shrink (the search space `make compare` shares with
# Torch-Pruning, which cannot cut through option A's zero padding)
PROJECTION_SUFFIX = "_proj"
VGG_PLANS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
MODEL_NAMES = (*CIFAR_RESNET_DEPTHS, *(name + PROJECTION_SUFFIX for name in CIFAR_RESNET_DEPTHS), "resnet18",
               *VGG_PLANS)


class SpecError(TrainingError, ValueError):
    """A spec or mask that does not describe a buildable network."""


def check_header(document: Any, path: Any, kind: str, fmt: str, version: int, keys: tuple[str, ...],
                 error: type[Exception]) -> None:
    """The envelope every artifact file carries: a dict with our format tag, a known version, its keys."""
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise error(f"{path}: not a polarprune {kind} (format field is not {fmt!r})")
    if document.get("version") != version:
        raise error(f"{path}: {kind} version {document.get('version')} not supported (expected {version})")
    for key in keys:
        if key not in document:
            raise error(f"{path}: {kind} is missing {key!r}")


def _resnet_spec(stage_widths, blocks_per_stage, downsample_shortcut, in_channels, num_classes, input_size):
    blocks, width_in = [], stage_widths[0]
    for stage, (width, count) in enumerate(zip(stage_widths, blocks_per_stage)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            shortcut = "identity" if stride == 1 and width_in == width else downsample_shortcut
            blocks.append({"name": f"layer{stage + 1}.{index}", "in": width_in, "mid": width, "out": width,
                           "stride": stride, "shortcut": shortcut})
            width_in = width
    return {"family": "resnet", "in_channels": in_channels, "num_classes": num_classes,
            "input_size": list(input_size), "stem": {"out": stage_widths[0]}, "blocks": blocks}


def make_spec(model: str, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> Spec:
    """Dense spec for a named model; input channels and classes follow the dataset."""
    cifar_name = model.removesuffix(PROJECTION_SUFFIX)
    if cifar_name in CIFAR_RESNET_DEPTHS:  # He et al. 2016, CIFAR variant: 16/32/64 widths, option A or B
        shortcut = "conv" if model.endswith(PROJECTION_SUFFIX) else "pad"
        depth = CIFAR_RESNET_DEPTHS[cifar_name]
        return _resnet_spec([16, 32, 64], [depth] * 3, shortcut, in_channels, num_classes, input_size)
    if model == "resnet18":  # 3x3 stem without max-pool, as usual for 32-64 px inputs; projection shortcuts
        return _resnet_spec([64, 128, 256, 512], [2, 2, 2, 2], "conv", in_channels, num_classes, input_size)
    if model in VGG_PLANS:
        layers, width_in = [], in_channels
        for item in VGG_PLANS[model]:
            if item == "M":
                layers[-1]["pool_after"] = True
                continue
            layers.append({"name": f"features.{len(layers)}", "in": width_in, "out": item, "pool_after": False})
            width_in = item
        return {"family": "vgg", "in_channels": in_channels, "num_classes": num_classes,
                "input_size": list(input_size), "layers": layers}
    raise SpecError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")


def validate_spec(spec: Any) -> Spec:
    """Check that a spec loaded from disk is self-consistent; raise SpecError naming the first problem."""
    if not isinstance(spec, dict) or spec.get("family") not in ("resnet", "vgg"):
        raise SpecError("spec must be a dict with family 'resnet' or 'vgg'")
    for key in ("in_channels", "num_classes", "input_size"):
        if key not in spec:
            raise SpecError(f"spec is missing {key!r}")
    width = spec["in_channels"]
    if spec["family"] == "resnet":
        width = spec["stem"]["out"]
        for block in spec["blocks"]:
            if block["in"] != width:
                raise SpecError(f"block {block['name']}: input width {block['in']} != previous output {width}")
            if block["mid"] < 1:
                raise SpecError(f"block {block['name']}: no inner channels")
            if block["shortcut"] not in ("identity", "pad", "conv"):
                raise SpecError(f"block {block['name']}: unknown shortcut {block['shortcut']!r}")
            if block["shortcut"] == "identity" and (block["stride"] != 1 or block["in"] != block["out"]):
                raise SpecError(f"block {block['name']}: identity shortcut cannot change shape")
            width = block["out"]
    else:
        for layer in spec["layers"]:
            if layer["in"] != width or layer["out"] < 1:
                raise SpecError(f"layer {layer['name']}: widths {layer['in']}->{layer['out']} do not chain")
            width = layer["out"]
    return spec
