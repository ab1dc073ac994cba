"""Architecture specs: plain JSON-able dicts that describe a network completely.

The same builder (`training.models.build_model`) turns a dense spec or a pruned spec into a module, so a
pruned network is always loaded from its own spec and never hits "size mismatch".

Two families:
  resnet: stem conv -> basic blocks -> global pool -> linear.
    block = {"name", "in", "mid", "out", "stride", "shortcut": "identity"|"pad"|"conv", "closed": bool}
    `mid` is the inner width (conv1 out = conv2 in): the prunable channels. `closed` drops the residual
    branch; the shortcut stays. "pad" is He et al.'s option A (subsample + zero channels, no weights).
  vgg: conv-bn-relu layers (each prunable) with max-pools between -> global pool -> linear.
    layer = {"name", "in", "out", "pool_after": bool}
"""
from __future__ import annotations

import copy
from typing import Any

from .errors import TrainingError

Spec = dict[str, Any]

CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}
VGG_PLANS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
MODEL_NAMES = (*CIFAR_RESNET_DEPTHS, "resnet18", *VGG_PLANS)


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
                           "stride": stride, "shortcut": shortcut, "closed": False})
            width_in = width
    return {"family": "resnet", "in_channels": in_channels, "num_classes": num_classes,
            "input_size": list(input_size), "stem": {"out": stage_widths[0]}, "blocks": blocks}


def make_spec(model: str, in_channels: int, num_classes: int, input_size: tuple[int, int]) -> Spec:
    """Dense spec for a named model; input channels and classes follow the dataset."""
    if model in CIFAR_RESNET_DEPTHS:  # He et al. 2016, CIFAR variant: 16/32/64 widths, option-A shortcuts
        depth = CIFAR_RESNET_DEPTHS[model]
        return _resnet_spec([16, 32, 64], [depth] * 3, "pad", in_channels, num_classes, input_size)
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


def prunable_layers(spec: Spec) -> dict[str, int]:
    """Name -> width of every channel-gated layer (resnet: block inner width; vgg: conv output)."""
    if spec["family"] == "resnet":
        return {b["name"]: b["mid"] for b in spec["blocks"]}
    if spec["family"] == "vgg":
        return {layer["name"]: layer["out"] for layer in spec["layers"]}
    raise SpecError(f"unknown family {spec.get('family')!r}")


def residual_blocks(spec: Spec) -> list[str]:
    """Names of block-gated units (residual blocks); empty for plain networks."""
    return [b["name"] for b in spec["blocks"]] if spec["family"] == "resnet" else []


def prune_spec(spec: Spec, kept_channels: dict[str, list[int]], closed_blocks: list[str]) -> Spec:
    """The spec of the physically smaller network: kept widths, closed blocks marked."""
    layers = prunable_layers(spec)
    unknown = (set(kept_channels) - set(layers)) | (set(closed_blocks) - set(residual_blocks(spec)))
    if unknown:
        raise SpecError(f"mask names layers the model does not have: {sorted(unknown)}")
    for name, width in layers.items():
        kept = kept_channels.get(name)
        if kept is None:
            if name in closed_blocks:
                continue
            raise SpecError(f"mask has no kept channels for layer {name}")
        if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= width:
            raise SpecError(f"layer {name}: kept channel indices must be distinct, in [0, {width}) and non-empty")
    pruned = copy.deepcopy(spec)
    if spec["family"] == "resnet":
        for block in pruned["blocks"]:
            block["closed"] = block["name"] in closed_blocks
            block["mid"] = 0 if block["closed"] else len(kept_channels[block["name"]])
    else:
        widths = {name: len(kept) for name, kept in kept_channels.items()}
        width_in = spec["in_channels"]
        for layer in pruned["layers"]:
            layer["in"], layer["out"] = width_in, widths[layer["name"]]
            width_in = layer["out"]
    return pruned


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
            if not block["closed"] and block["mid"] < 1:
                raise SpecError(f"block {block['name']}: open block with no inner channels")
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
