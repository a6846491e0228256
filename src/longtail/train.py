"""Classifier training and fine-tuning (METHOD.md section 4 recipe: Adam, cosine LR, rotation/crop/flip).

Works on in-memory tensors (the embedded default) through ``fit``; the base loss trains the classifier and
the oracle loss trains its Epistemic Head in the same step (the head's inputs are detached, so the two
losses never interact). ``predict`` returns logits and head logits for a whole tensor dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .augment import make_augment
from .heads import ClassifierOutput, EpistemicClassifier, as_output, oracle_loss


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU x2, the first two max-pooled), global average pool, linear head ``fc``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            ]
            return [*layers, nn.MaxPool2d(2)] if pool else layers

        self.features = nn.Sequential(
            *block(in_channels, width, True), *block(width, 2 * width, True), *block(2 * width, 4 * width, False),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@dataclass
class TrainConfig:
    """Fit / fine-tune recipe. ``lr`` 1e-3 with Adam and cosine annealing as in the paper's A.1."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    rotation: float = 15.0  # degrees, +-
    translate: float = 2.0  # pixels, +- (the small-image analog of random crops)
    hflip: bool = True
    augment: str | None = None  # an extra baseline augmentation: longtail.augment.AUGMENTATIONS
    seed: int = 0


def augment(x: Tensor, cfg: TrainConfig, generator: torch.Generator) -> Tensor:
    """Per-sample random rotation, translation and horizontal flip of a batch ``[B, C, H, W]`` in one resample.

    torchvision's v2 transforms draw one set of parameters per call; a batched ``affine_grid`` keeps the
    per-sample randomness at the cost of one ``grid_sample``.
    """
    b, _, h, w = x.shape
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(cfg.rotation)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * cfg.translate * 2 / torch.tensor([w, h])
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(b)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    ).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)  # pad with each image's own background level
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


def fit(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: TrainConfig,
    weights: Tensor | None = None,
    desc: str = "train",
    show: bool = True,
) -> list[float]:
    """Train ``model`` on ``images [N, C, H, W]``, ``labels [N]``; returns the mean loss per epoch.

    The loss is cross-entropy on the base logits plus, for an ``EpistemicClassifier``, the oracle loss on the
    head logits. ``weights [N]`` optionally weight examples in the base loss (e.g. synthetic vs real).
    """
    if len(images) != len(labels):
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    extra = make_augment(cfg.augment, int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    history: list[float] = []
    model.train()
    for _ in tqdm(range(cfg.epochs), desc=desc, disable=not show, leave=False):
        total, count = 0.0, 0
        for idx in torch.randperm(len(images), generator=gen).split(cfg.batch_size):
            if len(idx) < 2:  # BatchNorm needs two examples
                continue
            x, y = augment(images[idx], cfg, gen), labels[idx]
            if extra is not None:
                x, y = extra(x, y, gen)
            out = as_output(model(x))
            ce = F.cross_entropy(out.logits, y, reduction="none")
            loss = (ce * weights[idx]).sum() / weights[idx].sum() if weights is not None else ce.mean()
            if out.head_logits is not None:
                loss = loss + oracle_loss(out.head_logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        history.append(total / max(1, count))
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512) -> ClassifierOutput:
    """Base logits ``[N, C]`` (and head logits ``[N, K, C]``) for a tensor dataset, in eval mode."""
    model.eval()
    outs = [as_output(model(x)) for x in images.split(batch_size)]
    heads = [o.head_logits for o in outs]
    return ClassifierOutput(
        logits=torch.cat([o.logits for o in outs]),
        head_logits=torch.cat(heads) if all(h is not None for h in heads) else None,
    )


def make_classifier(num_classes: int = 10, width: int = 32, num_heads: int = 5, seed: int = 0) -> EpistemicClassifier:
    """The embedded default's classifier: ``SmallCNN`` plus an Epistemic Head of ``num_heads``."""
    torch.manual_seed(seed)
    return EpistemicClassifier(SmallCNN(1, num_classes, width), num_heads=num_heads, seed=seed)


# --- DataLoader path (user data of any size; runs under `accelerate launch` as on one device) ---------------


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine annealing from ``base_lr`` to 0 over ``total_steps`` (one schedule across all mining rounds)."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def fit_loader(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    cfg: TrainConfig,
    *,
    accelerator: object | None = None,
    first_epoch: int = 0,
    last_epoch: int | None = None,
    total_epochs: int | None = None,
    num_classes: int | None = None,
    desc: str = "fine-tune",
    show: bool = True,
) -> list[float]:
    """Train epochs ``[first_epoch, last_epoch)`` of a cosine schedule over ``total_epochs`` on a DataLoader.

    Base cross-entropy plus the oracle loss for Epistemic Heads, Adam as in the paper's A.1. The loader's own
    transforms do the augmentation. ``accelerator`` (an ``accelerate.Accelerator``) shards batches across
    processes under ``accelerate launch``; without one, an ``Accelerator()`` for the local device is made.
    A fresh Adam starts each call (each mining round); the learning rate continues the global schedule.
    ``cfg.augment == "cutmix"`` mixes each batch (needs ``num_classes``); other baselines belong in the loader's
    transforms (``longtail.data.imagefolder.train_transform(extra=...)``).
    """
    from accelerate import Accelerator
    from torchvision.transforms import v2

    acc = accelerator or Accelerator()
    last_epoch = cfg.epochs if last_epoch is None else last_epoch
    total_epochs = total_epochs or last_epoch
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mixer = v2.CutMix(num_classes=num_classes) if cfg.augment == "cutmix" else None
    if mixer is not None and num_classes is None:
        raise ValueError("cutmix needs num_classes")
    model, opt, loader = acc.prepare(model, opt, loader)
    steps_per_epoch = len(loader)
    history: list[float] = []
    model.train()
    for epoch in tqdm(range(first_epoch, last_epoch), desc=desc, disable=not (show and acc.is_main_process),
                      leave=False):
        total = torch.zeros((), device=acc.device)
        count = 0
        for i, (x, y) in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, epoch * steps_per_epoch + i, total_epochs * steps_per_epoch)
            if mixer is not None:
                x, y = mixer(x, y)
            out = as_output(model(x))
            loss = F.cross_entropy(out.logits, y)
            if out.head_logits is not None:
                loss = loss + oracle_loss(out.head_logits, y)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            total += loss.detach() * len(y)
            count += len(y)
        history.append(float(acc.reduce(total, "sum")) / max(1, count * acc.num_processes))
    model.eval()
    acc.wait_for_everyone()
    return history


@torch.no_grad()
def predict_loader(model: nn.Module, loader: torch.utils.data.DataLoader, accelerator: object | None = None
                   ) -> tuple[ClassifierOutput, Tensor]:
    """Logits (and head logits) plus labels over a DataLoader, gathered from every process."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator()
    model, loader = acc.prepare(model, loader)
    model.eval()
    logits, heads, labels = [], [], []
    for x, y in loader:
        out = as_output(model(x))
        logits.append(acc.gather_for_metrics(out.logits))
        heads.append(acc.gather_for_metrics(out.head_logits) if out.head_logits is not None else None)
        labels.append(acc.gather_for_metrics(y))
    head_logits = torch.cat(heads).cpu() if heads and all(h is not None for h in heads) else None
    return ClassifierOutput(logits=torch.cat(logits).cpu(), head_logits=head_logits), torch.cat(labels).cpu()
