"""Where a run's real images come from, behind one interface: Fashion-MNIST-LT in memory, or ImageFolders.

A source gives the class names, the real training counts (which set Many / Medium / Few), a DataLoader for
training on real + synthetic images (with the augmentation and the sampling that suit it) and the class counts
of that training set (``class_counts(rows)``, the prior of the long-tail losses in ``longtail.train``), a
DataLoader over the evaluation split, and evaluation / synthetic images as classifier-input tensors for
feature distances. Every job stage goes through it, so the same training loop, evaluation and accelerate path
serve the embedded demo and any user's data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler

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

SAMPLINGS = ("uniform", "class_balanced")
"""``Recipe.sampling`` values: how a training loader draws its examples (``seeded_loader``)."""


def check_sampling(sampling: str) -> None:
    """Raise ``ValueError`` unless ``sampling`` is one of ``SAMPLINGS``."""
    if sampling not in SAMPLINGS:
        allowed = ", ".join(map(repr, SAMPLINGS))
        raise ValueError(f"Recipe.sampling must be one of {allowed}; got {sampling!r}")


@dataclass
class Recipe:
    """How real + synthetic images are fed to training: batch size, augmentation, sampling, loader workers.

    ``rotation`` (degrees, +-) and ``hflip`` apply on both paths; ``translate`` (pixels, +-) is the in-memory
    path's analog of random crops, ``crop`` ("random" resized crop or "center") the ImageFolder path's.
    ``sampling`` (``SAMPLINGS``): "uniform" shuffles every example once per epoch; "class_balanced" draws each
    class equally often (class-balanced sampling as in Kang et al. 2020, "Decoupling Representation and
    Classifier for Long-Tailed Recognition"; ``seeded_loader``). Raises ``ValueError`` for an unknown
    ``sampling``.
    """

    batch_size: int = 128
    rotation: float = 15.0
    translate: float = 2.0
    hflip: bool = True
    crop: str = "random"
    augment: str | None = None  # a baseline augmentation: longtail.augment.AUGMENTATIONS
    num_workers: int = 0
    sampling: str = "uniform"  # SAMPLINGS: "uniform" or "class_balanced"

    def __post_init__(self) -> None:
        check_sampling(self.sampling)


def uint8_to_input(images: Tensor) -> Tensor:
    """Stored grayscale images uint8 ``[N, H, W]`` -> classifier input ``[N, 1, H, W]`` in [-1, 1]."""
    return images.float().unsqueeze(1) / 127.5 - 1.0


def label_counts(labels: Tensor | Sequence[int], num_classes: int) -> list[int]:
    """Examples per class ``[num_classes]`` among ``labels [N]`` (class ids). Raises ``ValueError`` for an id
    outside ``0..num_classes - 1``."""
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels span {int(y.min())}..{int(y.max())} but there are {num_classes} classes")
    return torch.bincount(y, minlength=num_classes).tolist()


def seeded_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, drop_last: bool = False,
                  *, sampling: str = "uniform", labels: Tensor | Sequence[int] | None = None) -> DataLoader:
    """A training DataLoader over ``dataset`` whose order is fixed by ``seed``.

    ``sampling`` "uniform": a seeded shuffle (every example once per epoch). "class_balanced": torch's
    ``WeightedRandomSampler`` with weight ``1 / n_c`` for an example of class ``c`` (``n_c`` counted in
    ``labels [N]``, the dataset's class ids, required), drawing ``len(dataset)`` examples with replacement per
    epoch from the seeded generator, so each class is drawn with probability ``1 / C`` (``C``: the classes
    present). Raises ``ValueError`` for an unknown ``sampling``, or "class_balanced" without ``labels`` of the
    dataset's length.
    """
    check_sampling(sampling)
    gen = torch.Generator().manual_seed(seed)
    if sampling == "uniform":
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen,
                          num_workers=num_workers, drop_last=drop_last)
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if y is None or len(y) != len(dataset):
        raise ValueError(f"sampling 'class_balanced' needs the labels of all {len(dataset)} examples; got "
                         f"{'none' if y is None else len(y)}")
    counts = torch.bincount(y).double()
    sampler = WeightedRandomSampler(1.0 / counts[y], num_samples=len(y), replacement=True, generator=gen)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last)


def validation_indices(labels: Tensor, used: Tensor, per_class: int, seed: int) -> Tensor:
    """Sorted indices of ``per_class`` examples of each class among ``labels [N]`` that are not in ``used``
    (the training subset's indices), drawn with ``seed``. Raises ``ValueError`` when a class has too few
    unused examples; the result never overlaps ``used``."""
    free = torch.ones(len(labels), dtype=torch.bool)
    free[used] = False
    generator = torch.Generator().manual_seed(seed + 1)
    chosen = []
    for c in range(int(labels.max()) + 1):
        members = ((labels == c) & free).nonzero().squeeze(1)
        if members.numel() < per_class:
            raise ValueError(f"data.val_per_class={per_class}: class {c} has only {members.numel()} images outside "
                             "the training subset")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    out = torch.cat(chosen).sort().values
    if bool(torch.isin(out, used).any()):  # cannot happen by construction; the promise is checked, not assumed
        raise ValueError("the validation split overlaps the training subset")
    return out


def _add_rows(counts: list[int], class_names: Sequence[str], rows: Sequence[dict[str, str]]) -> list[int]:
    """``counts [C]`` plus one per synthetic row of each class (by ``row["class_name"]``)."""
    lookup = {n: i for i, n in enumerate(class_names)}
    counts = list(counts)
    for row in rows:
        if row["class_name"] not in lookup:
            raise ValueError(f"synthetic row {row.get('id', '?')!r}: class {row['class_name']!r} is not one "
                             f"of {list(class_names)}")
        counts[lookup[row["class_name"]]] += 1
    return counts


# evaluation batch of the 32 px sources: a batch's activations (8 MB at 128, 34 MB at 512) stay in the allocator's
# reused heap instead of fresh mmaps; 0.68x-0.93x of 512's time on 2 cores, the same logits (benchmarks/demo_levers.py)
EVAL_BATCH = 128


class FashionMNISTLT:
    """Fashion-MNIST with the CIFAR-LT profile, in memory: 32 px grayscale in [-1, 1]. ``n_max``/``imbalance``
    set the profile; ``data_seed`` fixes the subset.

    Evaluation split (``eval_split``): ``test``, the balanced test set (10k), or ``val``, a balanced
    validation split of ``val_per_class`` training images per class that the long-tailed subset does not use
    (seeded by ``data_seed``), on which settings are chosen so the test set is read once per reported table.

    ``nuisance`` (mode -> rate, ``longtail.data.nuisance``): rare modes inside classes, applied at those rates
    to the long-tailed training subset (so the rare classes hold almost none of them) and to the validation
    split; ``nuisance_eval`` lists extra evaluation splits: the evaluation images with one mode on every image
    (a mode name, or ``all`` for one mode per image), the analog of ImageNet-A / -R.
    """

    kind = "fashion_mnist_lt"

    def __init__(self, data_dir: str | None = None, n_max: int = 1000, imbalance: float = 100.0,
                 data_seed: int = 0, many: int = 100, few: int = 20, eval_split: str = "test",
                 val_per_class: int = 500, nuisance: dict[str, float] | None = None,
                 nuisance_eval: Sequence[str] = ()) -> None:
        from .nuisance import MODE_NAMES, assign_modes, nuisance_test_split, with_modes

        if eval_split not in ("test", "val"):
            raise ValueError(f"data.eval_split must be 'test' or 'val', got {eval_split!r}")
        unknown = sorted(set(nuisance_eval) - {*MODE_NAMES, "all"})
        if unknown:
            raise ValueError(f"data.nuisance_eval: unknown modes {unknown}; known: {[*MODE_NAMES, 'all']}")
        images, labels = load_fashion_mnist("train", data_dir)
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.train_counts = longtail_counts(n_max, imbalance, len(self.class_names))
        idx = longtail_indices(labels, self.train_counts, data_seed)
        self.train_x, self.train_y = to_model_range(images[idx]), labels[idx]
        if nuisance:
            self.train_modes = assign_modes(self.train_y, nuisance, seed=data_seed)
            self.train_x = with_modes(self.train_x, self.train_modes, seed=data_seed)
        if eval_split == "val":
            val_idx = validation_indices(labels, idx, val_per_class, data_seed)
            self.eval_x, self.eval_y = to_model_range(images[val_idx]), labels[val_idx]
            if nuisance:
                self.eval_x = with_modes(self.eval_x, assign_modes(self.eval_y, nuisance, data_seed + 1), data_seed + 1)
            self.eval_name = f"Fashion-MNIST validation split ({val_per_class} unused training images per class)"
        else:
            test_images, test_labels = load_fashion_mnist("test", data_dir)
            self.eval_x, self.eval_y = to_model_range(test_images), test_labels
            self.eval_name = "Fashion-MNIST test set (balanced)"
        self.extra = {f"nuisance:{mode}": nuisance_test_split(self.eval_x, self.eval_y, mode, seed=data_seed)
                      for mode in nuisance_eval}
        self.groups = class_groups(self.train_counts, many, few)

    def extra_eval_loaders(self, batch_size: int = EVAL_BATCH) -> dict[str, DataLoader]:
        """The extra evaluation splits (``nuisance:<mode>``), each a DataLoader of ``(x, y)``."""
        return {name: DataLoader(TensorDataset(x, y), batch_size=batch_size) for name, (x, y) in self.extra.items()}

    def describe(self) -> str:
        return f"{sum(self.train_counts)} real training images, per class {self.train_counts}"

    def synthetic_inputs(self, store_root: Path, rows: Sequence[dict[str, str]] | None = None
                         ) -> tuple[Tensor, Tensor]:
        """Synthetic images of ``rows`` (default: all) as classifier input ``[N, 1, 32, 32]`` and labels ``[N]``."""
        ids = None if rows is None else [row["id"] for row in rows]
        images, labels = SyntheticStore(store_root).load(self.class_names, ids=ids)
        return uint8_to_input(torch.from_numpy(images)), torch.from_numpy(labels)

    def class_counts(self, rows: Sequence[dict[str, str]] = ()) -> list[int]:
        """Examples per class ``[C]`` in ``train_loader(recipe, seed, rows, ...)``'s dataset: the real
        training images plus the synthetic ``rows`` (counted by their ``class_name``), for
        ``fit(..., class_counts=source.class_counts(rows))``. Raises ``ValueError`` for a row of an unknown
        class."""
        return _add_rows(label_counts(self.train_y, len(self.class_names)), self.class_names, rows)

    def train_loader(self, recipe: Recipe, seed: int, rows: Sequence[dict[str, str]] = (),
                     store_root: Path | None = None) -> DataLoader:
        """Real + synthetic (``rows`` of the store at ``store_root``) images, drawn as ``recipe.sampling``
        says (``seeded_loader``) with ``seed``; ``class_counts(rows)`` gives the dataset's examples per class.
        The augmentation is applied per batch by the training loop (see ``batch_augment``). Raises
        ``ValueError`` for an unknown ``recipe.sampling``."""
        check_sampling(recipe.sampling)
        x, y = self.train_x, self.train_y
        if rows:
            sx, sy = self.synthetic_inputs(store_root, rows)
            x, y = torch.cat([x, sx]), torch.cat([y, sy])
        # a final batch of one example is dropped: BatchNorm needs two
        return seeded_loader(TensorDataset(x, y), recipe.batch_size, seed,
                             drop_last=len(x) % recipe.batch_size == 1, sampling=recipe.sampling, labels=y)

    def eval_loader(self, batch_size: int = EVAL_BATCH) -> DataLoader:
        return DataLoader(TensorDataset(self.eval_x, self.eval_y), batch_size=batch_size)

    def eval_inputs(self, limit: int | None = None) -> tuple[Tensor, Tensor]:
        """Evaluation images as classifier input ``[N, 1, 32, 32]`` and labels ``[N]`` (the first ``limit``)."""
        return self.eval_x[:limit], self.eval_y[:limit]

    batch_augment = True  # the training loop augments whole batches (rotation, shift, flip per sample)


class ImageFolderSource:
    """Train / val ImageFolders, read through the classifier's own preprocessing ``pre``."""

    kind = "imagefolder"
    batch_augment = False  # the loader's transforms augment each image

    def __init__(self, train: ImageIndex, val: ImageIndex, pre: Preprocess, many: int = 100, few: int = 20,
                 eval_name: str = "validation ImageFolder") -> None:
        self.train, self.val, self.pre = train, val, pre
        self.class_names = list(train.class_names)
        self.train_counts = train.counts()
        self.groups = class_groups(self.train_counts, many, few)
        self.eval_name = eval_name

    def describe(self) -> str:
        c = self.train_counts
        return f"{sum(c)} real training images (per class {min(c)}..{max(c)})"

    def _transform(self, recipe: Recipe):
        if recipe.crop == "center":
            return eval_transform(self.pre)
        if recipe.crop != "random":
            raise ValueError(f"finetune.crop must be 'random' or 'center', got {recipe.crop!r}")
        return train_transform(self.pre, recipe.rotation, recipe.hflip, recipe.augment)

    def class_counts(self, rows: Sequence[dict[str, str]] = ()) -> list[int]:
        """Examples per class ``[C]`` in ``train_loader(recipe, seed, rows, ...)``'s dataset: the real
        training images plus the synthetic ``rows`` (counted by their ``class_name``), for
        ``fit(..., class_counts=source.class_counts(rows))``. Raises ``ValueError`` for a row of an unknown
        class."""
        return _add_rows(label_counts(self.train.labels, len(self.class_names)), self.class_names, rows)

    def train_loader(self, recipe: Recipe, seed: int, rows: Sequence[dict[str, str]] = (),
                     store_root: Path | None = None) -> DataLoader:
        """Real + synthetic (``rows`` of the store at ``store_root``) images through ``recipe``'s transforms,
        drawn as ``recipe.sampling`` says (``seeded_loader``) with ``seed``; ``class_counts(rows)`` gives the
        dataset's examples per class. Raises ``ValueError`` for an unknown ``recipe.sampling`` or ``crop``, or
        a row of an unknown class."""
        check_sampling(recipe.sampling)
        lookup = {n: i for i, n in enumerate(self.class_names)}
        _add_rows([0] * len(self.class_names), self.class_names, rows)  # a clear error for an unknown class
        paths = list(self.train.paths) + [Path(store_root) / row["path"] for row in rows]
        labels = list(self.train.labels) + [lookup[row["class_name"]] for row in rows]
        ds = ImageListDataset(paths, labels, self._transform(recipe), self.pre.mode)
        return seeded_loader(ds, recipe.batch_size, seed, recipe.num_workers, sampling=recipe.sampling,
                             labels=labels)

    def extra_eval_loaders(self, batch_size: int = 64) -> dict[str, DataLoader]:
        """No extra evaluation splits for ImageFolders (the validation folder is the evaluation split)."""
        return {}

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
