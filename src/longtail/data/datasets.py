"""Fashion-MNIST loading and the long-tailed (CIFAR-LT style) subsampling profile.

The raw data are the four gzipped IDX files of Fashion-MNIST, as shipped by the Debian package
``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``. IDX layout (big-endian):
two zero bytes, a dtype code (``0x08`` = uint8), the number of dimensions, one uint32 per dimension,
then the row-major payload. Images are ``2051 = 0x0803`` (3-d), labels ``2049 = 0x0801`` (1-d).

Everything that can go wrong with the files raises :class:`DataError`, whose message names the file.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
ENV_DIR = "LONGTAIL_FASHION_MNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/longtail/fashion-mnist").expanduser()
FASHION_MNIST_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
FILES = tuple(
    f"{prefix}-{kind}-ubyte.gz" for prefix in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
)

IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


def default_data_dir() -> Path:
    """The directory named by ``$LONGTAIL_FASHION_MNIST_DIR`` if set, else the Debian package's directory."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else SYSTEM_DIR


DEFAULT_FASHION_MNIST_DIR: Path = default_data_dir()


# ---------------------------------------------------------------------------------------------------------
# IDX parsing


def _read_bytes(path: Path) -> bytes:
    """Raw file contents, gunzipped when the file is a gzip stream (detected by its magic bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read file: {err}") from err
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt gzip stream ({type(err).__name__}: {err})") from err
    if path.suffix == ".gz":
        raise DataError(f"{path}: name ends in .gz but the file is not a gzip stream")
    return raw


def parse_idx(data: bytes, name: str | Path = "<bytes>", ndim: int | None = None) -> np.ndarray:
    """Parse an uncompressed uint8 IDX buffer into an array of the header's shape.

    ``ndim`` (optional) is the expected number of dimensions, i.e. the magic number must be
    ``0x0800 + ndim``. ``name`` only appears in error messages.
    """
    if len(data) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    magic = struct.unpack(">I", data[:4])[0]
    expected = f" (expected {0x0800 + ndim} for a {ndim}-d uint8 IDX file)" if ndim is not None else ""
    if zero != 0:
        raise DataError(f"{name}: bad magic number {magic} = {magic:#010x}{expected}; not an IDX file")
    if dtype != IDX_UINT8:
        raise DataError(f"{name}: unsupported IDX dtype code {dtype:#04x} (only 0x08 = uint8 is supported)")
    if ndim is not None and dims != ndim:
        raise DataError(f"{name}: bad magic number {magic}: header declares {dims} dimensions{expected}")
    if dims == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(
            f"{name}: truncated header: {dims} dimensions need {header} bytes, file has {len(data)}"
        )
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected_bytes = math.prod(shape)
    payload = len(data) - header
    if payload != expected_bytes:
        what = "truncated" if payload < expected_bytes else "trailing bytes"
        dims_text = "x".join(str(s) for s in shape)
        raise DataError(
            f"{name}: {what}: header says {dims_text} = {expected_bytes} bytes, file has {payload} "
            f"after the {header}-byte header"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read a gzipped or plain uint8 IDX file into a numpy array (shape from the header).

    Raises :class:`DataError` (naming the file) on a corrupt gzip stream, a bad magic number or dtype code,
    an unexpected number of dimensions (when ``ndim`` is given), or a payload of the wrong length.
    """
    path = Path(path)
    return parse_idx(_read_bytes(path), name=path, ndim=ndim)


# ---------------------------------------------------------------------------------------------------------
# Locating, downloading and loading Fashion-MNIST


