"""One table of corrupt inputs: every file a stage reads x every way it can be wrong (issue 23).

Each case builds a scene in a fresh folder (a finished run, an earlier export in a model repository, a
served run, an image folder, ...), damages ONE file, then runs the command that reads it, in-process.
Handled cleanly means: exit 2, one line on stderr, `<command>: error: <path of the damaged file>...`, no
traceback, and every folder the command may write to exactly as it was (no temporary left behind).

    python -m pytest tests/test_corrupt_inputs.py                 # the cases as tests
    python -m tests.corrupt_inputs --out reports/corrupt_inputs.json   # the counts, with provenance

The latency cache is derived data: a damaged one is rebuilt (a note naming it, then an atomic rewrite),
never refused; its cases check that instead (see `LATENCY_CASES` in tests/test_corrupt_inputs.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# ---- how a file goes wrong (bytes -> bytes) -------------------------------------------------------------
RNG_SEED = 23


def truncated(data: bytes) -> bytes:
    return data[:max(1, len(data) // 2)]


def zero_bytes(data: bytes) -> bytes:
    return b""


def random_bytes(data: bytes) -> bytes:
    return np.random.default_rng(RNG_SEED).bytes(max(len(data), 512))


BYTE_DAMAGE = {"truncated": truncated, "zero bytes": zero_bytes, "random bytes": random_bytes}


@dataclass
class Scene:
    """What a case runs: `main(argv)` of command `prog`, the damaged `path`, and the folders that must come
    out exactly as they were."""

    prog: str
    main: Callable[[list[str]], int]
    argv: list[str]
    path: Path
    watched: list[Path]
    patches: tuple = ()


DAMAGE_KINDS = ("truncated", "zero bytes", "random bytes", "not UTF-8", "wrong version", "wrong shape", "NaN", "inf",
                "carries code")


def damage_kind(damage: str) -> str:
    """The kind of damage a case's description names (its first words)."""
    return next(kind for kind in DAMAGE_KINDS if damage.startswith(kind))


@dataclass(frozen=True)
class Case:
    file: str            # which file
    damage: str          # how it is wrong
    build: Callable[[Path], Scene]

    @property
    def id(self) -> str:
        return f"{self.file}: {self.damage}"


# ---- scenes ---------------------------------------------------------------------------------------------
_CACHE: dict[str, Path] = {}


def _scratch(prefix: str) -> Path:
    """A folder for the process's shared originals, removed when the process ends."""
    import atexit
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _finished_run() -> Path:
    """A synthetic finished run (network.pt, mask.json, metrics.json), made once per process."""
    if "run" not in _CACHE:
        from export_fixtures import make_run
        _CACHE["run"] = make_run(_scratch("corrupt-run-") / "r20", "resnet20", (28, 28), seed=6,
                                 closed_blocks=["layer2.0"])
    return _CACHE["run"]


def _export_scene(root: Path) -> tuple[Path, Path]:
    """A copy of the finished run and a repository holding an earlier export of it (tiny models)."""
    from polarprune.export.triton_repo import write_model_version
    from tiny_onnx import tiny_classifier
    run = root / "runs" / "r20"
    shutil.copytree(_finished_run(), run)
    repository = root / "model_repository"
    earlier = tiny_classifier(root / "earlier.onnx")
    for kind in ("dense", "pruned"):
        write_model_version(repository, f"r20_{kind}", earlier)
    return run, repository


def _export(root: Path, file: str, damage: Callable[[Path], None]) -> Scene:
    from polarprune.export.__main__ import main
    run, repository = _export_scene(root)
    damage(run / file)
    return Scene("python -m export", main, ["--run", str(run), "--repository", str(repository)], run / file,
                 [run.parent, repository])


def _resume(root: Path, damage: Callable[[Path], None]) -> Scene:
    """`python -m training --resume` of a run whose checkpoint.pt is damaged (an interrupted run's own
    checkpoint: the gated network of the synthetic run, after epoch 1 of 4)."""
    from polarprune.training.__main__ import main
    if "checkpoint" not in _CACHE:
        from export_fixtures import trained_model
        from polarprune.training.checkpoint import describe_model, save_checkpoint
        model, _, document, graph = trained_model("resnet20", (28, 28), seed=6)
        _CACHE["checkpoint"] = _scratch("corrupt-checkpoint-") / "checkpoint.pt"
        save_checkpoint(_CACHE["checkpoint"], {"config": {}, "network": document["network"],
                                               "model": model.state_dict(), "epoch": 1,
                                               "trained_model": describe_model(model, graph)})
    config, runs = root / "run.yaml", root / "runs"
    config.write_text(GOOD_CONFIG)
    (runs / "r20").mkdir(parents=True)
    shutil.copy(_CACHE["checkpoint"], runs / "r20" / "checkpoint.pt")
    damage(runs / "r20" / "checkpoint.pt")
    return Scene("python -m training", main, ["--config", str(config), "--set", f"out_dir={runs}", "--set", "name=r20",
                                              "--resume"], runs / "r20" / "checkpoint.pt", [runs])


