"""The embedded generator's training data from an ImageFolder (``longtail train-generator --data DIR``).

Images are decoded by :func:`longtail.data.imagefolder.load_image` (the one decoder for the user's files), resized
(shorter side, antialiased) and center-cropped to a square side, and kept in memory as uint8 ``[N, C, S, S]``
(one byte per value; converted to [-1, 1] per batch). Defaults come from the data: 1 channel when every image is
stored as grayscale, else 3; the side is the median shorter side rounded to a multiple the model accepts.

Captions file (optional, one caption per image): a CSV file with a header row and two columns, the image's path
(``path``, or ``file_name`` as in the metadata.csv of Hugging Face's imagefolder loader) relative to the data
folder (or absolute), and its caption (``caption`` or ``text``)::

    path,caption
    coat/0001.png,"a photo of a coat, dark, tilted left"

Images without a row are trained with their class prompt only.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..config import ConfigError
from ..data.datasets import DataError
from ..data.imagefolder import IMAGE_EXTENSIONS, is_hidden, load_image

GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")
PATH_COLUMNS = ("path", "file_name")
CAPTION_COLUMNS = ("caption", "text")


def image_modes(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """``(PIL mode, width, height)`` of each image, read from its header only."""
    out = []
    for path in paths:
        with Image.open(path) as img:
            out.append((img.mode, img.width, img.height))
    return out


def infer_channels(modes: Sequence[tuple[str, int, int]]) -> int:
    """1 when every image is stored as grayscale (PIL modes :data:`GRAYSCALE_MODES`), else 3."""
    return 1 if all(mode in GRAYSCALE_MODES for mode, _, _ in modes) else 3


def round_size(size: float, multiple: int) -> int:
    """``size`` rounded to the nearest positive multiple of ``multiple`` (halves round up)."""
    return max(multiple, int(size / multiple + 0.5) * multiple)


def infer_size(modes: Sequence[tuple[str, int, int]], multiple: int) -> int:
    """The median shorter side of the images, rounded to a multiple of ``multiple`` (:func:`round_size`)."""
    return round_size(statistics.median(min(w, h) for _, w, h in modes), multiple)


def check_size(size: int, multiple: int, name: str = "image_size (--size)") -> None:
    """Raise ConfigError naming the setting ``name`` and the nearest valid sides unless ``size`` is a positive
    multiple of ``multiple``."""
    if size <= 0 or size % multiple:
        lower = max(multiple, size // multiple * multiple)
        raise ConfigError(f"{name} {size} is not a multiple of {multiple} (the VAE's factor times the UNet's "
                          f"down-sampling); try {lower} or {lower + multiple}")


def load_images(paths: Sequence[Path], size: int, channels: int, show: bool = True) -> Tensor:
    """uint8 ``[N, channels, size, size]``: each image decoded (``load_image``), its shorter side resized to
    ``size`` (antialiased), center-cropped. Raises DataError naming an unreadable file."""
    pipeline = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    mode = "L" if channels == 1 else "RGB"
    out = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="images", disable=not show)):
        out[i] = pipeline(load_image(path, mode))
    return out


def unlabeled_paths(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (any depth, hidden entries skipped), sorted. Raises DataError when
    ``root`` is not a directory or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"unlabeled image folder {root} does not exist or is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(is_hidden(part) for part in p.relative_to(root).parts))
    if not paths:
        raise DataError(f"unlabeled image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _column(header: Sequence[str], names: Sequence[str], path: Path) -> str:
    found = [n for n in names if n in header]
    if not found:
        raise DataError(f"{path}: the header needs a column {' or '.join(map(repr, names))}, got {list(header)}")
    return found[0]


def read_captions(path: str | Path, root: str | Path, images: Sequence[Path]) -> list[str | None]:
    """The caption of each of ``images`` from a captions CSV (module docstring), None where it has none.

    Paths in the file are relative to ``root`` (the data folder) or absolute. Raises DataError naming the file
    and line for a missing header column, an image that is not among ``images``, an image listed twice, or an
    empty caption.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DataError(f"captions file {path} does not exist")
    where = {p.resolve(): i for i, p in enumerate(images)}
    captions: list[str | None] = [None] * len(images)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        path_col, text_col = _column(header, PATH_COLUMNS, path), _column(header, CAPTION_COLUMNS, path)
        for row in reader:
            line = reader.line_num
            name, text = (row.get(path_col) or "").strip(), (row.get(text_col) or "").strip()
            target = Path(name) if Path(name).is_absolute() else root / name
            index = where.get(target.resolve())
            if index is None:
                raise DataError(f"{path}:{line}: {name!r} is not an image of {root}")
            if captions[index] is not None:
                raise DataError(f"{path}:{line}: {name!r} has a caption already; give one caption per image")
            if not text:
                raise DataError(f"{path}:{line}: the caption of {name!r} is empty")
            captions[index] = text
    return captions


def folder_prompt_table(labels: Sequence[int], class_names: Sequence[str], captions: Sequence[str | None],
                        class_prompt: Callable[[str], str]) -> tuple[list[str], Tensor]:
    """Unique prompts and per-image prompt indices ``[N, 4]``: (empty prompt, class prompt, caption, caption),
    the class prompt standing in for a missing caption; the layout of ``longtail.models.tiny.build_prompt_table``
    that ``train_unet`` draws from. ``class_prompt(name) -> str``."""
    table: dict[str, int] = {"": 0}

    def index(prompt: str) -> int:
        return table.setdefault(prompt, len(table))

    rows = []
    for label, caption in zip(labels, captions, strict=True):
        cls = index(class_prompt(class_names[int(label)]))
        own = index(caption) if caption else cls
        rows.append([0, cls, own, own])
    return list(table), torch.tensor(rows, dtype=torch.long)


@dataclass
class FolderData:
    """What ``train-generator --data`` trains on: uint8 ``images [N, C, S, S]`` with ``labels`` (positions in
    ``class_names``) and ``captions`` (None: class prompt only), and the autoencoder's extra unlabeled images."""

    images: Tensor
    labels: list[int]
    class_names: list[str]
    captions: list[str | None]
    unlabeled: Tensor | None
    counts: list[int]
