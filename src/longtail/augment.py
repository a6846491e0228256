"""Augmentation baselines of the paper's comparison tables (Cutout, GridMask, RandAugment, AutoAugment, AugMix,
CutMix), applied to training batches on top of the base recipe's rotation / shift / flip.

Two kinds, each applied in one place:

- batch baselines (``BATCH_AUGMENTATIONS``: Cutout, GridMask, CutMix) work in any value range and are applied
  by ``longtail.train.fit`` to every batch, on the in-memory and the DataLoader path alike (``batch_augment``);
- pixel policies (``PIXEL_AUGMENTATIONS``: RandAugment, AutoAugment, AugMix) need uint8 pixels, so they belong
  to the data's own per-image stage: ``image_augment`` (uint8 ops for ``data.imagefolder.train_transform``,
  before normalisation) or ``pixel_augment`` (batches in [-1, 1], ``longtail.train.tensor_augment``).

A ``BatchAugment`` takes a batch ``x [B, C, H, W]``, targets ``y [B]`` (class ids) or ``[B, C]`` (probabilities:
CutMix mixes labels) and a ``torch.Generator`` (all randomness comes from it), and returns ``(x, y)``.
torchvision's v2 transforms do the work; GridMask, which no installed library has, is written out here.
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
    """Cutout (DeVries and Taylor): one square of side ``size * H`` per image set to the image's minimum.

    The one meaning of ``aug:cutout`` on every path: the erased box takes the image's background level (its
    minimum: black on Fashion-MNIST-like data in any normalisation), not a fixed 0, which after mean/std
    normalisation would paint a mid-grey box that the data never contains. ``x [B, C, H, W]``, any device.
    """
    b, _, h, w = x.shape
    side = max(1, round(size * h))
    cy = torch.randint(0, h, (b,), generator=gen)
    cx = torch.randint(0, w, (b,), generator=gen)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    mask = ((rows - cy.view(-1, 1, 1)).abs() <= side // 2) & ((cols - cx.view(-1, 1, 1)).abs() <= side // 2)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.where(mask.unsqueeze(1).to(x.device), background, x), y


def gridmask(x: Tensor, y: Tensor, gen: torch.Generator, ratio: float = 0.5) -> tuple[Tensor, Tensor]:
    """GridMask (Chen et al. 2020): drop a regular grid of squares with a random period and offset per image;
    dropped cells take the image's minimum, as in ``cutout``."""
    b, _, h, w = x.shape
    period = torch.randint(max(2, h // 6), max(3, h // 2), (b,), generator=gen).view(-1, 1, 1)
    keep = (period.float() * (1 - ratio)).round().long().clamp_min(1)
    oy = torch.randint(0, h, (b,), generator=gen).view(-1, 1, 1)
    ox = torch.randint(0, w, (b,), generator=gen).view(-1, 1, 1)
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    drop = (((rows + oy) % period) >= keep) & (((cols + ox) % period) >= keep)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.where(drop.unsqueeze(1).to(x.device), background, x), y


def cutmix(num_classes: int) -> BatchAugment:
    """CutMix (Yun et al.): paste a box from another image of the batch; labels mix by box area."""
    mixer = v2.CutMix(num_classes=num_classes)

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return mixer(x, y)

    return run


PIXEL_AUGMENTATIONS = ("randaugment", "autoaugment", "augmix")  # need uint8 pixels: the data's own stage
BATCH_AUGMENTATIONS = ("cutout", "gridmask", "cutmix")  # any value range: ``longtail.train.fit`` applies them
AUGMENTATIONS = ("cutout", "gridmask", "randaugment", "autoaugment", "augmix", "cutmix")

_UINT8_POLICIES: dict[str, Callable[[], torch.nn.Module]] = {
    "randaugment": v2.RandAugment,
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
    "augmix": v2.AugMix,
}


def _check(name: str | None) -> str | None:
    """``None`` for no baseline (``None``, ``""``, ``"none"``), else the name; raises ``ValueError`` if unknown."""
    if name in (None, "", "none"):
        return None
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(AUGMENTATIONS)}")
    return name


def batch_augment(name: str | None, num_classes: int | None) -> BatchAugment | None:
    """The batch-level baseline (Cutout, GridMask, CutMix) that ``longtail.train.fit`` applies to every batch on
    both paths (in-memory tensors and DataLoaders), or ``None`` for a pixel policy or no baseline.

    These work in any value range: Cutout and GridMask fill with each image's minimum (its background), so
    ``aug:cutout`` means the same on [-1, 1] tensors and on mean/std-normalised ImageFolder batches. CutMix needs
    ``num_classes`` (``ValueError`` without it). Raises ``ValueError`` for an unknown name.
    """
    name = _check(name)
    if name == "cutmix":
        if num_classes is None:
            raise ValueError("cutmix needs num_classes")
        return cutmix(num_classes)
    return {"cutout": cutout, "gridmask": gridmask}.get(name or "")


def pixel_augment(name: str | None) -> BatchAugment | None:
    """The per-image photometric policy (RandAugment, AutoAugment, AugMix) on a batch in [-1, 1] (the in-memory
    tensor path), or ``None`` for a batch baseline or no baseline. Raises ``ValueError`` for an unknown name."""
    name = _check(name)
    return _per_image(_UINT8_POLICIES[name]()) if name in _UINT8_POLICIES else None


def make_augment(name: str | None, num_classes: int) -> BatchAugment | None:
    """The named baseline augmentation on a batch in [-1, 1] (``None`` / ``"none"``: only the base recipe)."""
    return pixel_augment(name) or batch_augment(name, num_classes)


def image_augment(name: str | None) -> list[torch.nn.Module]:
    """Per-image baseline transforms on uint8 images for the DataLoader path (before normalisation): the pixel
    policies. Cutout, GridMask and CutMix are not here: ``longtail.train.fit`` applies them per batch (``[]``).
    Raises ``ValueError`` for an unknown name."""
    name = _check(name)
    return [_UINT8_POLICIES[name]()] if name in _UINT8_POLICIES else []
