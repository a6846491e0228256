"""Write Fashion-MNIST-LT as ImageFolders, the demo's data in the layout `longtail mine` takes.

    python scripts/fashion_imagefolder.py runs/fmnist_if [--val 3000]

train/: the demo's long-tailed subset (1000 ... 10 per class, data seed 0); val/: the first --val test images.
Images are padded to 32 px, as the demo's classifier and generator see them. Existing files are kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from longtail.data.datasets import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    longtail_counts,
    longtail_indices,
)


def export(root: Path, val: int = 3000, data_seed: int = 0, n_max: int = 1000, imbalance: float = 100) -> int:
    """Write ``root/{train,val}/<class>/<i>.png``; returns the number of images written. The defaults are the
    demo's data (``DemoConfig.data``)."""
    x, y = load_fashion_mnist("train")
    idx = longtail_indices(y, longtail_counts(n_max, imbalance), data_seed)
    tx, ty = load_fashion_mnist("test")
    written = 0
    for split, (xs, ys) in {"train": (x[idx], y[idx]), "val": (tx[:val], ty[:val])}.items():
        for i, (img, label) in enumerate(zip(xs.numpy(), ys.tolist(), strict=True)):
            path = root / split / FASHION_MNIST_CLASSES[label] / f"{i}.png"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(np.pad(img, 2)).save(tmp)
            tmp.replace(path)
            written += 1
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--val", type=int, default=3000, help="test images for the validation folder")
    args = parser.parse_args()
    print(f"wrote {export(args.out, args.val)} images under {args.out}")
