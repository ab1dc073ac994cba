"""The export stage as a library: `run(ExportOptions(run=Path("runs/<name>")))` returns the report.

From the run folder it reads network.pt (the trained network, its data and normalisation:
`training.network_file`) and mask.json (the mask, its only copy), nothing of training's config, methods
or resume state. Into the run folder: pruned_model.pt2, dense.onnx, pruned.onnx, test_samples.npz, export_report.json
(plus dense.plan/pruned.plan with engine=True on a GPU machine, *.ort-<level>.onnx with ort_optimized).
All of it is built in a staging folder and moved in only after every check passed, so a failure leaves
the run folder as it was; export_report.json comes last, once the Triton repository holds
<name>_dense and <name>_pruned. `python -m export` is this with its options from the command line.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from polarprune.common.atomicio import WriteFailed, write_json
from polarprune.common.results import provenance
from polarprune.training.arch import SpecError
from polarprune.training.data import FolderOptions, load_splits, normalize
from polarprune.training.flops import count_macs
from polarprune.training.mask import Mask, load_mask
from polarprune.training.network_file import NETWORK_FILE, TrainedNetwork, load_network

from . import ExportError
from . import tensorrt_build as trt_build
from .artifacts import KINDS, REPORT_NAME, Samples, commit, engines, stage_samples, write_triton_models  # noqa: F401
from .onnx_export import ORT_LEVELS, count_onnx_macs, export_onnx, save_ort_optimized, validate_with_onnxruntime
from .programs import is_program_folder, run_programs
from .report import build_report, network_summary
from .surgery import PRUNED_FILE, MaskMismatchError, Networks, SurgeryError, check_equivalence, prune, save_pruned
from .triton_repo import RepositoryError

TARGETS = ("cpu", "gpu")


@dataclass
class ExportOptions:
    """What to export and how; the defaults are `python -m export`'s."""

    run: Path                                # run folder (network.pt, mask.json)
    target: str = "cpu"                      # Triton deployment target: "cpu" or "gpu"
    dense_run: Path | None = None            # a dense-method run on the same data and model, served as dense
    engine: bool = False                     # also build TensorRT engines (GPU machines)
    repository: Path = Path("model_repository")
    max_batch_size: int = 64                 # Triton max_batch_size
    samples: int = 512                       # real test images for the checks and test_samples.npz
    ort_optimized: str | None = None         # also save onnxruntime's optimised graph at this level
    engine_opt_batch: int | None = None      # TensorRT profile opt batch (default max/2)
    engine_max_batch: int | None = None      # TensorRT profile max batch (default max_batch_size)
    engine_fp32: bool = False                # TensorRT: FP32 instead of FP16
    serve_plan: bool = False                 # target gpu: serve the engine plans, not model.onnx
    workspace_mb: int = trt_build.DEFAULT_WORKSPACE_BYTES >> 20
    timing_cache: Path | None = None         # TensorRT timing cache (default <run>/tensorrt_timing.cache)

    def validate(self) -> None:
        """ExportError naming the option for a value no export can use."""
        checks = [(self.target in TARGETS, "target", f"must be one of {', '.join(TARGETS)}"),
                  (self.max_batch_size >= 1, "max_batch_size", "must be >= 1"),
                  (self.samples >= 1, "samples", "must be >= 1"),
                  (self.ort_optimized is None or self.ort_optimized in ORT_LEVELS, "ort_optimized",
                   f"must be one of {', '.join(ORT_LEVELS)}"),
                  (self.workspace_mb >= 1, "workspace_mb", "must be >= 1"),
                  (not self.serve_plan or (self.engine and self.target == "gpu"), "serve_plan",
                   "needs engine=True and target gpu")]
        for ok, name, why in checks:
            if not ok:
                raise ExportError(f"export option {name}: {why} (got {getattr(self, name)!r})")


def load_test_samples(trained: TrainedNetwork, count: int, source: Path) -> Samples:
    """The first `count` images of the run's official test split (image_folder: val/), normalised as in
    training (network.pt's normalisation)."""
    data = trained.data
    if not isinstance(data.get("dataset"), str):
        raise ExportError(f"{source}: names no dataset")
    info, _, _, test = load_splits(data["dataset"], data.get("data_dir"), None, 0, int(data.get("seed", 0)),
                                   FolderOptions.from_config(data))
    network = trained.info
    expected = (network.in_channels, tuple(network.input_size), network.num_classes)
    if (info.in_channels, tuple(info.input_size), info.num_classes) != expected:
        raise ExportError(f"{source}: the network takes {expected[0]}x{expected[1]} inputs and {expected[2]} "
                          f"classes, but {info.name} gives {info.in_channels}x{info.input_size}, "
                          f"{info.num_classes} classes")
    normalization = {"mean": list(trained.normalization["mean"]), "std": list(trained.normalization["std"])}
    count = min(count, len(test))
    as_trained = dataclasses.replace(info, mean=tuple(normalization["mean"]), std=tuple(normalization["std"]))
    return Samples(normalize(test.images[:count], as_trained), test.labels[:count].clone(), normalization)


