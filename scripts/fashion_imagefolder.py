"""Write Fashion-MNIST-LT as ImageFolders, the demo's data in the layout `longtail mine` takes.

    python scripts/fashion_imagefolder.py runs/fmnist_if [--val 3000] [--clean]

train/: the demo's long-tailed subset (1000 ... 10 per class, data seed 0) with the demo's rare modes inside
classes (rotated, in a corner, ... at 3% each: `data.nuisance` of the demo config; `--clean` leaves them out, the
earlier testbed of configs/clean.yaml); val/: the first --val test images (clean, as the demo's test set).
Images are padded to 32 px, as the demo's classifier and generator see them. Existing files are kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from longtail.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from longtail.data.sources import FashionMNISTLT


def demo_nuisance() -> dict[str, float]:
    """The rare-mode rates of the demo's data (``data.nuisance`` of the packaged demo config)."""
    from longtail.jobs.mine_config import load_demo_config

    return dict(load_demo_config().data.nuisance or {})


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, 1, H, W] in [-1, 1] -> [N, H, W] uint8 (the inverse of ``to_model_range`` on 8-bit images)."""
    return np.clip(np.rint((images[:, 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)


def export(root: Path, val: int = 3000, data_seed: int = 0, n_max: int = 1000, imbalance: float = 100,
           nuisance: dict[str, float] | None = None) -> int:
    """Write ``root/{train,val}/<class>/<i>.png``; returns the number of images written. The defaults with
    ``nuisance=demo_nuisance()`` are the demo's data (``FashionMNISTLT`` as the demo builds it)."""
    source = FashionMNISTLT(n_max=n_max, imbalance=imbalance, data_seed=data_seed, nuisance=nuisance)
    tx, ty = load_fashion_mnist("test")
    test = np.pad(tx[:val].numpy(), ((0, 0), (2, 2), (2, 2)))
    written = 0
    splits = {"train": (to_uint8(source.train_x.numpy()), source.train_y), "val": (test, ty[:val])}
    for split, (xs, ys) in splits.items():
        for i, (img, label) in enumerate(zip(xs, ys.tolist(), strict=True)):
            path = root / split / FASHION_MNIST_CLASSES[label] / f"{i}.png"
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(img).save(tmp)
            tmp.replace(path)
            written += 1
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--val", type=int, default=3000, help="test images for the validation folder")
    parser.add_argument("--clean", action="store_true", help="leave out the rare modes (configs/clean.yaml's data)")
    args = parser.parse_args()
    written = export(args.out, args.val, nuisance=None if args.clean else demo_nuisance())
    print(f"wrote {written} images under {args.out}")
