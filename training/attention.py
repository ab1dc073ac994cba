"""nn.MultiheadAttention as layers the cuts know: the packed in-projection as a Linear, heads split and
merged by reshapes, `F.scaled_dot_product_attention` between. `split_attention` swaps it in (on a copy)
wherever the module is called as batch-first self-attention without masks and its weights are not read;
it computes what nn.MultiheadAttention computes. Any other use stays one module, pinned with the reason.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


class SelfAttention(nn.Module):
    """nn.MultiheadAttention(batch_first=True) called as `attn(x, x, x)`, in the layers a cut shrinks: the
    state dict holds `in_proj.weight` where the module held `in_proj_weight`."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        dim, like = attention.embed_dim, {"device": attention.in_proj_weight.device,
                                          "dtype": attention.in_proj_weight.dtype}
        self.num_heads, self.head_dim, self.dropout = attention.num_heads, attention.head_dim, attention.dropout
        self.in_proj = nn.Linear(dim, 3 * dim, bias=attention.in_proj_bias is not None, **like)
        self.out_proj = nn.Linear(dim, dim, bias=attention.out_proj.bias is not None, **like)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.in_proj_bias is not None:
                self.in_proj.bias.copy_(attention.in_proj_bias)
            if attention.out_proj.bias is not None:
                self.out_proj.bias.copy_(attention.out_proj.bias)
        self.train(attention.training)

    def forward(self, query: torch.Tensor, key=None, value=None, **unused) -> tuple[torch.Tensor, None]:
        batch, tokens, _ = query.shape
        qkv = self.in_proj(query).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)), None


def _splittable(attention: nn.MultiheadAttention, node: fx.Node) -> bool:
    """Batch-first self-attention without masks, packed projections, its attention weights unused."""
    args = [*node.args, *[None] * 3][:3]
    query, key, value = (node.kwargs.get(name, arg) for name, arg in zip(("query", "key", "value"), args))
    masks = [node.kwargs.get(name) for name in ("key_padding_mask", "attn_mask")] + list(node.args[3:4]) + \
        list(node.args[5:6])
    return (attention.batch_first and attention._qkv_same_embed_dim and attention.bias_k is None
            and not attention.add_zero_attn and query is key is value and isinstance(query, fx.Node)
            and all(m is None for m in masks) and not node.kwargs.get("is_causal", False)
            and all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users))


def split_attention(model: nn.Module, graph: fx.Graph) -> nn.Module:
    """`model`, or a copy of it with every splittable nn.MultiheadAttention (called once, in `graph`, its
    trace) replaced by a `SelfAttention` holding the same weights."""
    calls = [n for n in graph.nodes if n.op == "call_module"]
    counts = {path: sum(n.target == path for n in calls) for path in {n.target for n in calls}}
    paths = [n.target for n in calls if isinstance(model.get_submodule(n.target), nn.MultiheadAttention)
             and counts[n.target] == 1 and _splittable(model.get_submodule(n.target), n)]
    if not paths:
        return model
    model = copy.deepcopy(model)
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, SelfAttention(model.get_submodule(path)))
    return model
