"""How one layer is cut: a smaller copy of a conv, batch norm or linear that keeps chosen channels.

Both stages use these: training shrinks a network while it trains (activation density), export cuts the
trained network down to its mask (`export.surgery`). `kept` is a LongTensor of channel indices.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_with(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    cut = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias is not None, conv.padding_mode)
    cut.weight.data.copy_(weight)
    if bias is not None:
        cut.bias.data.copy_(bias)
    return cut


def cut_conv_out(conv: nn.Conv2d, kept: torch.Tensor) -> nn.Conv2d:
    return _conv_with(conv, conv.weight.data[kept], None if conv.bias is None else conv.bias.data[kept])


def cut_conv_in(conv: nn.Conv2d, kept: torch.Tensor) -> nn.Conv2d:
    return _conv_with(conv, conv.weight.data[:, kept], None if conv.bias is None else conv.bias.data)


def cut_batchnorm(bn: nn.BatchNorm2d, kept: torch.Tensor) -> nn.BatchNorm2d:
    cut = nn.BatchNorm2d(len(kept), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for name, tensor in list(bn.named_parameters()) + list(bn.named_buffers()):
        # num_batches_tracked is a scalar counter, not per channel
        getattr(cut, name).data.copy_(tensor.data if tensor.dim() == 0 else tensor.data[kept])
    return cut.train(bn.training)


def cut_linear_in(linear: nn.Linear, kept: torch.Tensor) -> nn.Linear:
    cut = nn.Linear(len(kept), linear.out_features, linear.bias is not None)
    cut.weight.data.copy_(linear.weight.data[:, kept])
    if linear.bias is not None:
        cut.bias.data.copy_(linear.bias.data)
    return cut
