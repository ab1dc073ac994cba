"""Vision transformers through the Python API: attention heads, MLP widths and each block's two branches.

A timm-style ViT (the built-in one, with F.scaled_dot_product_attention and with softmax(q kᵀ) v written
out) and a DeiT-like network on nn.MultiheadAttention: gates from one trace, a short training, prune with a
head, MLP units and a branch closed; pruned == gated, onnxruntime == torch, ONNX MACs == the cost model's.
Patterns that mix heads or revive closed ones are pinned with the reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polarprune.export.onnx_export import count_onnx_macs, export_onnx, run_onnxruntime
from polarprune.training.api import polarize
from polarprune.training.attention import SelfAttention
from polarprune.training.gating import mask_cost, mask_macs
from polarprune.training.mask import Mask
from polarprune.training.models import ViT
from polarprune.training.pruning_report import report_markdown

SHAPE = (3, 16, 16)  # patch 4: 16 tokens


class DeiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DeiTLike(nn.Module):
    """DeiT's layout on nn.MultiheadAttention: patch conv, class token, position embedding, pre-norm blocks."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[DeiTBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


NETWORKS = {
    "timm_sdpa": lambda: ViT(3, 10, 16, dim=48, depth=2, heads=3),
    "timm_softmax": lambda: ViT(3, 10, 16, dim=48, depth=2, heads=3, fused=False, pool="mean"),
    "deit_mha": DeiTLike,
}
HEADS = {"timm_sdpa": (3, 16), "timm_softmax": (3, 16), "deit_mha": (4, 8)}  # heads, head dim
ATTENTION = {"timm_sdpa": "blocks.0.attn.qkv", "timm_softmax": "blocks.0.attn.qkv", "deit_mha": "blocks.0.attn.in_proj"}


def _polarized(name: str):
    torch.manual_seed(0)
    return polarize(NETWORKS[name](), torch.randn(2, *SHAPE), target_flops=0.5, round_to=8)


def _train(gated, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(gated.parameters(), lr=0.01, momentum=0.9)
    gated.train()
    for step in range(steps):
        images, labels = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(gated(images), labels) + gated.penalty(0.3 + 0.1 * step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", NETWORKS)
def test_heads_mlp_widths_and_branches_are_gated(name):
    gated = _polarized(name)
    graph, (heads, head_dim) = gated.graph, HEADS[name]
    attention = graph.groups[ATTENTION[name]]
    assert attention.prunable and attention.head_dim == head_dim and attention.unit == head_dim
    assert len(gated.channel_gate(ATTENTION[name]).score) == heads  # one gate per head
    assert graph.groups["blocks.0.mlp.0" if name == "deit_mha" else "blocks.0.mlp.fc1"].prunable
    branches = ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert sorted(graph.blocks) == branches
    # the residual stream: every group the blocks add into is pinned, LayerNorm named
    stream = graph.output_group("blocks.0.attn.proj" if name != "deit_mha" else "blocks.0.attn.out_proj")
    assert any("LayerNorm" in why for why in graph.groups[graph.group_of_space[
        graph.layers[ATTENTION[name]].in_layout[0].space]].pinned)
    assert stream.pinned and not stream.prunable
    # the attention products cost 2 * tokens² per head channel, counted beside the projections
    products = [layer for layer in graph.layers.values() if layer.kind == "attention"]
    tokens = 16 + (name != "timm_softmax")
    assert sum(layer.unit_macs for layer in products) == 2 * 2 * tokens ** 2


@pytest.mark.parametrize("name", NETWORKS)
def test_gate_train_prune_export(name, tmp_path):
    gated = _polarized(name)
    images, labels = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    F.cross_entropy(gated(images), labels).add(gated.penalty(0.5)).backward()
    lacking = [n for n, p in gated.named_parameters() if p.requires_grad and p.grad is None]
    assert not lacking, f"no gradient for {lacking}"
    _train(gated)
    heads, head_dim = HEADS[name]
    with torch.no_grad():  # close head 1 of the first attention, some MLP units, the second attention branch
        gated.channel_gate(ATTENTION[name]).score.copy_(torch.tensor([3.0, -3.0] + [3.0] * (heads - 2)))
        for group in gated.graph.prunable():
            if "mlp" in group:
                score = gated.channel_gate(group).score
                score.copy_(torch.where(torch.arange(len(score)) % 3 == 0, -3.0, 3.0))
        gated.block_gate("blocks.1.attn").score.fill_(-3.0)
    mask = gated.mask()
    kept = mask.kept_channels[ATTENTION[name]]
    assert kept == [c for c in range(heads * head_dim) if c // head_dim != 1]
    assert mask.closed_blocks == ["blocks.1.attn"]
    pruned = gated.prune(mask)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gated.plain().parameters())

    gated.eval()
    check = torch.randn(5, *SHAPE)
    with torch.no_grad():
        expected, got = gated(check), pruned(check)
    assert (expected - got).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))

    export_onnx(pruned, tmp_path / "pruned.onnx", SHAPE)
    from_ort = torch.from_numpy(run_onnxruntime(tmp_path / "pruned.onnx", check.numpy()))
    assert (from_ort - got).abs().max() <= 1e-4 * max(1.0, float(got.abs().max()))
    assert count_onnx_macs(tmp_path / "pruned.onnx") == round(mask_macs(gated.graph, mask))
    export_onnx(gated.plain().eval(), tmp_path / "dense.onnx", SHAPE)
    assert count_onnx_macs(tmp_path / "dense.onnx") == round(gated.dense_macs)


