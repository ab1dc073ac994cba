"""The built-in networks, built from an architecture spec (`training.arch`): plain modules like any user's.

Module paths follow the spec names ("layer2.0.conv1", "features.3.conv"). Gates are not part of them: the
polarized method inserts them from a trace (`training.gating`), as it does into a user's network.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Spec, validate_spec


def conv_bn(in_ch: int, out_ch: int, stride: int = 1, kernel: int = 3) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(out_ch)


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by the stride and append zero channels. No weights."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))


class ConvShortcut(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv, self.bn = conv_bn(in_ch, out_ch, stride, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def make_shortcut(kind: str, in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if kind == "identity":
        return nn.Identity()
    return PadShortcut(in_ch, out_ch, stride) if kind == "pad" else ConvShortcut(in_ch, out_ch, stride)


class BasicBlock(nn.Module):
    """relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, block: dict):
        super().__init__()
        self.shortcut = make_shortcut(block["shortcut"], block["in"], block["out"], block["stride"])
        self.conv1, self.bn1 = conv_bn(block["in"], block["mid"], block["stride"])
        self.conv2, self.bn2 = conv_bn(block["mid"], block["out"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(out)))


class ConvLayer(nn.Module):
    """VGG unit: conv-bn-relu, optional 2x2 max-pool (ceil mode keeps 28 px inputs alive through five pools)."""

    def __init__(self, layer: dict):
        super().__init__()
        self.conv, self.bn = conv_bn(layer["in"], layer["out"])
        self.pool = nn.MaxPool2d(2, ceil_mode=True) if layer["pool_after"] else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.bn(self.conv(x))))


class Stem(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv, self.bn = conv_bn(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _register(root: nn.Module, dotted_name: str, module: nn.Module) -> None:
    """Place `module` at path `dotted_name` ("layer1.0") through nested ModuleDicts."""
    *parents, leaf = dotted_name.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.ModuleDict())
        node = getattr(node, part)
    node.add_module(leaf, module)


class SpecNet(nn.Module):
    """A network defined entirely by its spec. `spec` is kept on the module for export and saving."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = validate_spec(spec)
        units: list[tuple[str, nn.Module]] = []
        if spec["family"] == "resnet":
            self.stem = Stem(spec["in_channels"], spec["stem"]["out"])
            for block in spec["blocks"]:
                units.append((block["name"], BasicBlock(block)))
            width = spec["blocks"][-1]["out"] if spec["blocks"] else spec["stem"]["out"]
        else:
            self.stem = nn.Identity()
            for layer in spec["layers"]:
                units.append((layer["name"], ConvLayer(layer)))
            width = spec["layers"][-1]["out"]
        for name, module in units:
            _register(self, name, module)
        self._units = units  # plain list: forward order; the modules are registered above
        self.fc = nn.Linear(width, spec["num_classes"])
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _, unit in self._units:
            x = unit(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def build_model(spec: Spec) -> SpecNet:
    return SpecNet(spec)


class Attention(nn.Module):
    """timm's ViT attention: one packed q/k/v projection split into heads, scaled dot products per head,
    heads merged into `proj`. `fused`: F.scaled_dot_product_attention; else softmax(q kᵀ · scale) v written out."""

    def __init__(self, dim: int, heads: int, fused: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim {dim} is not a multiple of heads {heads}")
        self.num_heads, self.head_dim, self.fused = heads, dim // heads, fused
        self.scale = self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: an attention branch and an MLP branch, each added to the residual stream (each a block gate)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, fused: bool = True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small timm-style vision transformer: patch embedding by a strided conv, a class token and learned
    position embeddings, `depth` pre-norm blocks, the class token's features (`pool="cls"`) or the tokens'
    mean (`pool="mean"`) classified. Defaults: patch 4
    (28x28 -> 49 patches), dim 192, depth 6, 3 heads of 64, MLP ratio 4 (the class token only with "cls"). Use it as
    `model: polarprune.training.models:ViT` with `model_args` (in_channels, num_classes, image_size)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, patch: int = 4,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0, fused: bool = True,
                 pool: str = "cls"):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"ViT: image_size {image_size} is not a multiple of patch {patch}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"ViT: pool must be 'cls' or 'mean', got {pool!r}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + (pool == "cls"), dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio, fused) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))
