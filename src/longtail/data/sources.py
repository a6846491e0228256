"""Where a run's real images come from, behind one interface: Fashion-MNIST-LT in memory, or ImageFolders.

A source gives the class names, the real training counts (which set Many / Medium / Few), a DataLoader for
training on real + synthetic images (with the augmentation that suits it), a DataLoader over the evaluation
split, and evaluation / synthetic images as classifier-input tensors for feature distances. Every job stage
goes through it, so the same training loop, evaluation and accelerate path serve the embedded demo and any
user's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .datasets import (
    FASHION_MNIST_CLASSES,
    class_groups,
    load_fashion_mnist,
    longtail_counts,
    longtail_indices,
    to_model_range,
)
from .imagefolder import ImageIndex, ImageListDataset, Preprocess, eval_transform, train_transform
from .store import SyntheticStore


@dataclass
class Recipe:
    """How real + synthetic images are fed to training: batch size, augmentation, loader workers.

    ``rotation`` (degrees, +-) and ``hflip`` apply on both paths; ``translate`` (pixels, +-) is the in-memory
    path's analog of random crops, ``crop`` ("random" resized crop or "center") the ImageFolder path's.
    """

    batch_size: int = 128
    rotation: float = 15.0
    translate: float = 2.0
    hflip: bool = True
    crop: str = "random"
    augment: str | None = None  # a baseline augmentation: longtail.augment.AUGMENTATIONS
    num_workers: int = 0


def uint8_to_input(images: Tensor) -> Tensor:
    """Stored grayscale images uint8 ``[N, H, W]`` -> classifier input ``[N, 1, H, W]`` in [-1, 1]."""
    return images.float().unsqueeze(1) / 127.5 - 1.0


def _seeded_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                   drop_last: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers,
                      drop_last=drop_last)


class FashionMNISTLT:
    """Fashion-MNIST with the CIFAR-LT profile, in memory: 32 px grayscale in [-1, 1]; the balanced test set
    (10k) is the evaluation split. ``n_max``/``imbalance`` set the profile; ``data_seed`` fixes the subset."""

    kind = "fashion_mnist_lt"

    def __init__(self, data_dir: str | None = None, n_max: int = 1000, imbalance: float = 100.0,
                 data_seed: int = 0, many: int = 100, few: int = 20) -> None:
        images, labels = load_fashion_mnist("train", data_dir)
        test_images, test_labels = load_fashion_mnist("test", data_dir)
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.train_counts = longtail_counts(n_max, imbalance, len(self.class_names))
        idx = longtail_indices(labels, self.train_counts, data_seed)
        self.train_x, self.train_y = to_model_range(images[idx]), labels[idx]
        self.eval_x, self.eval_y = to_model_range(test_images), test_labels
        self.groups = class_groups(self.train_counts, many, few)
        self.eval_name = "Fashion-MNIST test set (balanced)"

    def describe(self) -> str:
        return f"{sum(self.train_counts)} real training images, per class {self.train_counts}"

    def synthetic_inputs(self, store_root: Path, rows: Sequence[dict[str, str]] | None = None
                         ) -> tuple[Tensor, Tensor]:
        """Synthetic images of ``rows`` (default: all) as classifier input ``[N, 1, 32, 32]`` and labels ``[N]``."""
        ids = None if rows is None else [row["id"] for row in rows]
        images, labels = SyntheticStore(store_root).load(self.class_names, ids=ids)
        return uint8_to_input(torch.from_numpy(images)), torch.from_numpy(labels)

    def train_loader(self, recipe: Recipe, seed: int, rows: Sequence[dict[str, str]] = (),
                     store_root: Path | None = None) -> DataLoader:
        """Real + synthetic (``rows`` of the store at ``store_root``) images, shuffled with ``seed``. The
        augmentation is applied per batch by the training loop (see ``batch_augment``)."""
        x, y = self.train_x, self.train_y
        if rows:
            sx, sy = self.synthetic_inputs(store_root, rows)
            x, y = torch.cat([x, sx]), torch.cat([y, sy])
        # a final batch of one example is dropped: BatchNorm needs two
        return _seeded_loader(TensorDataset(x, y), recipe.batch_size, seed, drop_last=len(x) % recipe.batch_size == 1)

    def eval_loader(self, batch_size: int = 512) -> DataLoader:
        return DataLoader(TensorDataset(self.eval_x, self.eval_y), batch_size=batch_size)

    def eval_inputs(self, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """Evaluation images as classifier input ``[N, 1, 32, 32]`` and labels ``[N]`` (the first ``limit``)."""
        return self.eval_x[:limit], self.eval_y[:limit]

    batch_augment = True  # the training loop augments whole batches (rotation, shift, flip per sample)


class ImageFolderSource:
    """Train / val ImageFolders, read through the classifier's own preprocessing ``pre``."""

    kind = "imagefolder"
    batch_augment = False  # the loader's transforms augment each image

    def __init__(self, train: ImageIndex, val: ImageIndex, pre: Preprocess, many: int = 100, few: int = 20) -> None:
        self.train, self.val, self.pre = train, val, pre
        self.class_names = list(train.class_names)
        self.train_counts = train.counts()
        self.groups = class_groups(self.train_counts, many, few)
        self.eval_name = f"{val.root if hasattr(val, 'root') else 'validation'} ImageFolder"

    def describe(self) -> str:
        c = self.train_counts
        return f"{sum(c)} real training images (per class {min(c)}..{max(c)})"

    def _transform(self, recipe: Recipe):
        if recipe.crop == "center":
            return eval_transform(self.pre)
        if recipe.crop != "random":
            raise ValueError(f"finetune.crop must be 'random' or 'center', got {recipe.crop!r}")
        return train_transform(self.pre, recipe.rotation, recipe.hflip, recipe.augment)

    def train_loader(self, recipe: Recipe, seed: int, rows: Sequence[dict[str, str]] = (),
                     store_root: Path | None = None) -> DataLoader:
        lookup = {n: i for i, n in enumerate(self.class_names)}
        paths = list(self.train.paths) + [Path(store_root) / row["path"] for row in rows]
        labels = list(self.train.labels) + [lookup[row["class_name"]] for row in rows]
        ds = ImageListDataset(paths, labels, self._transform(recipe), self.pre.mode)
        return _seeded_loader(ds, recipe.batch_size, seed, recipe.num_workers)

    def eval_loader(self, batch_size: int = 64) -> DataLoader:
        ds = ImageListDataset(self.val.paths, self.val.labels, eval_transform(self.pre), self.pre.mode)
        return DataLoader(ds, batch_size=batch_size)

    def _stack(self, paths: Sequence[Path], labels: Sequence[int]) -> tuple[Tensor, Tensor]:
        ds = ImageListDataset(list(paths), list(labels), eval_transform(self.pre), self.pre.mode)
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True) if len(ds) else ((), ())
        return (torch.stack(xs) if xs else torch.empty(0)), torch.tensor(ys, dtype=torch.long)

    def eval_inputs(self, limit: int | None = None) -> tuple[Tensor, Tensor]:
        return self._stack(self.val.paths[:limit], self.val.labels[:limit])

    def synthetic_inputs(self, store_root: Path, rows: Sequence[dict[str, str]] | None = None
                         ) -> tuple[Tensor, Tensor]:
        rows = SyntheticStore(store_root).rows() if rows is None else rows
        lookup = {n: i for i, n in enumerate(self.class_names)}
        return self._stack([Path(store_root) / r["path"] for r in rows], [lookup[r["class_name"]] for r in rows])


DataSource = FashionMNISTLT | ImageFolderSource
