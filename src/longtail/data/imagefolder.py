"""User data as ImageFolders (``<root>/<class>/<image>``): scanning with clear errors, decoding, datasets.

``scan_imagefolder`` checks what a run would otherwise trip over hours later: a missing root, a class folder
the classifier expects but the data lacks (or the reverse), an empty class, an unreadable image. Folders are
matched to class names *by name* (Unicode NFC, or the folder name ``longtail generate`` writes for a class),
never by position. Hidden entries (``.DS_Store``, ``._*`` macOS resource forks, ``__MACOSX``) are skipped at
every level and counted. Corrupt images are reported by path and skipped only when the caller allows it,
never silently.

``load_image`` is the one decoder for images read from the user's disk: EXIF orientation applied, every PIL
mode converted faithfully (16-bit grayscale scaled, transparency composited, CMYK converted) or refused.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .datasets import DataError
from .store import safe_dirname

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


HIDDEN_NAMES = ("__MACOSX",)  # besides every name that starts with "."


@dataclass
class ImageIndex:
    """Image paths with class ids, the class names (folder order or the given order), and what was skipped.

    ``folders[c]`` is the folder on disk of class ``c`` (None for a class the data lacks, see ``missing``);
    ``skipped`` lists corrupt images left out as ``(path, reason)``; ``hidden`` counts hidden entries
    (``is_hidden``) the scan skipped, files and folders at every level.
    """

    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    folders: list[str | None] = field(default_factory=list)
    hidden: int = 0

    def counts(self) -> list[int]:
        return torch.bincount(torch.tensor(self.labels, dtype=torch.long), minlength=len(self.class_names)).tolist()

    @property
    def missing(self) -> list[str]:
        """Class names with no folder in the data (possible only with ``allow_missing``)."""
        return [name for name, folder in zip(self.class_names, self.folders, strict=True) if folder is None]


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


def is_hidden(name: str) -> bool:
    """Entries a scan skips: names starting with ``.`` (``.DS_Store``, ``._*`` resource forks) and ``__MACOSX``."""
    return name.startswith(".") or name in HIDDEN_NAMES


def _visible(folder: Path) -> tuple[list[Path], int]:
    """The entries of ``folder`` without hidden ones, sorted by name, and how many hidden ones were skipped."""
    entries = sorted(folder.iterdir())
    shown = [p for p in entries if not is_hidden(p.name)]
    return shown, len(entries) - len(shown)


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def match_folders(root: Path, class_names: Sequence[str], folders: Sequence[str]) -> list[str | None]:
    """The folder of each class among ``folders`` (None when absent), compared by name.

    A folder matches a class when their names are equal after Unicode NFC normalisation (macOS writes
    decomposed names), or when it is the folder ``longtail generate`` writes for the class (``safe_dirname``:
    ``ankle boot`` -> ``ankle_boot``). Raises ``DataError`` when two folders are the same name after
    normalisation or one folder would serve two classes.
    """
    by_name: dict[str, str] = {}
    for folder in folders:
        if _nfc(folder) in by_name:
            raise DataError(f"{root}: folders {by_name[_nfc(folder)]!r} and {folder!r} are the same name "
                            "after Unicode normalisation; merge them")
        by_name[_nfc(folder)] = folder
    matched = [by_name.get(_nfc(name)) or by_name.get(safe_dirname(_nfc(name))) for name in class_names]
    for folder in {f for f in matched if f is not None}:
        owners = [n for n, f in zip(class_names, matched, strict=True) if f == folder]
        if len(owners) > 1:
            raise DataError(f"{root}: folder {folder!r} matches more than one class name: {owners}")
    return matched


def _check_image(path: Path) -> str | None:
    """None if the image decodes (``load_image``), else the reason."""
    try:
        with Image.open(path) as img:
            img.verify()
        load_image(path)  # verify() leaves the file unusable; a real decode catches truncation and bad modes
    except DataError as err:
        return str(err).removeprefix(f"{path}: ")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _class_folders(root: Path, folders: list[str], class_names: Sequence[str] | None, allow_missing: bool,
                   num_classes: int | None) -> tuple[list[str], list[str | None]]:
    """(class names, folder per class): the folders themselves without names, else matched by name."""
    if class_names is None:
        if num_classes is not None and len(folders) != num_classes:
            raise DataError(
                f"{root} has {len(folders)} class folders but the classifier has {num_classes} classes, and "
                "without class names the folders cannot be matched to them: pass the classifier's class-name "
                "file (--class-names) or one folder per class"
            )
        return list(folders), list(folders)
    matched = match_folders(root, class_names, folders)
    missing = [c for c, f in zip(class_names, matched, strict=True) if f is None and not allow_missing]
    extra = [f for f in folders if f not in matched]
    if missing or extra:
        raise DataError(
            f"{root}: class folders do not match the classifier's classes: "
            + (f"missing folders {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"folders not among the classes {extra}" if extra else "")
        )
    return list(class_names), matched


def scan_imagefolder(
    root: str | Path,
    class_names: Sequence[str] | None = None,
    allow_corrupt: bool = False,
    verify: bool = True,
    *,
    allow_missing: bool = False,
    num_classes: int | None = None,
) -> ImageIndex:
    """Index ``root/<class>/*``; with ``class_names`` the folders are matched to them by name (``match_folders``,
    any order on disk) and labels are positions in ``class_names``.

    ``allow_missing``: a class without a folder is recorded in ``ImageIndex.missing`` instead of raising (an
    evaluation set may lack a class; a training set may not). Without ``class_names`` the sorted folder names
    are the classes; ``num_classes`` (the classifier's) must then equal the folder count. Hidden entries are
    skipped and counted (``ImageIndex.hidden``).

    Raises ``DataError`` naming the problem: missing root, missing or unexpected class folder, a folder count
    that differs from ``num_classes``, empty class, unreadable image (unless ``allow_corrupt``, which records
    it in ``skipped``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    entries, hidden = _visible(root)
    names, folders = _class_folders(root, [p.name for p in entries if p.is_dir()], class_names, allow_missing,
                                    num_classes)
    if not names:
        raise DataError(f"{root} has no class folders")
    index = ImageIndex([], [], names, folders=folders, hidden=hidden)
    for label, folder in enumerate(folders):
        if folder is not None:
            _index_class(index, root / folder, label, allow_corrupt, verify)
    return index


def _index_class(index: ImageIndex, folder: Path, label: int, allow_corrupt: bool, verify: bool) -> None:
    """Add the images of one class folder to ``index`` (see ``scan_imagefolder`` for the errors)."""
    entries, hidden = _visible(folder)
    index.hidden += hidden
    files = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
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


# --- decoding -----------------------------------------------------------------------------------------------

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit PNG/TIFF as older Pillow opens it
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
COLOUR_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")  # PIL converts these faithfully
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as an image viewer shows them


def _refuse(path: Path, img: Image.Image, why: str) -> DataError:
    return DataError(f"{path}: image mode {img.mode!r} ({why}) is not supported; save it as 8-bit grayscale "
                     "or RGB, choosing how its values map to 0..255")


def _sixteen_to_eight(img: Image.Image, path: Path) -> Image.Image:
    """16-bit grayscale ``[0, 65535]`` -> 8-bit ``L`` by ``round(v / 257)`` (PIL's own convert clips at 255)."""
    values = np.asarray(img)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise _refuse(path, img, f"values {values.min()}..{values.max()} outside the 16-bit range")
    return Image.fromarray(np.round(values.astype(np.float64) / 257.0).astype(np.uint8), "L")


def _composite(img: Image.Image) -> Image.Image:
    """An image with transparency (alpha channel or a transparent colour) flattened over ``ALPHA_BACKGROUND``."""
    background = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")


def convert_image(img: Image.Image, mode: str, path: str | Path = "<image>") -> Image.Image:
    """``img`` in ``mode`` ("L" or "RGB"): 16-bit grayscale scaled to 8 bits, transparency composited over white,
    palette / CMYK / YCbCr / LAB / HSV converted by PIL. Raises ``DataError`` naming ``path`` and the mode for
    modes without a faithful 8-bit version (32-bit float ``F``, premultiplied ``La``, ...)."""
    path = Path(path)
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_to_eight(img, path)
    if img.mode in ALPHA_MODES or (img.mode in COLOUR_MODES and "transparency" in img.info):
        img = _composite(img)
    if img.mode not in COLOUR_MODES:
        why = "floating point, range unknown" if img.mode == "F" else "no faithful 8-bit conversion"
        raise _refuse(path, img, why)
    if img.mode == mode or img.mode in ("1", "L"):
        return img.convert(mode)
    rgb = img.convert("RGB")  # LAB and HSV convert only to RGB; RGB -> L is ITU-R 601-2 luma
    return rgb if mode == "RGB" else rgb.convert("L")


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode the image file at ``path`` as ``mode`` ("L" or "RGB"): the one decoder for the user's images.

    EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), then ``convert_image``. Raises
    ``DataError`` naming the file: unreadable or truncated, or a mode that cannot be converted faithfully.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err
    return convert_image(upright, mode, path)


class ImageListDataset(Dataset):
    """``(image tensor, label)`` from paths, decoded by ``load_image`` as ``mode`` ("L" or "RGB")."""

    def __init__(self, paths: Sequence[Path | str], labels: Sequence[int], transform: v2.Transform,
                 mode: str = "RGB") -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform, self.mode = list(paths), list(labels), transform, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.paths[i], self.mode)), self.labels[i]


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
