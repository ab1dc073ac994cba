"""Write Triton model-repository entries: `<repository>/<model>/config.pbtxt` plus a new version folder.

Targets
  cpu  python backend running onnxruntime (`model.onnx` + `model.py`); the only backend the bundled
       CPU Triton build has.
  gpu  `onnxruntime_onnx` on KIND_GPU with onnxruntime's TensorRT execution accelerator: the server builds
       the engine from model.onnx itself and caches it, so builder and server never disagree on a TensorRT
       version. A prebuilt engine (`tensorrt_plan`) is the option: it loads only in the TensorRT that built
       it, so its entry records that version and `common.model_repository.plan_problem` refuses a server that ships another one.
       These load only in NVIDIA's Triton container, never here; its python backend cannot run the cpu
       target (that needs onnxruntime and numpy in the container's Python).

Safety rules: a version a server may be serving is never touched (each export adds version n+1); a model
folder holding anything this module did not write (tracked in `.polarprune.json`) is refused before any
write; a version folder is built under a temporary name and renamed into place; every config.pbtxt is
parsed into Triton's ModelConfig protobuf before it is written. The config names the one version it serves
(`version_policy: specific`) and is written last, after the version folder is in place: its atomic rename
is the commit, so a process killed at any step leaves a config whose version is complete and matches it.
A write that fails (or is interrupted by an exception) puts config.pbtxt and the manifest back as they
were; `write_model_versions` does that for several models at once, so an export adds both of its models or
neither, and it writes the configs only once every version folder is in place. Staging folders a killed
process left behind are swept by the next write to that model.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from polarprune.common.atomicio import WriteFailed, atomic_path
from polarprune.common.model_repository import (ENGINE_CACHE_DIR, MANIFEST_NAME, RepositoryError, engine_version, model_versions,
                                     parse_config)

TARGETS = ("cpu", "gpu")
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")
_TEMP_PREFIX = ".polarprune-tmp-"
_ATOMIC_TEMPS = (".config.pbtxt.", f".{MANIFEST_NAME}.")   # common.atomicio's temporaries of our two files
_STALE_TEMP_S = 600.0   # an atomic temporary lives for milliseconds; ten minutes old means its writer died
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TritonModelOptions:
    """How the model is served. `gpu_*`/`engine_path` only matter for target "gpu"."""

    target: str = "cpu"
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    max_queue_delay_us: int = 0          # adds straight to single-client latency: keep 0 or tiny
    instance_count: int = 1
    intra_op_threads: int = 0            # onnxruntime intra-op threads, 0 = onnxruntime decides
    warmup: bool = True
    gpu_tensorrt: bool = True            # ORT's TensorRT execution accelerator inside onnxruntime_onnx
    gpu_precision: str = "FP16"          # TensorRT accelerator precision: FP32 | FP16
    gpu_workspace_bytes: int = 1 << 30
    # Where the server caches the engines it builds (inside its container; mount a volume to keep them
    # across restarts). Not under the model folder: that holds only files export wrote. One level below a
    # folder that exists: the server creates only the last level (common.model_repository.ENGINE_CACHE_DIR).
    gpu_engine_cache: str = ENGINE_CACHE_DIR
    engine_path: str | None = None       # serve this TensorRT plan (platform tensorrt_plan) instead
    engine_tensorrt: str | None = None   # the TensorRT version that built engine_path
    input_normalization: dict | None = None  # {"mean", "std"} per channel: config parameters for clients

    def check(self) -> None:
        if self.target not in TARGETS:
            raise RepositoryError(f"unknown target {self.target!r}; expected one of {TARGETS}")
        if self.max_batch_size < 1:
            raise RepositoryError("max_batch_size must be >= 1 (the exporter emits a dynamic batch dim)")
        if self.instance_count < 1 or self.max_queue_delay_us < 0 or self.intra_op_threads < 0:
            raise RepositoryError("instance_count >= 1, max_queue_delay_us >= 0, intra_op_threads >= 0")
        if self.gpu_precision not in ("FP32", "FP16"):
            raise RepositoryError(f"gpu_precision must be FP32 or FP16, not {self.gpu_precision!r}")
        if not os.path.isabs(self.gpu_engine_cache) or os.path.normpath(self.gpu_engine_cache) == "/":
            raise RepositoryError(f"gpu_engine_cache must be an absolute folder path, not {self.gpu_engine_cache!r}")
        if self.engine_path and self.target != "gpu":
            raise RepositoryError("engine_path (TensorRT plan) needs target 'gpu'")
        if self.engine_path:
            engine_version(self.engine_tensorrt or "")  # a plan without its TensorRT version cannot be checked


@dataclass(frozen=True)
class ModelSignature:
    """One FP32 input and one FP32 output; dims exclude the (dynamic) batch dimension."""

    input_name: str
    input_dims: tuple[int, ...]
    output_name: str
    output_dims: tuple[int, ...]


def read_onnx_signature(onnx_path: str | os.PathLike) -> ModelSignature:
    """Read the single input/output of an exported classifier, checking FP32 and a dynamic batch dim."""
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except OSError as bad:
        raise RepositoryError(f"cannot read ONNX model {onnx_path}: {bad}") from None
    except Exception as bad:  # protobuf DecodeError and kin: not an ONNX file at all
        raise RepositoryError(f"{onnx_path} is not an ONNX model ({type(bad).__name__})") from None
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise RepositoryError(f"{onnx_path}: expected 1 input and 1 output, found "
                              f"{len(inputs)} and {len(graph.output)}")

    def dims_of(value) -> tuple[int, ...]:
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            raise RepositoryError(f"{onnx_path}: '{value.name}' is not FP32")
        dims = tensor.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            raise RepositoryError(f"{onnx_path}: '{value.name}' needs a dynamic batch dimension "
                                  "(export with dynamic axes)")
        if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[1:]):
            raise RepositoryError(f"{onnx_path}: '{value.name}' has non-static sample dims")
        return tuple(int(d.dim_value) for d in dims[1:])

    return ModelSignature(inputs[0].name, dims_of(inputs[0]), graph.output[0].name, dims_of(graph.output[0]))


def build_config(model_name: str, signature: ModelSignature, options: TritonModelOptions,
                 version: int | None = None) -> model_config_pb2.ModelConfig:
    """Triton's ModelConfig message for `options.target`, serving only `version` when given."""
    options.check()
    pb = model_config_pb2
    config = pb.ModelConfig(name=model_name, max_batch_size=options.max_batch_size)
    if version is not None:
        config.version_policy.specific.versions.append(version)
    if options.target == "cpu":
        config.backend = "python"
    elif options.engine_path:
        config.platform, config.default_model_filename = "tensorrt_plan", "model.plan"
    else:
        config.platform, config.default_model_filename = "onnxruntime_onnx", "model.onnx"
    config.input.add(name=signature.input_name, data_type=pb.TYPE_FP32, dims=signature.input_dims)
    config.output.add(name=signature.output_name, data_type=pb.TYPE_FP32, dims=signature.output_dims)
    config.dynamic_batching.preferred_batch_size.extend(
        b for b in options.preferred_batch_sizes if 1 <= b <= options.max_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    kind = pb.ModelInstanceGroup.KIND_CPU if options.target == "cpu" else pb.ModelInstanceGroup.KIND_GPU
    config.instance_group.add(kind=kind, count=options.instance_count)
    if options.target == "cpu":
        # Read by model.py; the key is the one Triton's onnxruntime backend uses for the same knob.
        config.parameters["intra_op_thread_count"].string_value = str(options.intra_op_threads)
    if options.input_normalization:  # what a client does to an image first: (x / 255 - mean) / std
        for key in ("mean", "std"):
            config.parameters[f"input_{key}"].string_value = json.dumps(options.input_normalization[key])
    if options.target == "gpu" and options.gpu_tensorrt and not options.engine_path:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update({
            "precision_mode": options.gpu_precision,
            "max_workspace_size_bytes": str(options.gpu_workspace_bytes),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": options.gpu_engine_cache,
            "trt_engine_cache_prefix": model_name,   # engine files <path>/<model>_<subgraph>...
        })
    if options.warmup:
        # Zeros, not random data: model.py rejects NaN/Inf and a failed warm-up fails the load. The largest
        # batch also makes the TensorRT accelerator build its engine for the full batch range at load time.
        for batch in sorted({1, options.max_batch_size}):
            sample = config.model_warmup.add(name=f"zeros_batch{batch}", batch_size=batch)
            sample.inputs[signature.input_name].data_type = pb.TYPE_FP32
            sample.inputs[signature.input_name].dims.extend(signature.input_dims)
            sample.inputs[signature.input_name].zero_data = True
    return config


def render_config(model_name: str, signature: ModelSignature, options: TritonModelOptions,
                  version: int | None = None) -> str:
    """The config.pbtxt text for `options.target` (validated by `parse_config` before any write)."""
    body = text_format.MessageToString(build_config(model_name, signature, options, version))
    return (f"# Written by polarprune export/triton_repo.py (target {options.target}); rewritten on export.\n"
            + body)


def _read_manifest(model_dir: Path) -> dict:
    """The manifest of a model folder we own (empty for a new folder); refuses foreign folders."""
    if model_dir.exists() and not model_dir.is_dir():
        raise RepositoryError(f"{model_dir} exists and is not a folder")
    entries = sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []
    if not entries:
        return {"model_name": model_dir.name, "files": [], "versions": {}}
    manifest_path = model_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise RepositoryError(f"refusing to write into {model_dir}: it holds files polarprune did not "
                              f"write (no {MANIFEST_NAME}): {entries[:5]}")
    try:
        manifest = json.loads(manifest_path.read_text())
        owned = set(manifest["files"])
        dict(manifest["versions"])
    except (ValueError, KeyError, TypeError) as bad:
        raise RepositoryError(f"{manifest_path} is unreadable ({bad}); fix or remove the folder") from None
    # Also ours: staging folders and common.atomicio temporaries a crashed export may have left.
    leftovers = (_TEMP_PREFIX, *_ATOMIC_TEMPS)
    foreign = [name for name in entries
               if name not in owned and name != MANIFEST_NAME and not name.startswith(leftovers)]
    if foreign:
        raise RepositoryError(f"refusing to write into {model_dir}: files not written by polarprune: "
                              f"{foreign[:5]} (move them away or use another model name)")
    return manifest


def _write_readable(path: Path, text: str) -> None:
    """Atomic write, world-readable: a Triton container often runs as another user than the exporter
    (the temporary files behind atomic writes are created 0600)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)


def _copy_synced(source: Path, dest: Path, shown: Path | None = None) -> None:
    """Copy and fsync; WriteFailed naming `shown` (the file's final place) when the disk refuses."""
    try:
        shutil.copyfile(source, dest)
        with open(dest, "rb") as copied:
            os.fsync(copied.fileno())
    except OSError as error:
        if not Path(source).is_file():
            raise
        raise WriteFailed(shown or dest, error) from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _sweep_leftovers(model_dir: Path) -> None:
    """Remove staging folders of processes that no longer run (named <prefix><version>-<pid>-...) and
    atomic-write temporaries old enough that their writer cannot still be at work."""
    if not model_dir.is_dir():
        return
    for entry in model_dir.iterdir():
        if entry.name.startswith(_TEMP_PREFIX) and entry.is_dir():
            parts = entry.name[len(_TEMP_PREFIX):].split("-")
            owner = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
            if owner is None or not _process_alive(owner):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(_ATOMIC_TEMPS) and entry.name.endswith(".tmp"):
            try:
                if time.time() - entry.stat().st_mtime > _STALE_TEMP_S:
                    entry.unlink()
            except FileNotFoundError:
                pass


@dataclass
class _FolderState:
    """What a model folder held before a write: enough to put it back exactly."""

    model_dir: Path
    existed: bool
    files: dict[str, bytes | None] = field(default_factory=dict)   # config.pbtxt, manifest
    added_version: Path | None = None

    @classmethod
    def capture(cls, model_dir: Path) -> "_FolderState":
        files = {}
        for name in ("config.pbtxt", MANIFEST_NAME):
            path = model_dir / name
            files[name] = path.read_bytes() if path.is_file() else None
        return cls(model_dir, model_dir.exists(), files)

    def restore(self) -> None:
        """Undo the write: the new version folder goes (renamed away first, so a polling server never
        sees half a folder), config.pbtxt and the manifest get their old bytes, a new model folder goes."""
        if self.added_version is not None and self.added_version.exists():
            doomed = self.model_dir / f"{_TEMP_PREFIX}rollback-{os.getpid()}-{self.added_version.name}"
            os.rename(self.added_version, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for name, data in self.files.items():
            path = self.model_dir / name
            if data is None:
                path.unlink(missing_ok=True)
            elif not path.is_file() or path.read_bytes() != data:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
        if not self.existed and self.model_dir.is_dir() and not any(self.model_dir.iterdir()):
            self.model_dir.rmdir()


@dataclass
class _StagedModel:
    """A model whose new version folder is in place, and the config that will make the server use it."""

    state: _FolderState
    config_text: str


def _add_version_folder(repository: str | os.PathLike, model_name: str, onnx_path: str | os.PathLike,
                        options: TritonModelOptions) -> _StagedModel:
    """Put version n+1 of `model_name` in place (the manifest claims it first); the config still names
    the version the server serves, so a process killed after this leaves that version serving."""
    if not _MODEL_NAME.match(model_name):
        raise RepositoryError(f"invalid model name {model_name!r} (letters, digits, _ . -)")
    options.check()
    onnx_path = Path(onnx_path)
    signature = read_onnx_signature(onnx_path)
    parse_config(render_config(model_name, signature, options), model_name)
    if options.engine_path:
        payload = {"model.plan": Path(options.engine_path)}
    elif options.target == "cpu":
        payload = {"model.onnx": onnx_path, "model.py": PYTHON_MODEL_SOURCE}
    else:
        payload = {"model.onnx": onnx_path}
    missing = [str(p) for p in payload.values() if not p.is_file()]
    if missing:
        raise RepositoryError(f"missing input file(s): {missing}")

    model_dir = Path(repository) / model_name
    manifest = _read_manifest(model_dir)
    state = _FolderState.capture(model_dir)
    staging = None
    try:
        _sweep_leftovers(model_dir)
        version = max(model_versions(model_dir) + [int(v) for v in manifest["versions"]] + [0]) + 1
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{version}-{os.getpid()}-", dir=model_dir))
        for name, source in payload.items():
            _copy_synced(source, staging / name, model_dir / str(version) / name)
        # Manifest first: a crash after this leaves files the manifest already claims, never foreign ones.
        manifest["files"] = sorted(set(manifest["files"]) | {"config.pbtxt", str(version)})
        manifest["versions"][str(version)] = {
            "target": options.target, "files": sorted(payload), "source": str(onnx_path.resolve()),
            "options": asdict(options)}
        _write_readable(model_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        final = model_dir / str(version)
        if final.exists():  # a concurrent export took this number; do not merge into it
            raise RepositoryError(f"{final} appeared while writing; re-run the export")
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        os.rename(staging, final)
        state.added_version = final
    except BaseException:  # KeyboardInterrupt too: the folder goes back to what it was
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        state.restore()
        raise
    return _StagedModel(state, render_config(model_name, signature, options, version))


def write_model_version(repository: str | os.PathLike, model_name: str, onnx_path: str | os.PathLike,
                        options: TritonModelOptions = TritonModelOptions()) -> Path:
    """Add version n+1 of `model_name` (from `onnx_path`, or `options.engine_path`) and a config serving it.

    Returns the new version folder. Raises RepositoryError, with nothing written, when the model name,
    the ONNX signature, the config or the folder's ownership is wrong; any other failure while writing
    puts the folder back as it was and re-raises.
    """
    return write_model_versions(repository, [(model_name, onnx_path, options)])[0]


def write_model_versions(repository: str | os.PathLike,
                         entries: list[tuple[str, str | os.PathLike, TritonModelOptions]]) -> list[Path]:
    """Add a version of each (model_name, onnx_path, options), all or none: when one fails, the ones
    already written are taken back and the repository is left as it was. Every version folder is in
    place before the first config changes, so the configs switch within a few renames of each other."""
    staged: list[_StagedModel] = []
    try:
        for model_name, onnx_path, options in entries:
            staged.append(_add_version_folder(repository, model_name, onnx_path, options))
        for model in staged:
            _write_readable(model.state.model_dir / "config.pbtxt", model.config_text)
    except BaseException:
        for model in reversed(staged):
            model.state.restore()
        raise
    return [model.state.added_version for model in staged]
