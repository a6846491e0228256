"""Shared builders for tests: tiny IDX datasets and a tiny random-weight embedded generator."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from longtail.models.tiny import TinyGeneratorConfig, build_unet, build_vae, save_generator

TINY_GEN = TinyGeneratorConfig(vae_channels=(8, 8, 8), unet_channels=(16, 16), attention_head_dim=4, max_tokens=12)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a gzipped IDX file (uint8 payload) as Fashion-MNIST ships them."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, per_class_train: int = 30, per_class_test: int = 6, seed: int = 0) -> Path:
    """Ten classes of 28x28 blobs whose size and position depend on the class: learnable, fast."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            size = 4 + c
            y0 = 2 + (c * 2) % 10 + rng.integers(0, 3)
            x0 = 2 + rng.integers(0, 28 - size - 4)
            images[i, y0 : y0 + size, x0 : x0 + size] = 120 + 12 * c
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def tiny_generator(root: Path, seed: int = 0) -> Path:
    """An untrained generator with the embedded default's classes and layout (random weights)."""
    torch.manual_seed(seed)
    vae, unet = build_vae(TINY_GEN), build_unet(TINY_GEN)
    vae.register_to_config(scaling_factor=1.0)
    from longtail.data.datasets import FASHION_MNIST_CLASSES

    save_generator(root, vae, unet, {"format": 1, "max_tokens": TINY_GEN.max_tokens,
                                     "class_names": list(FASHION_MNIST_CLASSES)})
    return root
