"""dataset: image_folder on tiny folders of PNG/JPEG files the tests write: classes, pixels, normalisation,
seeded splits and batches, bad files, config keys, and a real run through `python -m training` and export."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polarprune.training.config import ConfigError, make_config
from polarprune.training.data import BatchIterator, DataError, FolderOptions, ImageSet, describe_splits, load_splits, normalize

from run_helpers import ENV, ROOT, kill_after_first_checkpoint, training_command

CLASSES = ["cat", "dog", "eel"]  # label order: sorted folder names
RED = {name: 40 + 80 * label for label, name in enumerate(CLASSES)}  # a training image's class, readable back


def save(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return path


def make_folder(root: Path, train_png: int = 5, val_png: int = 2, side: int = 16, seed: int = 0) -> Path:
    """Per class: train_png noisy PNGs whose red channel is the class code, one JPEG, val_png PNGs; plus
    things a real folder holds that are not examples (a text file, a hidden folder, a hidden class folder)."""
    rng = np.random.default_rng(seed)
    for name in reversed(CLASSES):  # creation order is not label order
        for split, count in (("train", train_png), ("val", val_png)):
            for k in range(count):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                pixels[..., 0] = RED[name]
                save(root / split / name / f"{name}_{k}.png", pixels)
        pixels = np.full((side, side, 3), (RED[name], 128, 128), dtype=np.uint8)
        save(root / "train" / name / "extra" / f"{name}.JPG", pixels, quality=95)  # sub-folder, upper-case suffix
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    save(root / "train" / "cat" / ".thumbnails" / "t.png", np.zeros((4, 4, 3), dtype=np.uint8))
    save(root / "train" / ".ipynb_checkpoints" / "x.png", np.zeros((4, 4, 3), dtype=np.uint8))
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "images")


def load(root, val_size=0, seed=0, train_subset=None, **options):
    return load_splits("image_folder", root, train_subset, val_size, seed, FolderOptions(**options))


def test_classes_shapes_and_labels(folder):
    info, train, val, test = load(folder, image_size=16)
    assert info.classes == tuple(CLASSES) and info.num_classes == 3
    assert (info.name, info.in_channels, info.input_size) == ("image_folder", 3, (16, 16))
    assert len(val) == 0 and len(train) == 3 * 6 and len(test) == 3 * 2  # not the .txt, nor hidden files
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape[1:]) == (3, 16, 16)
    assert tuple(test.images.shape[1:]) == (3, 16, 16) and test.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [6, 6, 6] and torch.bincount(test.labels).tolist() == [2, 2, 2]
    for split in (train, test):  # every image carries its class in its red channel (JPEG: within a few levels)
        red = split.images[:, 0].float().mean(dim=(1, 2))
        expected = torch.tensor([RED[CLASSES[label]] for label in split.labels.tolist()], dtype=torch.float32)
        assert (red - expected).abs().max() <= 3
    summary = describe_splits(info, train, val, test)
    assert summary["classes"] == CLASSES and summary["skipped_images"] == 0 and summary["test_examples"] == 6


def test_pixels_are_resized_and_center_cropped(tmp_path):
    """A 32x16 (w x h) image: red quarter, green half, blue quarter. The central square is the green half."""
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :8, 0], pixels[:, 8:24, 1], pixels[:, 24:, 2] = 255, 255, 255
    for split in ("train", "val"):
        for name in ("a", "b"):
            save(tmp_path / split / name / "wide.png", pixels)
    save(tmp_path / "train" / "a" / "grey.png", np.full((20, 20), 77, dtype=np.uint8))  # greyscale -> RGB
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 2], rgba[..., 3] = 200, 255
    save(tmp_path / "train" / "b" / "alpha.png", rgba)

    info, train, _, test = load(tmp_path, image_size=16)  # no scaling: exact pixels
    green = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16)
    assert all(torch.equal(image, green) for image in test.images)
    grey = train.images[train.labels == 0][0]  # a/grey.png sorts before a/wide.png
    assert (grey == 77).all()
    assert torch.equal(train.images[train.labels == 1][0][:, 0, 0], torch.tensor([0, 0, 200], dtype=torch.uint8))

    # resize 32: the shorter side doubles, the 32x32 square is kept for training; evaluation sees its centre.
    info, train, _, test = load(tmp_path, image_size=16, resize=32, crop="random")
    assert tuple(train.images.shape[2:]) == (32, 32) and tuple(test.images.shape[2:]) == (16, 16)
    assert all((image.int() - green.int()).abs().max() <= 1 for image in test.images)


def test_normalisation_is_measured_on_train_or_given(folder):
    info, train, _, _ = load(folder, image_size=16)
    pixels = train.images.double() / 255
    np.testing.assert_allclose(info.mean, pixels.mean(dim=(0, 2, 3)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(info.std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-9)
    x = normalize(train.images, info)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    # Measured on all of train/, whatever is carved out as val: training and export normalise alike.
    assert load(folder, val_size=5, seed=3, image_size=16)[0].mean == info.mean

    given, *_ = load(folder, image_size=16, normalize_mean=(0.485, 0.456, 0.406), normalize_std=(0.229, 0.224, 0.225))
    assert given.mean == (0.485, 0.456, 0.406) and given.std == (0.229, 0.224, 0.225)


def test_splits_and_batches_are_deterministic_by_seed(folder):
    options = dict(image_size=12, resize=16, crop="random")
    first = load(folder, val_size=6, seed=5, **options)
    again = load(folder, val_size=6, seed=5, **options)
    other = load(folder, val_size=6, seed=6, **options)
    for a, b in zip(first[1:], again[1:]):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(first[2].labels).tolist() == [2, 2, 2]  # class-balanced val
    assert not torch.equal(first[2].images, other[2].images)
    info, train = first[0], first[1]

    def batches(seed, epoch):
        return list(BatchIterator(train, info, 4, train=True, seed=seed).epoch(epoch))
    epoch1 = batches(5, 1)
    assert all(x.shape == (4, 3, 12, 12) for x, _ in epoch1)
    # A fresh iterator (a resumed run) at the same epoch sees the very same batches; another epoch does not.
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch1, batches(5, 1)))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch1, batches(5, 2)))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch1, batches(6, 1)))


def test_random_windows_move_inside_the_stored_square(folder):
    info, train, _, _ = load(folder, image_size=12, resize=16, crop="random", horizontal_flip=False)
    assert info.horizontal_flip is False and tuple(train.images.shape[2:]) == (16, 16)
    ids = torch.arange(len(train))
    indexed = ImageSet(train.images, ids)  # labels as example ids
    offsets = set()
    for epoch in range(3):
        for x, index in BatchIterator(indexed, info, 6, train=True, seed=0).epoch(epoch):
            for image, i in zip(x, index.tolist()):
                found = [(dy, dx) for dy in range(5) for dx in range(5)
                         if torch.equal(normalize(train.images[i, :, dy:dy + 12, dx:dx + 12], info), image)]
                assert found, "each training input is a 12x12 window of its stored 16x16 image"
                offsets.add(found[0])
    assert len(offsets) >= 8  # of 25, over 54 draws


def test_shards_of_all_ranks_make_the_one_process_batches(folder):
    info, train, _, _ = load(folder, image_size=12, resize=16, crop="random")
    whole = list(BatchIterator(train, info, 6, train=True, seed=2).epoch(0))
    shards = [list(BatchIterator(train, info, 6, train=True, seed=2, shard=(rank, 2)).epoch(0)) for rank in (0, 1)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(x[0::2], shards[0][step][0]) and torch.equal(x[1::2], shards[1][step][0])
        assert torch.equal(y[1::2], shards[1][step][1])


def test_unreadable_image_is_an_error_naming_the_file(folder):
    (folder / "train" / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"cannot decode image \S*dog/broken\.jpg.*skip_bad_images: true"):
        load(folder, image_size=16)


def test_unreadable_images_are_skipped_and_counted_on_request(folder):
    (folder / "train" / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    truncated = folder / "val" / "eel" / "truncated.png"
    save(truncated, np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:400])  # cut inside the pixel data
    info, train, val, test = load(folder, image_size=16, skip_bad_images=True)
    assert sorted(Path(p).name for p in info.skipped) == ["broken.jpg", "truncated.png"]
    assert len(train) == 18 and len(test) == 6  # the good ones, all of them
    summary = describe_splits(info, train, val, test)
    assert summary["skipped_images"] == 2 and len(summary["skipped_files"]) == 2


def test_val_classes_must_match_train(folder):
    (folder / "val" / "fox").mkdir()
    (folder / "val" / "eel" / "eel_0.png").rename(folder / "val" / "fox" / "f.png")
    for path in (folder / "val" / "eel").iterdir():
        path.unlink()
    (folder / "val" / "eel").rmdir()
    with pytest.raises(DataError, match=r"same class folders .*missing in val/: eel; not in train/: fox"):
        load(folder, image_size=16)


def test_layout_errors_say_what_is_expected(tmp_path, folder):
    with pytest.raises(DataError, match="image_folder needs data_dir.*train/<class>"):
        load(None, image_size=16)
    with pytest.raises(DataError, match=r"data_dir \S*nowhere is not a folder"):
        load(tmp_path / "nowhere", image_size=16)
    with pytest.raises(DataError, match="config key 'val_size': 18 must be in"):
        load(folder, val_size=18, image_size=16)
    (folder / "train" / "gnu").mkdir()
    (folder / "val" / "gnu").mkdir()
    with pytest.raises(DataError, match=r"no images in \S*train/gnu"):
        load(folder, image_size=16)
    shutil.rmtree(folder / "val")
    with pytest.raises(DataError, match=r"val is not a folder.*train/<class>"):
        load(folder, image_size=16)


# -- config keys ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, key", [
    ({"crop": "random"}, "crop"),                                   # no room: resize defaults to image_size
    ({"crop": "corner"}, "crop"),
    ({"resize": 32, "image_size": 64}, "resize"),
    ({"image_size": 4}, "image_size"),
    ({"normalize_mean": [0.5, 0.5, 0.5]}, "normalize_mean"),         # without its std
    ({"normalize_mean": [0.5, 0.5], "normalize_std": [0.2, 0.2]}, "normalize_mean"),
    ({"normalize_mean": [0.5] * 3, "normalize_std": [0.2, 0.0, 0.2]}, "normalize_std"),
    ({"normalize_mean": "a,b,c", "normalize_std": [0.2] * 3}, "normalize_mean"),
])
def test_bad_image_folder_keys_are_refused(values, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        make_config({"dataset": "image_folder", "data_dir": "x", **values})


def test_image_folder_keys_apply_to_image_folder_only():
    with pytest.raises(ConfigError, match="config key 'skip_bad_images': applies to dataset image_folder only"):
        make_config({"dataset": "cifar10", "skip_bad_images": True})


def test_image_folder_keys_parse_from_yaml_and_set():
    cfg = make_config({"dataset": "image_folder", "image_size": "32", "resize": 40, "crop": "random",
                       "normalize_mean": "0.485, 0.456,0.406", "normalize_std": [0.229, 0.224, 0.225]})
    assert cfg.normalize_mean == (0.485, 0.456, 0.406) and cfg.normalize_std == (0.229, 0.224, 0.225)
    assert FolderOptions.from_config(cfg.to_dict()) == FolderOptions(32, 40, "random", True, cfg.normalize_mean,
                                                                     cfg.normalize_std, False)


# -- a real run --------------------------------------------------------------------------------------------------

def test_training_resume_and_export_of_an_image_folder_run(tmp_path):
    root = make_folder(tmp_path / "images", train_png=4)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    settings = {"dataset": "image_folder", "data_dir": root, "image_size": 16, "resize": 20, "crop": "random",
                "skip_bad_images": "true", "model": "resnet20", "epochs": 2, "batch_size": 4, "val_size": 3,
                "eval_batch_size": 8, "progress": "false", "threads": 1, "device": "cpu", "out_dir": tmp_path / "runs"}

    def run(name, *extra_args, **changes):
        return subprocess.run(training_command({**settings, "name": name, **changes}) + list(extra_args),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    whole = run("whole")
    assert whole.returncode == 0, whole.stderr
    metrics = json.loads((tmp_path / "runs" / "whole" / "metrics.json").read_text())
    data = metrics["data"]
    assert data["classes"] == CLASSES and data["num_classes"] == 3 and data["input_size"] == [16, 16]
    assert data["skipped_images"] == 1 and data["skipped_files"][0].endswith("broken.jpg")
    assert (data["train_examples"], data["val_examples"], data["test_examples"]) == (12, 3, 6)

    # Killed after its first epoch's checkpoint, then resumed: the same run as the uninterrupted one.
    run_dir = tmp_path / "runs" / "killed"
    kill_after_first_checkpoint(training_command({**settings, "name": "killed"}), run_dir / "checkpoint.pt")
    assert not (run_dir / "metrics.json").exists()
    refused = run("killed", "--resume", crop="center", resize="none")
    assert refused.returncode == 2 and "crop, resize changed" in refused.stderr
    resumed = run("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr

    def rows(name):
        lines = (tmp_path / "runs" / name / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
    assert rows("killed") == rows("whole") and len(rows("whole")) == 2
    resumed_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert resumed_metrics["kept_channels"] == metrics["kept_channels"]
    assert resumed_metrics["test_accuracy"] == metrics["test_accuracy"] and resumed_metrics["data"] == data

    # Export reads val/ as the real test images, normalised as in training.
    export = subprocess.run([sys.executable, "-m", "export", "--run", str(run_dir), "--repository",
                             str(tmp_path / "repository"), "--samples", "5"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr
    samples = np.load(run_dir / "test_samples.npz")
    assert samples["images"].shape == (5, 3, 16, 16) and samples["labels"].tolist() == [0, 0, 1, 1, 2]
    info, _, _, test = load(root, image_size=16, resize=20, crop="random", skip_bad_images=True)
    np.testing.assert_array_equal(samples["images"], normalize(test.images[:5], info).numpy())