def _bytes(damage: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_bytes(damage(path.read_bytes()))
    return apply


def _tensor_file_edit(change: Callable[[dict, Path], object]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        import torch
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.save(change(state, path), path)
    return apply


def _json_edit(change: Callable[[object], object], allow_nan: bool = True) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_text(json.dumps(change(json.loads(path.read_text())), allow_nan=allow_nan))
    return apply


def _with(document: dict, **changes) -> dict:
    return {**document, **changes}


def _first_weight(state: dict, value: float, key: str = "weights") -> dict:
    weights = dict(state[key])
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    tensor = weights[name].clone()
    tensor.view(-1)[0] = value
    weights[name] = tensor
    return {**state, key: weights}


class _Payload:
    """Unpickling this would create a file: the kind of code a hostile checkpoint carries."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


# config YAML, read by `python -m training` ----------------------------------------------------------------
GOOD_CONFIG = "dataset: fashion_mnist\nmodel: resnet20\nmethod: polarized\nepochs: 4\nbatch_size: 128\n" \
              "target_flops_ratio: 0.5\nround_to: 16\nseed: 0\n"


def _config(text: bytes | str) -> Callable[[Path], Scene]:
    def build(root: Path) -> Scene:
        from polarprune.training.__main__ import main
        path = root / "run.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        out = root / "runs"
        out.mkdir()

        def accepted(cfg, resume=False):  # a config that passes must not start a real training run
            raise AssertionError(f"{path}: the damaged config was accepted")
        return Scene("python -m training", main, ["--config", str(path), "--set", f"out_dir={out}"], path, [out],
                     (mock.patch("polarprune.training.__main__.train", accepted),))
    return build


def _cut_inside(text: str, key: str) -> str:
    """`text` cut in the middle of `key`'s name: what a write interrupted there leaves."""
    return text[:text.index(key) + len(key) // 2]


# run artifacts, read by `python -m serving` ---------------------------------------------------------------
GOOD_REPORT = {"model_names": {"dense": "d", "pruned": "p"}, "flops_ratio": 0.5, "input_shape": [1, 8, 8],
               "num_classes": 10}


def _served_run(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "export_report.json").write_text(json.dumps(GOOD_REPORT))
    np.savez(run / "test_samples.npz", images=np.zeros((4, 1, 8, 8), np.float32), labels=np.arange(4))
    return run


def _serving(file: str, damage: Callable[[Path], None]) -> Callable[[Path], Scene]:
    def build(root: Path) -> Scene:
        from polarprune.serving.__main__ import main
        run = _served_run(root)
        damage(run / file)
        reports = root / "reports"
        return Scene("python -m serving", main, ["--run", str(run), "--repository", str(root / "repo"), "--quick",
                                                 "--no-perf-analyzer", "--report-dir", str(reports)],
                     run / file, [run, root / "repo", reports])
    return build


def _npz(**arrays) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    return apply


# a model repository, read by `python -m serving` before the server starts ----------------------------------
def _repository(file: str, damage: Callable[[Path], None]) -> Callable[[Path], Scene]:
    def build(root: Path) -> Scene:
        from polarprune.export.triton_repo import write_model_version
        from polarprune.serving.__main__ import main
        from tiny_onnx import tiny_classifier
        run = _served_run(root)
        repository = root / "repo"
        for name in ("d", "p"):
            write_model_version(repository, name, tiny_classifier(root / f"{name}.onnx"))
        path = repository / "d" / file
        damage(path)
        reports = root / "reports"
        return Scene("python -m serving", main, ["--run", str(run), "--repository", str(repository), "--quick",
                                                 "--no-perf-analyzer", "--report-dir", str(reports)],
                     path, [run, repository, reports])
    return build


# the torch.export program folder the Python API writes, read by `python -m export` --------------------------
def _program(file: str, damage: Callable[[Path], None]) -> Callable[[Path], Scene]:
    def build(root: Path) -> Scene:
        import torch
        from torch import nn
        from polarprune.export.__main__ import main
        from polarprune.training.api import save_for_export
        if "program" not in _CACHE:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, 10)).eval()
            folder = _scratch("corrupt-program-") / "prog"
            save_for_export(folder, net, net, torch.randn(8, 1, 8, 8), torch.arange(8) % 10)
            _CACHE["program"] = folder
        folder = root / "prog"
        shutil.copytree(_CACHE["program"], folder)
        damage(folder / file)
        repository = root / "model_repository"
        return Scene("python -m export", main, ["--run", str(folder), "--repository", str(repository)],
                     folder / file, [folder, repository])
    return build


# result files, read by `python -m scripts.collect_results` ------------------------------------------------
STAMP = {"command": "python -m training --config configs/x.yaml", "commit": "0123456789", "dirty": False,
         "date": "2026-12-01T00:00:00+00:00", "machine": {"cpu": "Test CPU", "cores": 2}}
METRICS = {"method": "polarized", "epochs": 4, "test_accuracy": 0.86, "dense_flops": 1000, "pruned_flops": 500,
           "flops_ratio": 0.5, "dense_params": 100, "pruned_params": 80, "params_ratio": 0.8,
           "removed_blocks": [], "train_seconds": 10.0, "kept_channels": {}, "provenance": STAMP}


def _results(damage: Callable[[Path], None]) -> Callable[[Path], Scene]:
    def build(root: Path) -> Scene:
        from scripts.collect_results import main
        runs, out = root / "runs", root / "results"
        for name in ("r", "r_dense"):
            (runs / name).mkdir(parents=True)
            (runs / name / "metrics.json").write_text(json.dumps(METRICS))
        path = runs / "r" / "metrics.json"
        damage(path)
        out.mkdir()
        return Scene("collect_results", main, ["--run", "r", "--runs", str(runs), "--reports", str(root / "reports"),
                                               "--out", str(out)], path, [runs, out])
    return build


# image folders, read by `python -m training` (dataset: image_folder) ---------------------------------------
def _images(damage: Callable[[Path], None]) -> Callable[[Path], Scene]:
    def build(root: Path) -> Scene:
        from PIL import Image
        from polarprune.training.__main__ import main
        rng = np.random.default_rng(0)
        folder = root / "images"
        for split in ("train", "val"):
            for name in ("cat", "dog"):
                for k in range(3):
                    (folder / split / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                        folder / split / name / f"{k}.png")
        path = folder / "train" / "dog" / "1.png"
        damage(path)
        config = root / "run.yaml"
        config.write_text(f"dataset: image_folder\ndata_dir: {folder}\nimage_size: 16\nmodel: resnet20\n"
                          "method: dense\nepochs: 1\nbatch_size: 4\nval_size: 0\nprogress: false\ndevice: cpu\n")
        out = root / "runs"
        out.mkdir()
        return Scene("python -m training", main, ["--config", str(config), "--set", f"out_dir={out}"], path,
                     [out, folder])
    return build


def _png_of_text(path: Path) -> None:
    path.write_text("this is not a PNG, whatever its name says\n")


# ---- the table ------------------------------------------------------------------------------------------
def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(file: str, damage: str, build: Callable[[Path], Scene]) -> None:
        cases.append(Case(file, damage, build))

    # config YAML
    add("config YAML", "truncated", _config(_cut_inside(GOOD_CONFIG, "target_flops_ratio")))
    add("config YAML", "zero bytes", _config(""))
    add("config YAML", "random bytes", _config(random_bytes(GOOD_CONFIG.encode())))
    add("config YAML", "wrong shape (a list)", _config("- epochs\n- 4\n"))
    add("config YAML", "wrong shape (a number)", _config("42\n"))
    add("config YAML", "NaN value", _config(GOOD_CONFIG.replace("target_flops_ratio: 0.5", "target_flops_ratio: .nan")))
    add("config YAML", "inf value", _config(GOOD_CONFIG + "lr: .inf\n"))
    add("config YAML", "not UTF-8", _config(b"\xff\xfe" + GOOD_CONFIG.encode()))

    # checkpoint.pt (what --resume reads)
    for name, damage in BYTE_DAMAGE.items():
        add("checkpoint.pt", name, lambda root, d=damage: _resume(root, _bytes(d)))
    add("checkpoint.pt", "wrong version", lambda root: _resume(root, _tensor_file_edit(lambda s, p: _with(s, version=99))))
    add("checkpoint.pt", "wrong shape (a bare state dict)", lambda root: _resume(root, _tensor_file_edit(
        lambda s, p: s["model"])))
    add("checkpoint.pt", "NaN weights", lambda root: _resume(root, _tensor_file_edit(
        lambda s, p: _first_weight(s, float("nan"), "model"))))
    add("checkpoint.pt", "carries code", lambda root: _resume(root, _tensor_file_edit(
        lambda s, p: _with(s, config=_Payload(str(p.parent / "ran"))))))

    # network.pt (what export reads of a finished run)
    for name, damage in BYTE_DAMAGE.items():
        add("network.pt", name, lambda root, d=damage: _export(root, "network.pt", _bytes(d)))
    add("network.pt", "wrong version", lambda root: _export(root, "network.pt", _tensor_file_edit(
        lambda s, p: _with(s, version=99))))
    add("network.pt", "wrong shape (a list)", lambda root: _export(root, "network.pt", _tensor_file_edit(
        lambda s, p: [1, 2, 3])))
    add("network.pt", "wrong shape (a bare state dict)", lambda root: _export(root, "network.pt",
                                                                           _tensor_file_edit(lambda s, p: s["weights"])))
    add("network.pt", "NaN weights", lambda root: _export(root, "network.pt", _tensor_file_edit(
        lambda s, p: _first_weight(s, float("nan")))))
    add("network.pt", "inf weights", lambda root: _export(root, "network.pt", _tensor_file_edit(
        lambda s, p: _first_weight(s, float("inf")))))
    add("network.pt", "carries code", lambda root: _export(root, "network.pt", _tensor_file_edit(
        lambda s, p: _with(s, data=_Payload(str(p.parent / "ran"))))))

    # mask.json
    for name, damage in BYTE_DAMAGE.items():
        add("mask.json", name, lambda root, d=damage: _export(root, "mask.json", _bytes(d)))
    add("mask.json", "wrong version", lambda root: _export(root, "mask.json", _json_edit(lambda m: _with(m, version=99))))
    add("mask.json", "wrong shape (a list)", lambda root: _export(root, "mask.json", _json_edit(lambda m: [m])))
    add("mask.json", "wrong shape (kept_channels a list)", lambda root: _export(root, "mask.json", _json_edit(
        lambda m: _with(m, kept_channels=[]))))
    add("mask.json", "NaN value", lambda root: _export(root, "mask.json", _json_edit(
        lambda m: _with(m, pruned_flops=float("nan")))))
    add("mask.json", "inf value", lambda root: _export(root, "mask.json", _json_edit(
        lambda m: _with(m, dense_flops=float("inf")))))

    # the torch.export program (.pt2) and its samples, in a folder the Python API wrote
    for name, damage in BYTE_DAMAGE.items():
        add("program .pt2", name, _program("pruned.pt2", _bytes(damage)))
    add("program .pt2", "wrong shape (a plain torch.save file)", _program(
        "dense.pt2", lambda p: __import__("torch").save({"weights": [1, 2]}, p)))
    add("program samples .npz", "NaN images", _program("test_samples.npz", _npz(
        images=np.full((8, 1, 8, 8), np.nan, np.float32), labels=np.arange(8))))

    # the ONNX model and config.pbtxt of a served model
    for name, damage in BYTE_DAMAGE.items():
        add("model.onnx", name, _repository("1/model.onnx", _bytes(damage)))
    for name, damage in BYTE_DAMAGE.items():
        add("config.pbtxt", name, _repository("config.pbtxt", _bytes(damage)))
    add("config.pbtxt", "wrong shape (JSON)", _repository("config.pbtxt", lambda p: p.write_text('{"name": "d"}')))
    add("config.pbtxt", "NaN value", _repository("config.pbtxt", lambda p: p.write_text(
        p.read_text().replace("max_batch_size: 64", "max_batch_size: nan"))))

    # export_report.json and test_samples.npz, read by serving
    for name, damage in BYTE_DAMAGE.items():
        add("export_report.json", name, _serving("export_report.json", _bytes(damage)))
    add("export_report.json", "wrong shape (a list)", _serving("export_report.json", _json_edit(lambda r: [r])))
    add("export_report.json", "NaN value", _serving("export_report.json", _json_edit(
        lambda r: _with(r, flops_ratio=float("nan")))))
    add("export_report.json", "inf value", _serving("export_report.json", _json_edit(
        lambda r: _with(r, flops_ratio=float("inf")))))
    for name, damage in BYTE_DAMAGE.items():
        add("test_samples.npz", name, _serving("test_samples.npz", _bytes(damage)))
    add("test_samples.npz", "NaN images", _serving("test_samples.npz", _npz(
        images=np.full((4, 1, 8, 8), np.nan, np.float32), labels=np.arange(4))))
    add("test_samples.npz", "inf images", _serving("test_samples.npz", _npz(
        images=np.full((4, 1, 8, 8), np.inf, np.float32), labels=np.arange(4))))
    add("test_samples.npz", "carries code (pickled objects)", _serving("test_samples.npz", _npz(
        images=np.array([None] * 4, object), labels=np.arange(4))))

    # a result file (metrics.json), read by collect_results
    for name, damage in BYTE_DAMAGE.items():
        add("result metrics.json", name, _results(_bytes(damage)))
    add("result metrics.json", "wrong shape (a list)", _results(_json_edit(lambda m: [m])))
    add("result metrics.json", "wrong version (no provenance)", _results(_json_edit(
        lambda m: {k: v for k, v in m.items() if k != "provenance"})))
    add("result metrics.json", "NaN value", _results(_json_edit(lambda m: _with(m, test_accuracy=float("nan")))))
    add("result metrics.json", "inf value", _results(_json_edit(lambda m: _with(m, train_seconds=float("inf")))))

    # an image folder
    for name, damage in BYTE_DAMAGE.items():
        add("image folder PNG", name, _images(_bytes(damage)))
    add("image folder PNG", "wrong shape (text named .png)", _images(_png_of_text))
    return cases


CASES = _cases()


# ---- running one ----------------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, bytes | None]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@dataclass
class Outcome:
    code: int | None
    stderr: str
    problems: list[str]

    @property
    def clean(self) -> bool:
        return not self.problems


def run_case(case: Case, root: Path) -> Outcome:
    """Build, run, and judge one case (problems empty = handled cleanly)."""
    scene = case.build(root)
    before = {folder: tree(folder) for folder in scene.watched}
    out, err = io.StringIO(), io.StringIO()
    code: int | None = None
    with contextlib.ExitStack() as stack:
        for patch in scene.patches:
            stack.enter_context(patch)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = scene.main(scene.argv)
        except SystemExit as exited:
            code = exited.code
        except BaseException as escaped:  # a traceback is what the user would have seen
            err.write(f"Traceback (escaped): {type(escaped).__name__}: {escaped}\n")
    message = err.getvalue()
    lines = [line for line in message.splitlines() if line.strip()]
    problems = []
    if code != 2:
        problems.append(f"exit code {code}, expected 2")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, expected one")
    if "Traceback" in message:
        problems.append("a traceback")
    if not message.startswith(f"{scene.prog}: error: "):
        problems.append(f"stderr does not start with '{scene.prog}: error: '")
    if str(scene.path) not in message:
        problems.append(f"the message does not name {scene.path}")
    for folder, was in before.items():
        now = tree(folder)
        if now != was:
            changed = sorted(set(now) ^ set(was) | {k for k in set(now) & set(was) if now[k] != was[k]})
            problems.append(f"{folder} changed: {changed[:5]}")
    if list(root.rglob("ran")):
        problems.append("code in a file ran")
    return Outcome(code, message, problems)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile
    from polarprune.common.atomicio import write_json
    from polarprune.common.results import provenance
    parser = argparse.ArgumentParser(prog="python -m tests.corrupt_inputs", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the counts go (JSON)")
    args = parser.parse_args(argv)
    results = []
    for case in CASES:
        with tempfile.TemporaryDirectory(prefix="corrupt-") as folder:
            outcome = run_case(case, Path(folder))
        results.append({"file": case.file, "damage": case.damage, "exit_code": outcome.code,
                        "clean": outcome.clean, "problems": outcome.problems,
                        "message": outcome.stderr.strip().splitlines()[0][:300] if outcome.stderr.strip() else ""})
        print(f"{'ok ' if outcome.clean else 'BAD'} {case.id}: {outcome.problems or results[-1]['message'][:100]}")
    files = sorted({case.file for case in CASES})
    document = {"cases": len(results), "clean": sum(r["clean"] for r in results), "files": files,
                "damages": [kind for kind in DAMAGE_KINDS if any(damage_kind(c.damage) == kind for c in CASES)],
                "results": results, "provenance": provenance()}
    write_json(args.out, document)
    print(f"{document['clean']} of {document['cases']} corrupt inputs handled cleanly; wrote {args.out}")
    return 0 if document["clean"] == document["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