def test_closing_a_head_prices_its_projections_and_products():
    gated = _polarized("timm_sdpa")
    graph, name, head_dim, tokens = gated.graph, "blocks.0.attn.qkv", 16, 17
    full = {n: list(range(g.width)) for n, g in graph.prunable().items()}
    one_head_less = Mask({**full, name: list(range(head_dim, 48))}, [])
    saved = mask_macs(graph, Mask(full, [])) - mask_macs(graph, one_head_less)
    # q, k, v rows (3 * 16 outputs of 48 inputs) and proj columns (16 inputs of 48 outputs) per token,
    # and q kᵀ plus scores times v: 2 * tokens² * head dim
    assert saved == tokens * (3 * head_dim * 48 + head_dim * 48) + 2 * tokens ** 2 * head_dim


def test_report_shows_heads_mlp_widths_and_branches():
    gated = _polarized("timm_sdpa")
    with torch.no_grad():
        gated.channel_gate("blocks.0.attn.qkv").score.copy_(torch.tensor([3.0, 3.0, -3.0]))
        gated.block_gate("blocks.1.mlp").score.fill_(-3.0)
    report = gated.summary(gated.mask())
    assert report["groups"]["blocks.0.attn.qkv"]["heads"] == [3, 2]
    assert report["groups"]["blocks.0.mlp.fc1"]["width"] == 192
    assert report["blocks"] == {"blocks.0.attn": "kept", "blocks.0.mlp": "kept", "blocks.1.attn": "kept",
                                "blocks.1.mlp": "closed"}
    text = report_markdown(report)
    assert "| blocks.0.attn.qkv | 48 (3 heads) | 32 (2 heads) |" in text
    assert "| blocks.1.mlp | closed |" in text