def load_run(run_dir: Path) -> tuple[TrainedNetwork, dict, Mask]:
    """(network.pt, mask.json document, mask), checked to belong together: the same network, and the mask
    the network was trained to (network.pt names it by digest; mask.json is its only copy)."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run folder")
    network_path, mask_path = run_dir / NETWORK_FILE, run_dir / "mask.json"
    trained = load_network(network_path)
    try:
        document, mask = load_mask(mask_path)
    except SpecError as error:  # some of load_mask's messages do not name the file
        raise MaskMismatchError(error if str(mask_path) in str(error) else f"{mask_path}: {error}") from None
    if document["network"] != trained.info.describe():
        raise MaskMismatchError(f"{mask_path}: made for a different network than {network_path} "
                                f"(its network description differs)")
    if mask.digest() != trained.mask_sha256:
        raise MaskMismatchError(f"{mask_path}: not the mask {network_path} was trained to (the kept channels or "
                                "closed blocks differ): it comes from another run, or was edited")
    return trained, document, mask


def load_dense_reference(dense_run: Path, trained: TrainedNetwork):
    """The trained network of a dense-method run made for the same network and data as `trained`."""
    dense_path = dense_run / NETWORK_FILE
    dense = load_network(dense_path)
    if dense.method != "dense":
        raise ExportError(f"{dense_path}: --dense-run must be a run of method dense (this one is {dense.method!r})")
    if dense.info.describe() != trained.info.describe() or dense.data.get("dataset") != trained.data.get("dataset"):
        raise ExportError(f"{dense_path}: --dense-run trained another network or dataset than the run")
    return dense.network.eval()


def stage_artifacts(options: ExportOptions, staging: Path, networks: Networks, samples: Samples, document: dict,
                    input_shape: tuple[int, ...], timing_cache: Path) -> dict:
    """Write and check every artifact in `staging`; the facts the report needs."""
    facts: dict = {"summaries": {}, "onnx_diffs": {}, "logit_scale": {}, "ort_files": {}}
    for kind in KINDS:
        network, onnx_path = getattr(networks, kind), staging / f"{kind}.onnx"
        proto = export_onnx(network, onnx_path, input_shape)
        facts["onnx_diffs"][kind], facts["logit_scale"][kind] = validate_with_onnxruntime(
            onnx_path, network, samples.images)
        onnx_macs, expected = count_onnx_macs(proto), document[f"{kind}_flops"]
        if onnx_macs != expected:
            raise SurgeryError(f"{onnx_path.name}: the ONNX graph has {onnx_macs} MACs, mask.json says {expected}")
        facts["summaries"][kind] = network_summary(network, onnx_path, onnx_macs, input_shape)
        if options.ort_optimized:
            optimized = staging / f"{kind}.ort-{options.ort_optimized}.onnx"
            save_ort_optimized(onnx_path, optimized, options.ort_optimized)
            validate_with_onnxruntime(optimized, network, samples.images)
            facts["ort_files"][kind] = optimized.name
    save_pruned(staging / PRUNED_FILE, networks.pruned, input_shape)
    facts["summaries"]["pruned"]["pruned_model_file"] = PRUNED_FILE
    stage_samples(staging / "test_samples.npz", samples)
    facts["engine"] = engines(options, staging, samples, timing_cache)
    return facts


def run(options: ExportOptions) -> dict:
    """Export the run in `options.run`; its export_report.json (also written into the run folder).
    ExportError (or a training error for a bad network.pt/mask/dataset) on any problem, leaving the run
    folder and the model repository as they were."""
    options.validate()
    run_dir = Path(options.run)
    if is_program_folder(run_dir):  # what the Python API saved (training.api.save_for_export)
        return run_programs(options)
    trained, document, mask = load_run(run_dir)
    network_path, mask_path = run_dir / NETWORK_FILE, run_dir / "mask.json"
    networks = prune(trained.network, trained.graph, mask, str(mask_path))
    dense_source = "trained" if trained.method == "dense" else "gates_removed"
    if options.dense_run is not None:
        networks.dense = load_dense_reference(Path(options.dense_run), trained)
        dense_source = "dense_run"
    samples = load_test_samples(trained, options.samples, network_path)
    input_shape = trained.info.input_shape
    surgery_diff = check_equivalence(networks.reference, networks.pruned, networks.graph, mask, samples.images)
    for kind in KINDS:
        measured, expected = count_macs(getattr(networks, kind), input_shape), document[f"{kind}_flops"]
        if measured != expected:
            raise SurgeryError(f"{mask_path}: {kind}_flops is {expected} but the {kind} network has {measured} MACs")

    staging = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=run_dir))
    try:
        facts = stage_artifacts(options, staging, networks, samples, document, input_shape,
                                Path(options.timing_cache or run_dir / "tensorrt_timing.cache"))
        commit(staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    try:
        triton = write_triton_models(options, run_dir, facts["engine"], samples.normalization)
    except (RepositoryError, OSError) as error:
        failure = ExportError(f"{error} (the model repository is as it was; the run folder's artifacts are "
                              "complete, and export_report.json is written once the repository is: fix it and "
                              "re-run)")
        if isinstance(error, WriteFailed):  # a full disk is not bad input
            failure.exit_code = error.exit_code
        raise failure from None
    report = build_report(
        run_name=run_dir.name, dataset=trained.data["dataset"], model=trained.info.model, method=trained.method,
        dense_source=dense_source,
        dense=facts["summaries"]["dense"], pruned=facts["summaries"]["pruned"], graph=networks.graph,
        mask=mask, mask_document=document, input_shape=input_shape, num_classes=trained.info.num_classes,
        max_abs_diff_surgery=surgery_diff, max_abs_diff_onnx=facts["onnx_diffs"],
        max_abs_logit=facts["logit_scale"],
        test_samples={"file": "test_samples.npz", "count": len(samples.labels)},
        engine=facts["engine"], triton=triton, ort_optimized=facts["ort_files"] or None)
    report["input_normalization"] = samples.normalization  # (x / 255 - mean) / std, per channel
    report["provenance"] = provenance()
    write_json(run_dir / REPORT_NAME, report)
    return report
