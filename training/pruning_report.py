"""The pruning report: what was cut and why, from one place (`pruning_report`).

Per channel group its width before and after, or why it is pinned; per residual block kept or closed; per
costed layer its widths and MACs before and after; the target, what the gates learned and what the
projection into the target band changed (the `projection` dict the polarized method stores); the share of
MACs no gate can remove. The CLI prints it at the end of a run and writes it beside the run as
pruning.md, pruning.json and pruning_widths.png; the API returns it from `gated.summary()`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from polarprune.common.atomicio import write_bytes, write_json, write_text

from .gating import costed_layers, kept_macs, mask_widths
from .graph import NetworkGraph
from .macs import layer_macs
from .mask import Mask

FILES = {"markdown": "pruning.md", "json": "pruning.json", "chart": "pruning_widths.png"}


def floor_ratio(graph: NetworkGraph, round_to: int) -> float:
    """The least share of dense MACs any mask keeps: every prunable group at one `round_to` step, every
    block closed. What stays is pinned (layers no gate can shrink) or the narrowest deployable width."""
    widths = {name: float(min(round_to, g.width)) for name, g in graph.prunable().items()}
    return float(kept_macs(graph, widths, {b: 0.0 for b in graph.blocks})) / float(kept_macs(graph, {}, {}))


def pinned_share(graph: NetworkGraph) -> float:
    """Share of dense MACs in layers that no channel gate and no block gate touches."""
    prunable = graph.prunable()
    dense = float(kept_macs(graph, {}, {}))
    fixed = sum(layer_macs(layer) for layer in costed_layers(graph).values()
                if not layer.blocks and not any(graph.group_of_space[s.space] in prunable
                                                for s in layer.in_layout + layer.out_layout))
    return fixed / dense if dense else 0.0


def reachability(graph: NetworkGraph, target: float, round_to: int) -> str | None:
    """A one-line warning when no mask can reach `target` (None when one can)."""
    floor = floor_ratio(graph, round_to)
    if target >= floor:
        return None
    return (f"target {target:.3f} of the MACs cannot be reached: every mask keeps at least {floor:.3f} "
            f"({pinned_share(graph):.3f} in pinned layers, see the pin reasons in the pruning report; the rest "
            f"in blocks that cannot close and the narrowest widths round_to={round_to} allows)")


def pruning_report(graph: NetworkGraph, mask: Mask, target: float | None = None, round_to: int = 1,
                   projection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of `mask` on `graph` (see the module docstring); `projection`: the polarized method's
    projection dict (learned and final ratios, flipped groups, blocks closed or reopened); extra keys kept."""
    widths, blocks_open = mask_widths(mask)
    gone = {g for block in mask.closed_blocks for g in graph.groups_inside(block)}
    dense = float(kept_macs(graph, {}, {}))
    kept = float(kept_macs(graph, widths, blocks_open))

    def width(layout) -> int:
        return int(sum(widths.get(graph.group_of_space[s.space], s.width) for s in layout))

    groups = {}
    for name, group in graph.groups.items():
        if not group.producers:
            continue  # the network input's channels
        after = 0 if name in gone else len(mask.kept_channels[name]) if name in mask.kept_channels else group.width
        groups[name] = {"width": group.width, "kept": after, "pinned": list(group.pinned),
                        **({"unit": group.unit} if group.unit > 1 else {}),
                        **({"heads": [group.width // group.head_dim, after // group.head_dim]} if group.head_dim else {})}
    layers = {}
    for path, layer in costed_layers(graph).items():
        closed = any(b in mask.closed_blocks for b in layer.blocks)
        before = int(layer_macs(layer))
        after = 0 if closed else int(layer_macs(layer, width(layer.in_layout), width(layer.out_layout)))
        layers[path] = {"kind": layer.kind, "in": [sum(s.width for s in layer.in_layout), 0 if closed else width(layer.in_layout)],
                        "out": [sum(s.width for s in layer.out_layout), 0 if closed else width(layer.out_layout)],
                        "macs": [before, after]}
    report: dict[str, Any] = {
        "dense_macs": int(round(dense)), "kept_macs": int(round(kept)), "kept_ratio": kept / dense,
        "target_ratio": target, "target_miss": None if target is None else kept / dense - target,
        "floor_ratio": floor_ratio(graph, round_to), "pinned_macs_share": pinned_share(graph),
        "unreachable": None if target is None else reachability(graph, target, round_to),
        "groups": groups, "blocks": {b: "closed" if b in mask.closed_blocks else "kept" for b in graph.blocks},
        "layers": layers, "uncounted_layers": list(graph.uncounted),
    }
    if projection:
        report["decisions"] = decisions(projection)
    return report


def decisions(projection: dict[str, Any]) -> dict[str, Any]:
    """Which decisions the gates made and which the projection forced, from the polarized method's
    projection dict (`training.mask.projection_report` plus mode and target); unknown keys pass through."""
    flipped = projection.get("flipped_groups") or {}
    learned = next((v for k, v in projection.items() if k.startswith("learned_") and k.endswith("_ratio")), None)
    final = next((v for k, v in projection.items() if k.startswith("final_") and k.endswith("_ratio")), None)
    return {"learned_ratio": learned, "final_ratio": final, "mode": projection.get("mode"),
            "groups_moved_by_projection": {name: {"kept_before": f.get("kept_before"), "kept_after": f.get("kept_after")}
                                           for name, f in flipped.items() if isinstance(f, dict)},
            "blocks_closed_by_projection": list(projection.get("closed_blocks") or []),
            "blocks_reopened_by_projection": list(projection.get("reopened_blocks") or []),
            "other": {k: v for k, v in projection.items() if not isinstance(v, (dict, list))}}


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page (also what the CLI prints)."""
    lines = ["# Pruning report", ""]
    if report.get("unreachable"):
        lines += [f"**{report['unreachable']}**", ""]
    target = report["target_ratio"]
    lines.append(f"Kept MACs: {report['kept_macs']:,} of {report['dense_macs']:,} ({report['kept_ratio']:.3f})"
                 + (f", target {target:.3f} (miss {report['target_miss']:+.3f})" if target is not None else "")
                 + f". Pinned layers hold {report['pinned_macs_share']:.3f} of the MACs; no mask keeps less than "
                   f"{report['floor_ratio']:.3f}.")
    if report["uncounted_layers"]:
        lines.append(f"Not counted (no MAC formula): {', '.join(report['uncounted_layers'])}.")
    made = report.get("decisions")
    if made:
        lines += ["", "## Gates and projection", "",
                  f"The gates learned {_ratio(made['learned_ratio'])}; after the projection ({made['mode']}) "
                  f"{_ratio(made['final_ratio'])}."]
        moved = made["groups_moved_by_projection"]
        lines.append("Groups the projection moved: " + (", ".join(
            f"{name} {m['kept_before']}->{m['kept_after']}" for name, m in moved.items()) or "none") + ".")
        lines.append(f"Blocks the projection closed: {', '.join(made['blocks_closed_by_projection']) or 'none'}; "
                     f"reopened: {', '.join(made['blocks_reopened_by_projection']) or 'none'}.")
    lines += ["", "## Channel groups", "", "| group | width | kept | pinned because |", "|---|---:|---:|---|"]
    for name, group in report["groups"].items():
        heads = group.get("heads")
        width, kept = (f"{group['width']} ({heads[0]} heads)", f"{group['kept']} ({heads[1]} heads)") if heads \
            else (group["width"], group["kept"])
        lines.append(f"| {name} | {width} | {kept} | {'; '.join(group['pinned'])} |")
    if report["blocks"]:
        lines += ["", "## Residual blocks", "", "| block | |", "|---|---|"]
        lines += [f"| {name} | {state} |" for name, state in report["blocks"].items()]
    return "\n".join(lines) + "\n"


def _ratio(value) -> str:
    return f"{value:.3f} of the MACs" if isinstance(value, (int, float)) else "(not recorded)"


def width_chart(report: dict[str, Any]) -> bytes:
    """PNG: every conv and linear's output width before (light) and after (dark), in network order."""
    from .plots import plt
    layers = [(path, layer) for path, layer in report["layers"].items() if layer["kind"] in ("conv", "linear", "grouped", "depthwise")]
    fig, axis = plt.subplots(figsize=(max(6.0, 0.22 * len(layers)), 3.6))
    positions = range(len(layers))
    axis.bar(positions, [layer["out"][0] for _, layer in layers], color="#c7d7ee", label="dense")
    axis.bar(positions, [layer["out"][1] for _, layer in layers], color="#2c5d9c", label="pruned")
    axis.set_xticks(list(positions), [path for path, _ in layers], rotation=90, fontsize=6)
    axis.set(ylabel="output channels", title=f"kept MACs {report['kept_ratio']:.3f}")
    axis.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_pruning_report(folder: str | Path, report: dict[str, Any]) -> None:
    folder = Path(folder)
    write_json(folder / FILES["json"], report)
    write_text(folder / FILES["markdown"], report_markdown(report))
    write_bytes(folder / FILES["chart"], width_chart(report))