class TimmAttention(nn.Module):
    """timm's attention with a twist (`twist`): a per-head bias on the scores, talking heads, or v revived."""

    def __init__(self, twist: str, dim: int = 32, heads: int = 4):
        super().__init__()
        self.twist, self.heads = twist, heads
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(heads, 16, 16))
        self.mix = nn.Linear(heads, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, 16, 32) from (B, 32, 4, 4)
        b, n, c = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1)
        if self.twist == "bias":
            scores = scores + self.bias
        elif self.twist == "talking":
            scores = self.mix(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif self.twist == "revived":  # v from its own projection, closed channels plus one: not zero
            v = (self.v(h) + 1.0).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return (x + self.proj(out)).mean(1)


@pytest.mark.parametrize("twist, reason", [
    ("bias", "works on attention heads in a way the cut cannot follow"),
    ("talking", "works on attention heads in a way the cut cannot follow"),
    ("revived", "closed channels would reach proj non-zero"),
])
def test_patterns_the_cut_cannot_follow_are_pinned(twist, reason):
    gated = polarize(TimmAttention(twist), torch.randn(2, 32, 4, 4), round_to=8)
    group = gated.graph.groups["qkv"]
    assert not group.prunable and any(reason in why for why in group.pinned), group.pinned
    assert "qkv" not in gated.graph.prunable()


class CrossAttention(nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.masked, self.attn = masked, nn.MultiheadAttention(32, 4, batch_first=True)
        self.memory = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        if self.masked:
            mask = torch.ones(16, 16, dtype=torch.bool).triu(1)
            return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0].mean(1)
        memory = self.memory(x)
        return self.attn(x, memory, memory, need_weights=False)[0].mean(1)


@pytest.mark.parametrize("masked", [False, True])
def test_multihead_attention_other_than_plain_self_attention_stays_whole(masked):
    network = CrossAttention(masked)
    gated = polarize(network, torch.randn(2, 32, 4, 4), round_to=8)
    assert isinstance(gated.graph.module.get_submodule("attn"), nn.MultiheadAttention)
    assert any("not called as batch-first self-attention without masks" in why
               for group in gated.graph.groups.values() for why in group.pinned)
    assert "attn" in gated.graph.layers  # still costs its MACs, as a fixed layer


def test_split_multihead_attention_computes_what_the_module_computes():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        assert torch.allclose(SelfAttention(attention).eval()(x, x, x)[0],
                              attention(x, x, x, need_weights=False)[0], atol=1e-6)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A tiny CLI-config run of the built-in ViT by import path (`model: polarprune.training.models:ViT`), exported
    for the GPU target (Triton's onnxruntime backend with its TensorRT accelerator; configured, not run)."""
    from polarprune.export.__main__ import main as export_main
    from polarprune.training.config import make_config
    from polarprune.training.data import FMNIST_SEARCH_DIRS
    from polarprune.training.loop import train
    if not any((d / "t10k-images-idx3-ubyte.gz").is_file() or (d / "t10k-images-idx3-ubyte").is_file()
               for d in FMNIST_SEARCH_DIRS):
        pytest.skip("Fashion-MNIST not installed (make data)")
    out = tmp_path_factory.mktemp("runs")
    config = make_config({
        "dataset": "fashion_mnist", "model": "polarprune.training.models:ViT", "method": "polarized", "device": "cpu",
        "model_args": {"in_channels": 1, "num_classes": 10, "image_size": 28, "dim": 32, "depth": 2, "heads": 2},
        "epochs": 2, "batch_size": 64, "train_subset": 512, "val_size": 256, "test_subset": 200,
        "target_flops_ratio": 0.5, "round_to": 16, "threads": 1, "progress": False, "seed": 0,
        "out_dir": str(out), "name": "vit"})
    metrics = train(config)
    code = export_main(["--run", str(out / "vit"), "--target", "gpu", "--repository", str(out / "repo")])
    assert code == 0
    return out, metrics


def test_cli_run_exports_a_dynamic_batch_transformer_for_triton(vit_run):
    import json

    import onnx

    from polarprune.export.triton_repo import parse_config
    out, metrics = vit_run
    report = json.loads((out / "vit" / "export_report.json").read_text())
    assert report["pruned"]["onnx_macs"] == metrics["pruned_flops"] < metrics["dense_flops"]
    graph = onnx.load(str(out / "vit" / "pruned.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    kept = json.loads((out / "vit" / "pruning.json").read_text())
    assert set(kept["blocks"]) == {f"blocks.{i}.{b}" for i in range(2) for b in ("attn", "mlp")}
    assert all(g["heads"][0] == 2 for name, g in kept["groups"].items() if name.endswith("attn.qkv"))
    config_path = next((out / "repo").glob("*_pruned/config.pbtxt"))
    config = parse_config(config_path.read_text(), config_path.parent.name)
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert config.platform == "onnxruntime_onnx" and accelerator.name == "tensorrt"


def test_tensorrt_engine_of_a_transformer(vit_run, tmp_path):
    """The prebuilt-engine path on the same export; needs TensorRT (GPU machines only)."""
    import numpy as np

    from polarprune.export import tensorrt_build as trt_build
    missing = trt_build.unavailable_reason()
    if missing:
        pytest.skip(f"TensorRT: {missing} (not installable here, docs/gpu.md; GPU machines only)")
    out, _ = vit_run
    plan = trt_build.plan_build(trt_build.installed_version(), True, trt_build.fp16_converter_installed())
    images = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    entry = trt_build.build_and_check(out / "vit" / "pruned.onnx", tmp_path / "model.plan", images,
                                      trt_build.batch_profile(64), plan, tmp_path / "timing.cache",
                                      trt_build.DEFAULT_WORKSPACE_BYTES)
    assert entry["top1_agreement"] >= 0.9 and (tmp_path / "model.plan").stat().st_size > 0


def test_latency_cost_prices_transformer_linears_on_their_tokens(tmp_path):
    """`cost: latency` on a transformer: its linears are timed on (tokens, channels) inputs; narrower MLP
    widths and fewer heads cost less (the attention products are in the untimed rest, not per head)."""
    from polarprune.training.graph import trace_network
    from polarprune.training.latency import LatencyCost, LatencySettings, load_or_measure
    graph = trace_network(ViT(1, 10, 28, dim=32, depth=1, heads=2), torch.zeros(2, 1, 28, 28))
    settings = LatencySettings(cache=str(tmp_path), rounds=10, budget_s=1.0)
    table, _ = load_or_measure(graph, 16, settings, log=lambda _: None)
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} <= set(table.layers)
    cost = LatencyCost(graph, table)
    full = {name: list(range(group.width)) for name, group in graph.prunable().items()}
    smaller = Mask({**full, "blocks.0.attn.qkv": list(range(16)), "blocks.0.mlp.fc1": list(range(64))}, [])
    assert mask_cost(cost, smaller) < cost.dense


def test_transformer_result_collects_and_renders(tmp_path):
    """vit_run.json from the run's stamped metrics, its pruning.json and bench.speedup's report, as the README
    shows it."""
    import json

    from polarprune.common.results import provenance
    from scripts.collect_results import collect
    from scripts.render_readme import render
    stamp, runs, reports = provenance(), tmp_path / "runs", tmp_path / "reports"
    for name, method, accuracy in (("v", "polarized", 0.81), ("v_dense", "dense", 0.83)):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({
            "method": method, "epochs": 4, "test_accuracy": accuracy, "dense_flops": 1000, "pruned_flops": 500,
            "flops_ratio": 0.5, "dense_params": 100, "pruned_params": 60, "params_ratio": 0.6,
            "removed_blocks": ["blocks.1.attn"] if method == "polarized" else [], "train_seconds": 9.0,
            "kept_channels": {}, "provenance": stamp}))
    (runs / "v" / "pruning.json").write_text(json.dumps({"groups": {
        "blocks.0.attn.qkv": {"width": 192, "kept": 128, "pinned": [], "heads": [3, 2]},
        "blocks.0.mlp.fc1": {"width": 768, "kept": 384, "pinned": []},
        "space3": {"width": 192, "kept": 192, "pinned": ["LayerNorm blocks.0.norm1 normalises across channels"]}},
        "blocks": {"blocks.0.attn": "kept", "blocks.0.mlp": "kept", "blocks.1.attn": "closed"}}))
    (reports / "v").mkdir(parents=True)
    (reports / "v" / "speedup.json").write_text(json.dumps({
        "settings": {"cpu": "Some CPU, avx2", "threads": 2}, "provenance": stamp, "results": [
            {"engine": "onnxruntime", "batch": batch, "speedup": 1.7, "efficiency": 0.85,
             "dense": {"median_ms": 2.0 * batch}, "pruned": {"median_ms": 1.2 * batch}} for batch in (1, 64)]}))
    written = collect("none", runs, reports, tmp_path / "results", only=["vit_run"], vit_run="v")
    document = json.loads(written[0].read_text())
    assert document["heads"] == {"blocks.0.attn.qkv": [3, 2]} and document["mlp_widths"] == {"blocks.0.mlp.fc1": [768, 384]}
    assert set(document["sources"]) == {str(runs / "v" / "metrics.json"), str(runs / "v_dense" / "metrics.json"),
                                        str(reports / "v" / "speedup.json")}
    text = render("<!-- results:vit-run -->\n<!-- /results:vit-run -->\n", tmp_path / "results")
    assert "Heads kept: blocks.0 2/3. MLP hidden widths kept: blocks.0 384/768. Branches removed: blocks.1.attn (of 3)." in text
    assert "| 64 | 128.000 | 76.800 | 1.70x | 0.85 |" in text and "Some CPU, avx2" in text
