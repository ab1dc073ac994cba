"""How one layer is cut: a smaller copy of a conv, batch norm or linear that keeps chosen channels.

Both stages use these: training shrinks a network while it trains (activation density), export cuts the
trained network down to its mask. `kept` is a LongTensor of channel indices. `CUTS` maps (module type,
layer kind from `training.graph`) to one cut taking the kept input and output indices (None: all).
"""
from __future__ import annotations

import torch
from torch import nn

from .mask import MaskError


def _like(tensor: torch.Tensor) -> dict:
    """Factory arguments for a cut module: it lives where the original's weights do, in their dtype."""
    return {"device": tensor.device, "dtype": tensor.dtype}


def _conv_with(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    cut = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias is not None, conv.padding_mode, **_like(weight))
    cut.weight.data.copy_(weight)
    if bias is not None:
        cut.bias.data.copy_(bias)
    return cut


def cut_conv_out(conv: nn.Conv2d, kept: torch.Tensor) -> nn.Conv2d:
    return _conv_with(conv, conv.weight.data[kept], None if conv.bias is None else conv.bias.data[kept])


def cut_conv_in(conv: nn.Conv2d, kept: torch.Tensor) -> nn.Conv2d:
    return _conv_with(conv, conv.weight.data[:, kept], None if conv.bias is None else conv.bias.data)


def cut_linear_in(linear: nn.Linear, kept: torch.Tensor) -> nn.Linear:
    cut = nn.Linear(len(kept), linear.out_features, linear.bias is not None, **_like(linear.weight))
    cut.weight.data.copy_(linear.weight.data[:, kept])
    if linear.bias is not None:
        cut.bias.data.copy_(linear.bias.data)
    return cut


def cut_depthwise(conv: nn.Conv2d, kept: torch.Tensor) -> nn.Conv2d:
    """A depthwise or grouped conv (as many outputs as inputs) keeps the same channels on both sides: whole
    groups, so `groups` shrinks and each kept group reads what it read."""
    width = conv.in_channels // conv.groups
    if len(kept) % width or any(int(kept[i]) // width != int(kept[i - i % width]) // width or
                                int(kept[i]) % width != i % width for i in range(len(kept))):
        raise MaskError(f"a grouped conv with {width} channels per group can only keep whole groups, got "
                         f"{kept.tolist()}")
    cut = nn.Conv2d(len(kept), len(kept), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    len(kept) // width, conv.bias is not None, conv.padding_mode, **_like(conv.weight))
    cut.weight.data.copy_(conv.weight.data[kept])
    if conv.bias is not None:
        cut.bias.data.copy_(conv.bias.data[kept])
    return cut


def cut_linear_out(linear: nn.Linear, kept: torch.Tensor) -> nn.Linear:
    cut = nn.Linear(linear.in_features, len(kept), linear.bias is not None, **_like(linear.weight))
    cut.weight.data.copy_(linear.weight.data[kept])
    if linear.bias is not None:
        cut.bias.data.copy_(linear.bias.data[kept])
    return cut


def cut_norm(norm: nn.modules.batchnorm._BatchNorm, kept: torch.Tensor):
    # num_batches_tracked is a scalar counter, not per channel
    kind = nn.BatchNorm1d if isinstance(norm, nn.BatchNorm1d) else nn.BatchNorm2d  # gated subclasses: plain
    reference = norm.running_mean if norm.running_mean is not None else norm.weight
    cut = kind(len(kept), norm.eps, norm.momentum, norm.affine, norm.track_running_stats, **_like(reference))
    for name, tensor in list(norm.named_parameters()) + list(norm.named_buffers()):
        getattr(cut, name).data.copy_(tensor.data if tensor.dim() == 0 else tensor.data[kept])
    return cut.train(norm.training)


def _both_sides(cut_out, cut_in):
    def cut(module, keep_in, keep_out):
        if keep_out is not None:
            module = cut_out(module, keep_out)
        return cut_in(module, keep_in) if keep_in is not None else module
    return cut


CUTS = {
    (nn.Conv2d, "conv"): _both_sides(cut_conv_out, cut_conv_in),
    (nn.Conv2d, "depthwise"): lambda conv, keep_in, _keep_out: cut_depthwise(conv, keep_in),
    (nn.Conv2d, "grouped"): lambda conv, keep_in, _keep_out: cut_depthwise(conv, keep_in),
    (nn.Linear, "linear"): _both_sides(cut_linear_out, cut_linear_in),
    (nn.BatchNorm1d, "norm"): lambda norm, _keep_in, keep_out: cut_norm(norm, keep_out),
    (nn.BatchNorm2d, "norm"): lambda norm, _keep_in, keep_out: cut_norm(norm, keep_out),
}
