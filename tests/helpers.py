"""Test-only helpers: tiny IDX datasets shaped like Fashion-MNIST (tiny models live in ``longtail.testing``)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn


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


CHROMIUM = Path("/usr/bin/chromium")


def chromium_dom(page: Path, profile: Path, fragment: str = "") -> str | None:
    """The DOM of ``page`` (opened at ``#fragment`` when given) as headless Chromium renders it (no network), or
    None when Chromium is not installed."""
    import subprocess

    if not CHROMIUM.exists():
        return None
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    uri = page.as_uri() + (f"#{fragment}" if fragment else "")
    done = subprocess.run([*flags, "--dump-dom", uri], capture_output=True, text=True, timeout=180)
    return done.stdout


class Brightness(nn.Module):
    """A judge that calls an image bright (class 1) or dark (class 0) by its mean brightness m: logits
    (-ln3 m, +ln3 m), so at m = +-0.5 the bright class has probability sigmoid(ln 3) = 3/4. Its head ``fc``
    reads the feature [m]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-math.log(3.0)], [math.log(3.0)]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2, 3))[:, None])


def toy_parts(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(decoder 6 -> 10, classifier 10 -> 3, denoiser 6 -> 6: an eps or velocity model), seeded, for gradient
    checks of the guidance in double precision."""
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(6, 10), nn.Tanh()).to(dtype)
    classifier = nn.Linear(10, 3).to(dtype)
    denoiser = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).to(dtype)
    return decoder, classifier, denoiser