def _split_files(split: str) -> tuple[str, str]:
    """File names (images, labels) of a split, gzipped form."""
    if split not in SPLIT_PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(SPLIT_PREFIX)}")
    prefix = SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def _find(directory: Path, gz_name: str) -> Path | None:
    """The gzipped file in ``directory``, or its uncompressed twin, or None."""
    for candidate in (directory / gz_name, directory / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _download_file(url: str, dest: Path, ndim: int, timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``dest`` atomically: temp file beside it, parse check, then ``os.replace``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        read_idx(tmp, ndim=ndim)  # refuse to install a file that does not parse
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def download_fashion_mnist(target_dir: str | Path = CACHE_DIR, base_url: str = FASHION_MNIST_URL) -> Path:
    """Download the four official Fashion-MNIST files into ``target_dir`` (skipping those present)."""
    target = Path(target_dir).expanduser()
    for name in FILES:
        if not (target / name).is_file():
            _download_file(base_url + name, target / name, ndim=3 if "images" in name else 1)
    return target


def _missing_message(split: str, searched: Sequence[Path]) -> str:
    images, labels = _split_files(split)
    where = ", ".join(str(d) for d in searched)
    return (
        f"Fashion-MNIST {split} files ({images}, {labels}) not found in: {where}. Fix it with one of:\n"
        f"  * sudo apt-get install dataset-fashion-mnist   (installs them into {SYSTEM_DIR})\n"
        f"  * pass data_dir=... or set {ENV_DIR} to a directory holding the IDX files\n"
        f"  * pass download=True (needs network access) to fetch them into {CACHE_DIR}"
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | Path | None = None, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load a Fashion-MNIST split: images uint8 ``[N, 28, 28]`` and labels int64 ``[N]`` (0..9).

    ``split`` is ``"train"`` (60k) or ``"test"`` (10k, the ``t10k`` files). Without ``data_dir`` the files
    are looked up in :func:`default_data_dir` and then in ``~/.cache/longtail/fashion-mnist``. If they are
    missing and ``download`` is true, the official files are fetched into ``data_dir`` (or the cache).
    """
    image_name, label_name = _split_files(split)
    searched = [Path(data_dir).expanduser()] if data_dir is not None else [default_data_dir(), CACHE_DIR]
    found = None
    for directory in searched:
        image_path, label_path = _find(directory, image_name), _find(directory, label_name)
        if image_path is not None and label_path is not None:
            found = image_path, label_path
            break
    if found is None:
        if not download:
            raise DataError(_missing_message(split, searched))
        target = download_fashion_mnist(searched[0] if data_dir is not None else CACHE_DIR)
        found = target / image_name, target / label_name
    image_path, label_path = found

    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"count mismatch: {image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{label_path}: label {int(labels.max())} out of range 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------
# Pixel ranges


def to_model_range(images: Tensor, pad: int = 2) -> Tensor:
    """uint8 ``[N, H, W]`` -> float32 ``[N, 1, H + 2 pad, W + 2 pad]`` in ``[-1, 1]``, padded with black (-1).

    With the default ``pad=2`` a 28x28 Fashion-MNIST image becomes 32x32.
    """
    if images.dim() != 3:
        raise ValueError(f"expected uint8 images [N, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    x = images.float() / 127.5 - 1.0
    return F.pad(x, (pad, pad, pad, pad), value=-1.0).unsqueeze(1)


def from_model_range(x: Tensor) -> Tensor:
    """float ``[N, 1, H, W]`` in ``[-1, 1]`` -> uint8 ``[N, H, W]`` (clamped and rounded)."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected single-channel images [N, 1, H, W], got shape {tuple(x.shape)}")
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).squeeze(1)


# ---------------------------------------------------------------------------------------------------------
# Long-tail profile and Many / Medium / Few groups


def longtail_counts(n_max: int = 1000, imbalance: float = 100, num_classes: int = 10) -> list[int]:
    """Per-class counts of the exponential CIFAR-LT profile ``n_i = round(n_max * imbalance^(-i / (C - 1)))``.

    Class 0 keeps ``n_max`` examples, class ``C - 1`` keeps ``n_max / imbalance``. The defaults give
    ``[1000, 599, 359, 215, 129, 77, 46, 28, 17, 10]``.
    """
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1, got {imbalance}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return [round(n_max * imbalance ** (-i / (num_classes - 1))) for i in range(num_classes)]


def longtail_indices(labels: Tensor, counts: Sequence[int], seed: int = 0) -> Tensor:
    """Sorted int64 indices into ``labels`` ``[N]``: a seeded random ``counts[c]`` examples per class c."""
    labels = labels.reshape(-1).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(counts)):
        raise ValueError(
            f"labels span {int(labels.min())}..{int(labels.max())} but counts cover 0..{len(counts) - 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c, n in enumerate(counts):
        members = (labels == c).nonzero().squeeze(1)
        if n < 0:
            raise ValueError(f"class {c}: negative count {n}")
        if n > members.numel():
            raise ValueError(f"class {c}: asked for {n} examples but only {members.numel()} are available")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:n]])
    return torch.cat(chosen).sort().values if chosen else torch.empty(0, dtype=torch.long)


def group_of(count: int, many: int = 100, few: int = 20) -> str:
    """Frequency group of a class with ``count`` training examples.

    Usual long-tail convention: ``"many"`` if ``count > many`` (more than 100), ``"few"`` if ``count < few``
    (fewer than 20), otherwise ``"medium"`` (20 to 100 inclusive).
    """
    if few > many:
        raise ValueError(f"few ({few}) must not exceed many ({many})")
    if count > many:
        return "many"
    if count < few:
        return "few"
    return "medium"


def class_groups(train_counts: Sequence[int], many: int = 100, few: int = 20) -> list[str]:
    """:func:`group_of` for each entry of ``train_counts``: ``"many"``, ``"medium"`` or ``"few"``."""
    return [group_of(int(n), many=many, few=few) for n in train_counts]
