"""User data as ImageFolders (``<root>/<class>/<image>``): scanning with clear errors, datasets, transforms.

``scan_imagefolder`` checks what a run would otherwise trip over hours later: a missing root, a class folder
the classifier expects but the data lacks (or the reverse), an empty class, an unreadable image. Corrupt
images are reported by path and skipped only when the caller allows it, never silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .datasets import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageIndex:
    """Image paths with class ids, the class names (folder order or the given order), and what was skipped."""

    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> list[int]:
        return torch.bincount(torch.tensor(self.labels, dtype=torch.long), minlength=len(self.class_names)).tolist()


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a JSON list (or ``{index: name}`` object) or a text file with one name per line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"class-name file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json" or text.lstrip()[:1] in "[{":
        names = json.loads(text)
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{p}: expected a JSON list of class names")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_image(path: Path) -> str | None:
    """None if PIL can read the image, else the reason."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:  # verify() leaves the file unusable; a real decode catches truncation
            img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def scan_imagefolder(
    root: str | Path,
    class_names: Sequence[str] | None = None,
    allow_corrupt: bool = False,
    verify: bool = True,
) -> ImageIndex:
    """Index ``root/<class>/*``; with ``class_names`` the folders must match them exactly (any order on disk).

    Raises ``DataError`` naming the problem: missing root, missing or unexpected class folder, empty class,
    unreadable image (unless ``allow_corrupt``, which records it in ``skipped``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = folders
    else:
        missing = [c for c in class_names if c not in folders]
        extra = [f for f in folders if f not in class_names]
        if missing or extra:
            raise DataError(
                f"{root}: class folders do not match the classifier's classes: "
                + (f"missing folders {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"folders not among the classes {extra}" if extra else "")
            )
    if not class_names:
        raise DataError(f"{root} has no class folders")
    index = ImageIndex([], [], list(class_names))
    for label, name in enumerate(class_names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for path in files:
            problem = _check_image(path) if verify else None
            if problem is not None:
                if not allow_corrupt:
                    raise DataError(f"{path}: unreadable image ({problem}); fix or remove it, or allow skipping "
                                    "corrupt images (--allow-corrupt)")
                index.skipped.append((str(path), problem))
                continue
            index.paths.append(path)
            index.labels.append(label)
    return index


class ImageListDataset(Dataset):
    """``(image tensor, label)`` from paths; ``mode`` "L" or "RGB" converts on load."""

    def __init__(self, paths: Sequence[Path | str], labels: Sequence[int], transform: v2.Transform,
                 mode: str = "RGB") -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform, self.mode = list(paths), list(labels), transform, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            with Image.open(self.paths[i]) as img:
                image = img.convert(self.mode)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{self.paths[i]}: unreadable image ({err})") from err
        return self.transform(image), self.labels[i]


@dataclass
class Preprocess:
    """Classifier input: square ``size``, normalisation ``mean``/``std`` per channel, ``channels`` (1 or 3)."""

    size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channels: int = 3
    crop_pct: float = 0.875

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


def train_transform(pre: Preprocess, rotation: float = 15.0, hflip: bool = True, extra: str | None = None
                    ) -> v2.Transform:
    """The paper's fine-tuning augmentations: random resized crop to ``size``, rotation +-15 degrees, flips.

    ``extra`` names a baseline (``longtail.augment.AUGMENTATIONS``): the pixel policies (RandAugment,
    AutoAugment, AugMix) act here on uint8 images, before normalisation; Cutout, GridMask and CutMix add nothing
    here because ``longtail.train.fit`` applies them per batch from ``TrainConfig.augment`` (on this path and the
    in-memory one alike, filling with the image's minimum). Raises ``ValueError`` for an unknown name.
    """
    from ..augment import image_augment

    ops: list[v2.Transform] = [v2.PILToTensor(), v2.RandomResizedCrop(pre.size, scale=(0.5, 1.0), antialias=True)]
    if rotation:
        ops.append(v2.RandomRotation(rotation))
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose([*ops, *image_augment(extra), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(pre.mean, pre.std)])


def eval_transform(pre: Preprocess) -> v2.Transform:
    """Resize the shorter side to ``size / crop_pct`` and center-crop ``size``."""
    resize = round(pre.size / pre.crop_pct)
    return v2.Compose([v2.PILToTensor(), v2.Resize(resize, antialias=True), v2.CenterCrop(pre.size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])
