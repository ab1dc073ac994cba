"""Which pruning shapes turn a MAC cut into a speed-up: synthetic ResNets at about half their MACs.

    python -m bench.shapes [--quick] [--threads 2] [--rounds N] [--models resnet20,resnet56]
                           [--inputs 1x28x28,3x32x32] [--out reports/shapes.json]

For each model and input size, onnxruntime CPU times the dense network and five cuts of it, all six
interleaved in one process, at batch 1 and batch 64:
  blocks   whole residual blocks removed          round8   uneven inner widths rounded to 8
  halved   every block's inner width halved       round16  uneven inner widths rounded to 16
  free     uneven inner widths at free counts
Efficiency = speed-up / (dense MACs / pruned MACs). Not part of the pipeline: pure measurement.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from polarprune.bench.networks import close_blocks, dense_network, halve_inner_widths, uneven_inner_widths, write_onnx
from polarprune.bench.timing import compare, cpu_name, interleaved, ort_runner, ort_session, session_settings
from polarprune.common.atomicio import write_json
from polarprune.common.cli import EXIT_OK, cli_parser
from polarprune.training.arch import CIFAR_RESNET_DEPTHS
from polarprune.training.gating import full_mask

TARGET = 0.5
BATCHES = (1, 64)
VARIANTS = {
    "blocks": lambda dense: close_blocks(dense, TARGET),
    "halved": halve_inner_widths,
    "free": lambda dense: uneven_inner_widths(dense, TARGET, step=1),
    "round8": lambda dense: uneven_inner_widths(dense, TARGET, step=8),
    "round16": lambda dense: uneven_inner_widths(dense, TARGET, step=16),
}
FULL = {"rounds": 200, "warmup": 5, "budget_s": 30.0}   # per network set and batch size
QUICK = {"rounds": 10, "warmup": 1, "budget_s": 2.0}


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        channels, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size must look like 3x32x32, got {text!r}") from None
    return channels, height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("python -m bench.shapes", __doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few rounds only (smoke runs)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per batch size")
    parser.add_argument("--models", default="resnet20,resnet56", help="comma-separated CIFAR ResNets")
    parser.add_argument("--inputs", default="1x28x28,3x32x32", help="comma-separated CxHxW input sizes")
    parser.add_argument("--out", type=Path, default=Path("reports/shapes.json"), help="JSON report")
    args = parser.parse_args(argv)
    args.inputs = [parse_shape(text) for text in args.inputs.split(",")]
    args.models = args.models.split(",")
    unknown = [m for m in args.models if m not in CIFAR_RESNET_DEPTHS]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not among {', '.join(CIFAR_RESNET_DEPTHS)}")
    return args


def measure_shapes(model: str, input_shape: tuple[int, int, int], threads: int, settings: dict,
                   directory: Path) -> dict:
    dense = dense_network(model, input_shape)
    masks = {"dense": full_mask(dense.graph), **{name: shape(dense) for name, shape in VARIANTS.items()}}
    dense_macs = dense.macs(masks["dense"])
    tag = f"{model}_{'x'.join(map(str, input_shape))}"
    sessions = {name: ort_session(write_onnx(dense, mask, directory / f"{tag}_{name}.onnx"), threads)
                for name, mask in masks.items()}
    variants = {name: {"macs": dense.macs(masks[name]), "flops_ratio": dense.macs(masks[name]) / dense_macs,
                       "inner_widths": dense.inner_widths(masks[name]), "by_batch": {}} for name in VARIANTS}
    for batch in BATCHES:
        times = interleaved({name: ort_runner(session, batch) for name, session in sessions.items()}, **settings)
        for name, entry in variants.items():
            entry["by_batch"][str(batch)] = compare({"dense": times["dense"], "pruned": times[name]}, batch,
                                                    dense_macs, entry["macs"])
    return {"model": model, "input_shape": list(input_shape), "dense_macs": dense_macs,
            "session": session_settings(sessions["dense"]), "variants": variants}


def format_table(result: dict) -> str:
    shape = "x".join(map(str, result["input_shape"]))
    header = f"{'cut':<8} {'MAC ratio':>9}" + "".join(f" {'speed-up b' + str(b):>12} {'eff b' + str(b):>8}"
                                                      for b in BATCHES)
    lines = [f"{result['model']} at {shape} (dense {result['dense_macs'] / 1e6:.1f}M MACs)", header]
    for name, entry in result["variants"].items():
        measured = [entry["by_batch"][str(b)] for b in BATCHES]
        cells = "".join(f" {m['speedup']:>11.2f}x {m['efficiency']:>8.2f}" for m in measured)
        lines.append(f"{name:<8} {entry['flops_ratio']:>9.3f}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        settings["rounds"] = args.rounds
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for model in args.models:
            for input_shape in args.inputs:
                results.append(measure_shapes(model, input_shape, args.threads, settings, Path(directory)))
                print(format_table(results[-1]) + "\n", flush=True)
    write_json(args.out, {"mode": "quick" if args.quick else "full", "threads": args.threads, "cpu": cpu_name(),
                          "target_flops_ratio": TARGET, **settings, "results": results})
    print(f"wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
