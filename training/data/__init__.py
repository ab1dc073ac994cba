"""In-memory image datasets (uint8 tensors) and a seeded, vectorised batch iterator.

  images.py    ImageSet, DatasetInfo, DataError, normalisation
  registry.py  the one registry of datasets (name -> description and reader); config validates against it
  readers/     one reader per format: Fashion-MNIST IDX, CIFAR pickles, Tiny ImageNet and image folders
               (the user's own PNG/JPEG files), decoding with Pillow
  splits.py    seeded class-balanced train/val carve-out, official test split, the run's data summary
  augment.py   random window + flip in one gather, central window
  batches.py   BatchIterator: per-epoch seeded shuffles and augmentation, data-parallel shards

No DataLoader workers, no torchvision: each set is decoded once and augmented per batch with torch ops.
"""
from .batches import BatchIterator
from .images import DataError, DatasetInfo, ImageSet, normalize
from .readers.fashion_mnist import FMNIST_SEARCH_DIRS
from .readers.image_folder import FolderOptions
from .registry import DATASETS, dataset_info
from .splits import describe_splits, load_splits

__all__ = ["BatchIterator", "DATASETS", "DataError", "DatasetInfo", "FMNIST_SEARCH_DIRS", "FolderOptions",
           "ImageSet", "dataset_info", "describe_splits", "load_splits", "normalize"]
