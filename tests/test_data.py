"""Dataset loaders on small files written in the real formats, splits, and the batch iterator."""
from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from polarprune.training import data
from polarprune.training.data.readers import fashion_mnist
from polarprune.training.data import BatchIterator, DataError, DatasetInfo, ImageSet, load_splits, normalize

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------
# Writers of tiny files in the real formats


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(directory: Path, stem: str, payload: bytes, compress: bool = True) -> Path:
    path = directory / (stem + ".gz" if compress else stem)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_fmnist(directory: Path, n_train: int = 200, n_test: int = 50, compress: bool = True, seed: int = 0):
    """Random pixels, balanced labels; train image i carries i in its first two pixels (an id for split tests)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_idx(directory, f"{prefix}-images-idx3-ubyte", idx_bytes(images, 2051), compress)
        write_idx(directory, f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 2049), compress)
        arrays[prefix] = (images, labels)
    return arrays


def image_ids(images: torch.Tensor) -> set[int]:
    return set((images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist())


def write_cifar_batch(path: Path, data_rows: np.ndarray, labels, labels_key: bytes, extra: dict | None = None):
    batch = {b"batch_label": b"test batch", labels_key: list(labels), b"data": data_rows, **(extra or {})}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def cifar_rows(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def fmnist_dir(tmp_path):
    arrays = make_fmnist(tmp_path / "fmnist")
    return tmp_path / "fmnist", arrays


def small_info(**changes) -> DatasetInfo:
    base = DatasetInfo("toy", 3, 10, (8, 8), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), crop_padding=2, horizontal_flip=True)
    return dataclasses.replace(base, **changes)


def random_set(n: int, info: DatasetInfo, seed: int = 0, labels: torch.Tensor | None = None) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, info.in_channels, *info.input_size), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % info.num_classes if labels is None else labels)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_fmnist_idx_round_trip(tmp_path, compress):
    arrays = make_fmnist(tmp_path, n_train=120, n_test=30, compress=compress)
    info, train, val, test = load_splits("fashion_mnist", str(tmp_path), None, 0, seed=0)
    assert info == data.DATASETS["fashion_mnist"].info
    assert (info.in_channels, info.num_classes, info.input_size) == (1, 10, (28, 28))
    assert len(val) == 0 and len(train) == 120 and len(test) == 30
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert tuple(test.images.shape) == (30, 1, 28, 28)
    # val_size 0 and no subset: train is the official split, in file order, pixel for pixel.
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(train.labels.numpy(), arrays["train"][1])
    np.testing.assert_array_equal(test.images[:, 0].numpy(), arrays["t10k"][0])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k"][1])


def _real_fmnist_dir() -> Path | None:
    return next((d for d in data.FMNIST_SEARCH_DIRS if fashion_mnist.has_fmnist(d)), None)


@pytest.fixture(scope="module")
def real_fmnist():
    if _real_fmnist_dir() is None:
        pytest.skip("real Fashion-MNIST absent: run `make data` or apt-get install dataset-fashion-mnist")
    return load_splits("fashion_mnist", None, None, 5000, seed=0)


def test_real_fmnist_loads(real_fmnist):
    info, train, val, test = real_fmnist
    assert info.num_classes == 10
    assert len(train) + len(val) == 60000 and len(val) == 5000 and len(test) == 10000
    assert tuple(train.images.shape[1:]) == (1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert torch.bincount(val.labels).tolist() == [500] * 10  # class-balanced val


def test_normalized_real_data_is_standardised(real_fmnist):
    info, train, val, test = real_fmnist
    everything = torch.cat([train.images, val.images])
    x = normalize(everything, info)
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    # Through the augmenting iterator the stats stay close (zero padding adds a little black).
    batches = BatchIterator(train, info, 512, train=True, seed=0).epoch(0)
    sample = torch.cat([next(batches)[0] for _ in range(10)])
    assert abs(sample.mean().item()) < 0.1 and abs(sample.std().item() - 1) < 0.1


def test_fmnist_error_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "FMNIST_SEARCH_DIRS", (tmp_path / "nowhere", tmp_path / "elsewhere"))
    with pytest.raises(DataError) as error:
        load_splits("fashion_mnist", None, None, 10, seed=0)
    message = str(error.value)
    for hint in ("make data", "scripts/get_fmnist.sh", "apt-get install dataset-fashion-mnist", "data_dir", "nowhere"):
        assert hint in message


def test_fmnist_missing_dir(tmp_path):
    with pytest.raises(DataError, match="missing-dir.*train-images-idx3-ubyte"):
        load_splits("fashion_mnist", tmp_path / "missing-dir", None, 10, seed=0)


def test_fmnist_wrong_magic(fmnist_dir):
    directory, arrays = fmnist_dir
    write_idx(directory, "train-labels-idx1-ubyte", idx_bytes(arrays["train"][1], 2051))  # images magic on labels
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: IDX magic number 2051, expected 2049"):
        load_splits("fashion_mnist", directory, None, 10, seed=0)


def test_fmnist_truncated_gzip(fmnist_dir):
    directory, _ = fmnist_dir
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_splits("fashion_mnist", directory, None, 10, seed=0)


def test_fmnist_truncated_payload(fmnist_dir):
    directory, arrays = fmnist_dir
    payload = idx_bytes(arrays["train"][0], 2051)[:-28]  # a valid gzip stream holding one row too few
    write_idx(directory, "train-images-idx3-ubyte", payload)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: .*truncated"):
        load_splits("fashion_mnist", directory, None, 10, seed=0)


def test_fmnist_count_mismatch(fmnist_dir):
    directory, arrays = fmnist_dir
    write_idx(directory, "t10k-labels-idx1-ubyte", idx_bytes(arrays["t10k"][1][:-1], 2049))
    with pytest.raises(DataError, match="50 images but .*t10k-labels-idx1-ubyte.gz holds 49 labels"):
        load_splits("fashion_mnist", directory, None, 10, seed=0)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'svhn'.*fashion_mnist.*cifar10.*tiny_imagenet"):
        load_splits("svhn", None, None, 10, seed=0)


# ---------------------------------------------------------------------------------------------
# CIFAR


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar10_batches(tmp_path, subfolder):
    rng = np.random.default_rng(1)
    directory = tmp_path / subfolder
    directory.mkdir(exist_ok=True)
    rows = [cifar_rows(rng, 12) for _ in range(5)]
    labels = [rng.integers(0, 10, 12) for _ in range(5)]
    for i in range(5):
        write_cifar_batch(directory / f"data_batch_{i + 1}", rows[i], labels[i], b"labels")
    test_rows, test_labels = cifar_rows(rng, 7), rng.integers(0, 10, 7)
    write_cifar_batch(directory / "test_batch", test_rows, test_labels, b"labels")

    info, train, val, test = load_splits("cifar10", tmp_path, None, 0, seed=0)
    assert (info.name, info.in_channels, info.num_classes, info.input_size, info.crop_padding) == (
        "cifar10", 3, 10, (32, 32), 4,
    )
    assert tuple(train.images.shape) == (60, 3, 32, 32) and train.images.dtype == torch.uint8
    assert tuple(test.images.shape) == (7, 3, 32, 32) and test.labels.dtype == torch.int64
    all_rows = np.concatenate(rows)
    np.testing.assert_array_equal(train.labels.numpy(), np.concatenate(labels))
    np.testing.assert_array_equal(test.labels.numpy(), test_labels)
    # A row is the R, G, B planes, each 32x32 row-major.
    i, y, x = 13, 5, 30
    for c in range(3):
        assert train.images[i, c, y, x].item() == all_rows[i, c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(test.images.reshape(7, -1).numpy(), test_rows)


@pytest.mark.parametrize("subfolder", ["", "cifar-100-python"])
def test_cifar100_batches(tmp_path, subfolder):
    rng = np.random.default_rng(2)
    directory = tmp_path / subfolder
    directory.mkdir(exist_ok=True)
    train_rows, train_fine = cifar_rows(rng, 40), rng.integers(0, 100, 40)
    test_rows, test_fine = cifar_rows(rng, 9), rng.integers(0, 100, 9)
    train_fine[0] = 99
    coarse = {b"coarse_labels": [0] * 40}
    write_cifar_batch(directory / "train", train_rows, train_fine, b"fine_labels", coarse)
    write_cifar_batch(directory / "test", test_rows, test_fine, b"fine_labels", {b"coarse_labels": [0] * 9})

    info, train, val, test = load_splits("cifar100", str(tmp_path), None, 0, seed=0)
    assert info.num_classes == 100 and info.mean != data.DATASETS["cifar10"].info.mean
    np.testing.assert_array_equal(train.labels.numpy(), train_fine)
    np.testing.assert_array_equal(train.images.reshape(40, -1).numpy(), train_rows)
    np.testing.assert_array_equal(test.labels.numpy(), test_fine)
    np.testing.assert_array_equal(test.images.reshape(9, -1).numpy(), test_rows)


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="cifar10 needs data_dir.*data_batch_1"):
        load_splits("cifar10", None, None, 0, seed=0)
    with pytest.raises(DataError, match="cifar100 needs data_dir"):
        load_splits("cifar100", None, None, 0, seed=0)
    with pytest.raises(DataError, match="cifar-10-batches-py.*data_batch_1.*test_batch.*cifar-10-python.tar.gz"):
        load_splits("cifar10", tmp_path, None, 0, seed=0)
    # A truncated pickle, and a file that unpickles to the wrong thing.
    rng = np.random.default_rng(3)
    write_cifar_batch(tmp_path / "train", cifar_rows(rng, 4), [1, 2, 3, 4], b"fine_labels")
    (tmp_path / "test").write_bytes((tmp_path / "train").read_bytes()[:100])
    with pytest.raises(DataError, match=r"cannot unpickle .*test"):
        load_splits("cifar100", tmp_path, None, 0, seed=0)
    write_cifar_batch(tmp_path / "test", cifar_rows(rng, 4), [1, 2, 3, 4], b"labels")  # CIFAR-10 key
    with pytest.raises(DataError, match="fine_labels"):
        load_splits("cifar100", tmp_path, None, 0, seed=0)


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet


def make_tiny_imagenet(root: Path, wnids: list[str], per_class: int, val_per_class: int) -> dict[str, tuple]:
    """Each class gets one flat colour (JPEG keeps flat colours almost exactly); one image is greyscale."""
    from PIL import Image

    colours = {wnid: (40 + 70 * i, 200 - 60 * i, 30 + 90 * (i % 2)) for i, wnid in enumerate(wnids)}
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # listed order != label order
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (64, 64), colours[wnid]).save(folder / f"{wnid}_{k}.JPEG", quality=95)
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for k in range(val_per_class):
        for wnid in wnids:
            name = f"val_{len(lines)}.JPEG"
            Image.new("RGB", (64, 64), colours[wnid]).save(root / "val" / "images" / name, quality=95)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    Image.new("L", (64, 64), 77).save(root / "val" / "images" / "val_grey.JPEG")
    lines.append(f"val_grey.JPEG\t{wnids[0]}\t1\t2\t30\t40")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return colours


def test_tiny_imagenet_tree(tmp_path):
    wnids = ["n01443537", "n02099601", "n04067472"]
    colours = make_tiny_imagenet(tmp_path / "tiny-imagenet-200", wnids, per_class=4, val_per_class=2)
    info, train, val, test = load_splits("tiny_imagenet", tmp_path, None, 3, seed=0)  # parent folder is found too
    assert info.num_classes == 3 and info.input_size == (64, 64) and info.crop_padding == 8
    assert len(train) + len(val) == 12 and len(test) == 7
    assert tuple(test.images.shape) == (7, 3, 64, 64) and test.images.dtype == torch.uint8
    assert torch.bincount(val.labels, minlength=3).tolist() == [1, 1, 1]
    assert test.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]  # labels index the sorted wnids
    for split in (train, val, test):
        for image, label in zip(split.images[:6], split.labels[:6]):  # test[6] is the greyscale one
            expected = torch.tensor(colours[wnids[label]], dtype=torch.int16).view(3, 1, 1)
            assert (image.to(torch.int16) - expected).abs().max() <= 3
    grey = test.images[6]
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()  # greyscale expanded to RGB
    assert abs(int(grey[0, 10, 10]) - 77) <= 2


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DataError, match="tiny_imagenet needs data_dir"):
        load_splits("tiny_imagenet", None, None, 0, seed=0)
    with pytest.raises(DataError, match="wnids.txt not found"):
        load_splits("tiny_imagenet", tmp_path, None, 0, seed=0)
    root = tmp_path / "tiny-imagenet-200"
    make_tiny_imagenet(root, ["n01", "n02"], per_class=2, val_per_class=1)
    annotations = root / "val" / "val_annotations.txt"
    good = annotations.read_text()
    annotations.write_text(good + "val_x.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="wnid 'n99' is not listed"):
        load_splits("tiny_imagenet", root, None, 0, seed=0)
    annotations.write_text(good)
    (root / "train" / "n02" / "images" / "n02_0.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode image .*n02_0.JPEG"):
        load_splits("tiny_imagenet", root, None, 0, seed=0)


# ---------------------------------------------------------------------------------------------
# Splits


def test_val_disjoint_deterministic_and_subset(tmp_path):
    make_fmnist(tmp_path, n_train=300, n_test=10)
    _, train, val, _ = load_splits("fashion_mnist", tmp_path, None, 50, seed=7)
    train_ids, val_ids = image_ids(train.images), image_ids(val.images)
    assert len(val_ids) == 50 and len(train_ids) == 250
    assert train_ids.isdisjoint(val_ids) and train_ids | val_ids == set(range(300))
    assert torch.bincount(val.labels).tolist() == [5] * 10

    _, train_again, val_again, _ = load_splits("fashion_mnist", tmp_path, None, 50, seed=7)
    assert torch.equal(val_again.images, val.images) and torch.equal(train_again.labels, train.labels)
    _, _, val_other, _ = load_splits("fashion_mnist", tmp_path, None, 50, seed=8)
    assert image_ids(val_other.images) != val_ids

    # The subset: its size, balanced, disjoint from val, and val unchanged by it.
    _, small, val_with_subset, _ = load_splits("fashion_mnist", tmp_path, 40, 50, seed=7)
    assert len(small) == 40 and torch.bincount(small.labels).tolist() == [4] * 10
    assert image_ids(small.images) <= train_ids
    assert torch.equal(val_with_subset.images, val.images)
    with pytest.raises(DataError, match="config key 'train_subset'"):
        load_splits("fashion_mnist", tmp_path, 251, 50, seed=7)
    with pytest.raises(DataError, match="config key 'val_size'"):
        load_splits("fashion_mnist", tmp_path, None, 300, seed=7)


# ---------------------------------------------------------------------------------------------
# Batches


def test_normalize_values():
    info = small_info()
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    x = normalize(images, info)
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[0], (-mean / std).expand(3, 2, 2))
    torch.testing.assert_close(x[1], ((1 - mean) / std).expand(3, 2, 2))
    torch.testing.assert_close(normalize(images[1], info), x[1])  # a single (C, H, W) image works too
    with pytest.raises(ValueError, match="uint8"):
        normalize(images.float(), info)


def test_eval_covers_every_example_once_in_order():
    info = small_info()
    dataset = random_set(103, info)
    iterator = BatchIterator(dataset, info, 10, train=False, seed=0)
    assert len(iterator) == 11
    batches = list(iterator.epoch(0))
    assert len(batches) == 11 and batches[-1][0].shape[0] == 3
    images = torch.cat([b[0] for b in batches])
    assert images.dtype == torch.float32 and images.shape == (103, 3, 8, 8)
    torch.testing.assert_close(images, normalize(dataset.images, info), rtol=0, atol=0)
    assert torch.equal(torch.cat([b[1] for b in batches]), dataset.labels)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, iterator.epoch(5)))  # epoch is ignored


def test_train_batches_reproducible_per_epoch():
    info = small_info(num_classes=100)
    dataset = random_set(100, info, labels=torch.arange(100))  # labels double as example ids
    iterator = BatchIterator(dataset, info, 16, train=True, seed=3)
    assert len(iterator) == 6  # last partial batch dropped
    first = list(iterator.epoch(2))
    assert len(first) == 6 and all(x.shape == (16, 3, 8, 8) and y.shape == (16,) for x, y in first)
    # A fresh iterator (a resumed run) at the same epoch sees the very same batches.
    resumed = list(BatchIterator(dataset, info, 16, train=True, seed=3).epoch(2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, resumed))
    other_epoch = list(iterator.epoch(3))
    assert not torch.equal(first[0][1], other_epoch[0][1])
    other_seed = list(BatchIterator(dataset, info, 16, train=True, seed=4).epoch(2))
    assert not torch.equal(first[0][1], other_seed[0][1])
    # Each epoch visits distinct examples (a shuffle, not sampling with replacement).
    ids = torch.cat([y for _, y in first])
    assert ids.unique().numel() == 96
    with pytest.raises(DataError, match="config key 'batch_size'"):
        BatchIterator(dataset, info, 101, train=True, seed=0)


def test_train_without_augmentation_is_a_pure_shuffle():
    info = small_info(crop_padding=0, horizontal_flip=False, num_classes=64)
    dataset = random_set(64, info, labels=torch.arange(64))  # labels double as example ids
    x, ids = next(BatchIterator(dataset, info, 64, train=True, seed=0).epoch(0))
    assert not torch.equal(ids, torch.arange(64))
    torch.testing.assert_close(x, normalize(dataset.images[ids], info), rtol=0, atol=0)


def test_augmentation_crops_and_flips():
    info = small_info(num_classes=64)
    padding = info.crop_padding
    dataset = random_set(64, info, labels=torch.arange(64))  # random pixels: every transform is distinguishable
    padded = torch.nn.functional.pad(dataset.images, (padding,) * 4)
    seen_shift, seen_flip, seen_identity = set(), 0, 0
    for epoch in range(2):
        for x, ids in BatchIterator(dataset, info, 32, train=True, seed=1).epoch(epoch):
            assert x.shape == (32, 3, 8, 8) and x.dtype == torch.float32
            for image, i in zip(x, ids):
                matches = [
                    (dy, dx, flip)
                    for dy in range(2 * padding + 1)
                    for dx in range(2 * padding + 1)
                    for flip in (False, True)
                    if torch.equal(normalize(_window(padded[i], dy, dx, flip), info), image)
                ]
                assert len(matches) == 1, "each augmented image is exactly one crop/flip of its source"
                dy, dx, flip = matches[0]
                seen_shift.add((dy, dx))
                seen_flip += flip
                seen_identity += (dy, dx, flip) == (padding, padding, False)
    assert len(seen_shift) >= 15  # of 25 possible offsets over 128 draws
    assert 30 <= seen_flip <= 98
    assert seen_identity < 20


def _window(padded: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    crop = padded[:, dy : dy + 8, dx : dx + 8]
    return crop.flip(-1) if flip else crop


def test_augmentation_pads_with_zero_pixels():
    info = small_info(crop_padding=2, horizontal_flip=False, in_channels=1, mean=(0.0,), std=(1.0,))
    white = ImageSet(torch.full((64, 1, 8, 8), 255, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64))
    x, _ = next(BatchIterator(white, info, 64, train=True, seed=0).epoch(0))
    assert set(x.unique().tolist()) == {0.0, 1.0}  # black padding shows up, never anything else
