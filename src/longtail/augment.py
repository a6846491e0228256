"""Augmentation baselines of the paper's comparison tables (Cutout, GridMask, RandAugment, AutoAugment, AugMix,
CutMix), applied to training batches on top of the base recipe's rotation / shift / flip.

All take and return a batch ``x [B, C, H, W]`` in [-1, 1] and targets ``y [B]`` (class ids) or ``[B, K]``
(probabilities: CutMix mixes labels). torchvision's v2 transforms do the work; GridMask, which no installed
library has, is written out here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2

BatchAugment = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]


def _to_uint8(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _from_uint8(x: Tensor) -> Tensor:
    return x.float() / 127.5 - 1


def _per_image(transform: Callable[[Tensor], Tensor]) -> BatchAugment:
    """Apply a uint8 image transform to each image separately (v2 draws one parameter set per call)."""

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # v2 samples from the global RNG: seed it from ours for reproducibility
            out = torch.stack([transform(img) for img in _to_uint8(x)])
        return _from_uint8(out), y

    return run


def cutout(x: Tensor, y: Tensor, gen: torch.Generator, size: float = 0.25) -> tuple[Tensor, Tensor]:
    """Cutout (DeVries and Taylor): one square of side ``size * H`` per image set to the background level."""
    b, _, h, w = x.shape
    side = max(1, round(size * h))
    cy = torch.randint(0, h, (b,), generator=gen)
    cx = torch.randint(0, w, (b,), generator=gen)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    mask = ((rows - cy.view(-1, 1, 1)).abs() <= side // 2) & ((cols - cx.view(-1, 1, 1)).abs() <= side // 2)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.where(mask.unsqueeze(1), background, x), y


def gridmask(x: Tensor, y: Tensor, gen: torch.Generator, ratio: float = 0.5) -> tuple[Tensor, Tensor]:
    """GridMask (Chen et al. 2020): drop a regular grid of squares with a random period and offset per image."""
    b, _, h, w = x.shape
    period = torch.randint(max(2, h // 6), max(3, h // 2), (b,), generator=gen).view(-1, 1, 1)
    keep = (period.float() * (1 - ratio)).round().long().clamp_min(1)
    oy = torch.randint(0, h, (b,), generator=gen).view(-1, 1, 1)
    ox = torch.randint(0, w, (b,), generator=gen).view(-1, 1, 1)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    drop = (((rows + oy) % period) >= keep) & (((cols + ox) % period) >= keep)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.where(drop.unsqueeze(1), background, x), y


def cutmix(num_classes: int) -> BatchAugment:
    """CutMix (Yun et al.): paste a box from another image of the batch; labels mix by box area."""
    mixer = v2.CutMix(num_classes=num_classes)

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return mixer(x, y)

    return run


def make_augment(name: str | None, num_classes: int) -> BatchAugment | None:
    """The named baseline augmentation (``None`` / ``"none"``: only the base recipe)."""
    if name in (None, "", "none"):
        return None
    table: dict[str, Callable[[], BatchAugment]] = {
        "cutout": lambda: cutout,
        "gridmask": lambda: gridmask,
        "randaugment": lambda: _per_image(v2.RandAugment()),
        "autoaugment": lambda: _per_image(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)),
        "augmix": lambda: _per_image(v2.AugMix()),
        "cutmix": lambda: cutmix(num_classes),
    }
    if name not in table:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(table)}")
    return table[name]()


AUGMENTATIONS = ("cutout", "gridmask", "randaugment", "autoaugment", "augmix", "cutmix")


class _GridMaskImage(torch.nn.Module):
    """GridMask on one image tensor ``[C, H, W]`` (any normalisation: dropped cells take the image minimum)."""

    def forward(self, x: Tensor) -> Tensor:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        return gridmask(x.unsqueeze(0), torch.zeros(1), gen)[0][0]


def image_augment(name: str | None) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """Per-image baseline transforms for the DataLoader path: (ops on uint8 images, ops on normalised tensors).

    CutMix mixes a batch, so it is not here: ``longtail.train.fit_loader`` applies it per batch.
    """
    if name in (None, "", "none", "cutmix"):
        return [], []
    uint8_ops = {"randaugment": v2.RandAugment, "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
                 "augmix": v2.AugMix}
    if name in uint8_ops:
        return [uint8_ops[name]()], []
    if name == "cutout":
        return [], [v2.RandomErasing(p=1.0, scale=(0.0625, 0.0625), ratio=(1.0, 1.0), value=0.0)]
    if name == "gridmask":
        return [], [_GridMaskImage()]
    raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}")
