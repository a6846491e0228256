"""A second real domain, offline: scikit-learn's handwritten digits as a long-tailed ImageFolder.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1,797 images of 8x8 pixels, values 0..16, 174 to 183
per digit; no download). :func:`write_digits_lt` splits every digit by a seed into test, validation and a pool,
keeps a long-tailed number of the pool for training (``n_max * imbalance ** (-c / 9)`` for digit ``c``: digit 0
the most frequent, 9 the rarest), and writes the three splits as ImageFolders of grayscale PNGs upsampled to
``size`` pixels (bilinear), class folders named ``zero`` .. ``nine`` (names a text encoder knows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..files import write_json

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def lt_counts(n_max: int, imbalance: float, classes: int = 10) -> list[int]:
    """Exponential profile ``round(n_max * imbalance ** (-c / (classes - 1)))`` for ``c = 0 .. classes - 1``."""
    return [max(1, round(n_max * imbalance ** (-c / (classes - 1)))) for c in range(classes)]


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[1797, 8, 8]`` in 0..255 (the 0..16 values times 255/16, rounded) and int labels ``[1797]``.

    Raises RuntimeError when scikit-learn is not installed (``pip install scikit-learn``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise RuntimeError("the digits domain needs scikit-learn (`pip install scikit-learn`)") from err
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def write_digits_lt(
    root: str | Path,
    size: int = 16,
    n_max: int = 100,
    imbalance: float = 20.0,
    val_per_class: int = 30,
    test_per_class: int = 40,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``root/{train,val,test}/<digit name>/<index>.png`` and ``root/split.json`` (counts, settings).

    Per digit, a permutation drawn with ``seed`` gives the first ``test_per_class`` images to test, the next
    ``val_per_class`` to validation and the next :func:`lt_counts` ``[c]`` to training; the same arguments write
    the same files. Raises ValueError when a digit has too few images for its three parts.
    """
    root = Path(root)
    images, labels = load_digits_images()
    counts = lt_counts(n_max, imbalance)
    rng = np.random.default_rng(seed)
    split: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for c, name in enumerate(DIGIT_NAMES):
        pool = rng.permutation(np.flatnonzero(labels == c))
        need = test_per_class + val_per_class + counts[c]
        if len(pool) < need:
            raise ValueError(f"digit {c} has {len(pool)} images, fewer than the {need} its splits need")
        parts = {"test": pool[:test_per_class], "val": pool[test_per_class : test_per_class + val_per_class],
                 "train": pool[test_per_class + val_per_class : need]}
        for part, idx in parts.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx.tolist():
                img = Image.fromarray(images[i], "L").resize((size, size), Image.BILINEAR)
                img.save(folder / f"{i:04d}.png")
            split[part][name] = len(idx)
    write_json(root / "split.json", {"size": size, "n_max": n_max, "imbalance": imbalance, "seed": seed,
                                     "val_per_class": val_per_class, "test_per_class": test_per_class,
                                     "counts": split})
    return {part: root / part for part in ("train", "val", "test")}
