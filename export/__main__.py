"""python -m export --run runs/<name>: surgery, ONNX (and TensorRT on GPU machines), Triton repository.

The command line of `export.api.run`; see export/api.py for what lands where."""
from __future__ import annotations

import sys
from pathlib import Path

from polarprune.common.cli import EXIT_OK, PolarpruneError, cli_parser, fail
from polarprune.export import tensorrt_build as trt_build
from polarprune.export.api import REPORT_NAME, TARGETS, ExportOptions, run
from polarprune.export.onnx_export import ORT_LEVELS

PROG = "python -m export"


def parse_args(argv: list[str] | None) -> ExportOptions:
    arguments = cli_parser(PROG, __doc__.splitlines()[0])
    arguments.add_argument("--run", required=True, type=Path, help="run folder (network.pt, mask.json), or a folder polarprune.save_for_export wrote")
    arguments.add_argument("--target", choices=TARGETS, default="cpu", help="Triton deployment target")
    arguments.add_argument("--dense-run", type=Path,
                           help="a run of method dense on the same data and model (e.g. runs/<name>_dense): "
                                "served as the dense model, so dense accuracy is that of a trained dense network")
    arguments.add_argument("--engine", action="store_true",
                           help="also build TensorRT engines (GPU machines; elsewhere says why not and goes on)")
    arguments.add_argument("--repository", type=Path, default=Path("model_repository"),
                           help="Triton model repository to add <name>_dense and <name>_pruned to")
    arguments.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size")
    arguments.add_argument("--samples", type=int, default=512,
                           help="real test images for the checks and test_samples.npz")
    arguments.add_argument("--ort-optimized", choices=tuple(ORT_LEVELS),
                           help="also save onnxruntime's optimised graph at this level beside each ONNX")
    arguments.add_argument("--engine-opt-batch", type=int, help="TensorRT profile opt batch (default max/2)")
    arguments.add_argument("--engine-max-batch", type=int,
                           help="TensorRT profile max batch (default --max-batch-size)")
    arguments.add_argument("--engine-fp32", action="store_true", help="TensorRT: build FP32 instead of FP16")
    arguments.add_argument("--serve-plan", action="store_true",
                           help="target gpu: serve the --engine plans (tensorrt_plan) instead of model.onnx with the "
                                "server-built TensorRT engine; the server must run the TensorRT that built them")
    arguments.add_argument("--workspace-mb", type=int, default=trt_build.DEFAULT_WORKSPACE_BYTES >> 20,
                           help="TensorRT workspace memory pool limit")
    arguments.add_argument("--timing-cache", type=Path,
                           help="TensorRT timing cache (default <run>/tensorrt_timing.cache)")
    args = arguments.parse_args(argv)
    if args.max_batch_size < 1 or args.samples < 1:
        arguments.error("--max-batch-size and --samples must be >= 1")
    if args.serve_plan and not (args.engine and args.target == "gpu"):
        arguments.error("--serve-plan needs --engine and --target gpu")
    return ExportOptions(**vars(args))


def _print_summary(report: dict) -> None:
    dense, pruned = report["dense"], report["pruned"]
    print(f"dense : {dense['flops'] / 1e6:.2f}M MACs, {dense['params'] / 1e6:.3f}M params, "
          f"{dense['onnx_bytes'] / 1e6:.2f} MB ONNX")
    print(f"pruned: {pruned['flops'] / 1e6:.2f}M MACs, {pruned['params'] / 1e6:.3f}M params, "
          f"{pruned['onnx_bytes'] / 1e6:.2f} MB ONNX; flops_ratio {report['flops_ratio']:.3f}, "
          + (f"{len(report['removed_blocks'])} blocks removed" if report["removed_blocks"] is not None else
             "blocks removed unknown (save_for_export(..., report=gated.summary()) records them)"))
    onnx = ", ".join(f"{kind} {diff:.2g} (logits up to {report['max_abs_logit'][kind]:.3g})"
                     for kind, diff in report["max_abs_diff_onnx"].items())
    surgery = report.get("max_abs_diff_surgery")  # None: an API export, checked when the API pruned it
    print(("" if surgery is None else f"checks: pruned vs trained (hard mask) max|diff| {surgery:.2g}; ")
          + f"onnxruntime vs torch max|diff| {onnx}")
    print(f"triton: {', '.join(report['triton']['versions'].values())} (target {report['triton']['target']})")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        report = run(options)
    except PolarpruneError as error:  # export's own, and training's for a bad network.pt, mask or dataset
        return fail(PROG, error)
    _print_summary(report)
    print(f"report: {options.run / REPORT_NAME}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
