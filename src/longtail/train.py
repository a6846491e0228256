"""Classifier training and fine-tuning: one loop for in-memory tensors and DataLoaders (paper A.1: Adam, cosine LR).

``fit(model, loader, cfg)`` trains on any DataLoader under ``accelerate`` (one device, or sharded under
``accelerate launch``); ``fit(model, (images, labels), cfg)`` is the in-memory path: it builds the loader
(``tensor_loader``) and the tensor recipe's per-sample rotation / shift / flip (``tensor_augment``) itself.
The base loss is cross-entropy on the base logits (``TrainConfig.loss`` "ce") or a long-tail-aware form of it
(``base_loss``: "logit_adjusted", Menon et al. 2021; "balanced_softmax", Ren et al. 2020), plus, for an
``EpistemicClassifier``, the oracle loss on the head logits in the same step (the head's inputs are detached,
so the two losses never interact). The learning rate follows one cosine schedule (``cosine_schedule``,
diffusers' scheduler) that a mining loop can split over several calls. ``predict`` / ``predict_loader`` return
logits and head logits for a tensor dataset / a loader.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .augment import BatchAugment, batch_augment, pixel_augment
from .heads import EpistemicClassifier, example_keys, oracle_loss
from .outputs import ClassifierOutput, as_output

if TYPE_CHECKING:
    from accelerate import Accelerator


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


LOSSES = ("ce", "logit_adjusted", "balanced_softmax")
"""``TrainConfig.loss`` values: the base classifier's training loss (``base_loss``)."""

PRIOR_FLOOR = 1e-12  # the prior of a class without examples: a finite log(1e-12), not -inf


def check_loss(loss: str, tau: float) -> None:
    """Raise ``ValueError`` unless ``loss`` is one of ``LOSSES`` and ``tau >= 0``."""
    if loss not in LOSSES:
        raise ValueError(f"TrainConfig.loss must be one of {', '.join(map(repr, LOSSES))}; got {loss!r}")
    if not (isinstance(tau, int | float) and tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"TrainConfig.tau must be a finite number >= 0; got {tau!r}")


def logit_offsets(loss: str, class_counts: Sequence[float] | Tensor | None, tau: float = 1.0
                  ) -> Tensor | None:
    """The per-class term ``[C]`` (float32) that ``loss`` adds to the logits before cross-entropy; ``None``
    for "ce".

    - "logit_adjusted" (Menon et al. 2021, "Long-tail learning via logit adjustment", the logit-adjusted
      softmax cross-entropy): ``tau * log(prior)``, ``prior = class_counts / class_counts.sum()``.
    - "balanced_softmax" (Ren et al. 2020, "Balanced Meta-Softmax for Long-Tailed Visual Recognition", the
      Balanced Softmax): ``log(n_c)``; it differs from "logit_adjusted" at ``tau = 1`` by the constant
      ``log(sum n)``, which softmax ignores, so the two losses are equal.

    ``class_counts [C]``: training examples per class (any non-negative numbers; a class with none gets the
    prior ``PRIOR_FLOOR`` instead of ``log 0``). Raises ``ValueError`` for an unknown ``loss``, ``tau < 0``,
    missing ``class_counts`` when the loss needs them (naming the loss), or counts that are not a 1-D vector
    of finite non-negative numbers with a positive sum.
    """
    check_loss(loss, tau)
    if loss == "ce":
        return None
    if class_counts is None:
        raise ValueError(f"TrainConfig.loss {loss!r} needs the training data's class counts: pass "
                         "fit(..., class_counts=source.class_counts(rows)) (or torch.bincount(labels))")
    counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    if counts.ndim != 1 or len(counts) < 1 or not torch.isfinite(counts).all() or (counts < 0).any() \
            or counts.sum() <= 0:
        raise ValueError("class_counts must be a 1-D vector of finite non-negative counts with a positive "
                         f"sum; got {class_counts!r}")
    if loss == "balanced_softmax":
        return counts.clamp_min(PRIOR_FLOOR * counts.sum()).log().float()
    prior = (counts / counts.sum()).clamp_min(PRIOR_FLOOR)
    return (tau * prior.log()).float()


def base_loss(logits: Tensor, target: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Per-example base loss ``[B]``: cross-entropy of ``logits + offsets`` (``logit_offsets``) against
    ``target`` (class ids ``[B]`` or class probabilities ``[B, C]``, as CutMix makes them).

    ``logits [B, C]``, ``offsets [C]`` or ``None`` (plain cross-entropy). The offsets apply to the training
    loss only: evaluation (``predict``) reads the plain logits (Menon et al. 2021: a model trained with the
    logit-adjusted *loss* predicts with ``argmax f(x)``, no post-hoc correction). Raises ``ValueError`` when
    ``offsets`` do not have ``C`` entries.
    """
    if offsets is None:
        return F.cross_entropy(logits, target, reduction="none")
    if offsets.shape != logits.shape[-1:]:
        raise ValueError(f"class_counts give {offsets.numel()} classes but the classifier has "
                         f"{logits.shape[-1]} logits")
    return F.cross_entropy(logits + offsets.to(logits), target, reduction="none")


@dataclass
class TrainConfig:
    """Fit / fine-tune recipe. ``lr`` 1e-3 with Adam and cosine annealing as in the paper's A.1.

    ``loss``: the base classifier's loss, one of ``LOSSES``: "ce" (cross-entropy), "logit_adjusted" (Menon et
    al. 2021; ``tau`` scales the log prior, 1.0 is the paper's and LiVT's choice) or "balanced_softmax" (Ren
    et al. 2020). The last two need ``fit(..., class_counts=...)``. Raises ``ValueError`` for an unknown
    ``loss`` or ``tau < 0``.
    """

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 128
    rotation: float = 15.0  # degrees, +-
    translate: float = 2.0  # pixels, +- (the small-image analog of random crops)
    hflip: bool = True
    augment: str | None = None  # an extra baseline augmentation: longtail.augment.AUGMENTATIONS
    seed: int = 0
    loss: str = "ce"  # LOSSES: "ce", "logit_adjusted", "balanced_softmax"
    tau: float = 1.0  # logit adjustment's temperature on log(prior) (Menon et al. 2021)

    def __post_init__(self) -> None:
        check_loss(self.loss, self.tau)


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


def tensor_augment(cfg: TrainConfig) -> BatchAugment:
    """The in-memory path's per-image stage (what ``train_transform`` is for ImageFolders): ``augment``'s
    rotation / shift / flip, then ``cfg.augment``'s pixel policy if it is one (RandAugment, AutoAugment, AugMix on
    [-1, 1] batches). Batch baselines (Cutout, GridMask, CutMix) are not here: ``fit`` applies them on every path.
    """
    pixel = pixel_augment(cfg.augment)

    def run(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = augment(x, cfg, gen)
        return pixel(x, y, gen) if pixel is not None else (x, y)

    return run


def tensor_loader(images: Tensor, labels: Tensor, cfg: TrainConfig, weights: Tensor | None = None) -> DataLoader:
    """A shuffled DataLoader over ``images [N, C, H, W]``, ``labels [N]`` (and per-example ``weights [N]``, which
    ``fit`` reads as the batch's third element), ``cfg.batch_size`` per batch, shuffled by a generator seeded
    with ``cfg.seed``. A final batch of one example is dropped (BatchNorm needs two). Raises ``ValueError`` when
    the lengths differ.
    """
    if len(images) != len(labels) or (weights is not None and len(weights) != len(images)):
        sizes = f"images ({len(images)}), labels ({len(labels)})" + (
            f", weights ({len(weights)})" if weights is not None else "")
        raise ValueError(f"{sizes} differ in length")
    tensors = (images, labels) if weights is None else (images, labels, weights)
    return DataLoader(TensorDataset(*tensors), batch_size=cfg.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(cfg.seed),
                      drop_last=len(images) % cfg.batch_size == 1)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, start_step: int = 0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing from the optimizer's ``lr`` to 0 over ``total_steps`` optimizer steps (paper A.1), as
    diffusers' ``get_cosine_schedule_with_warmup`` without warmup: step ``s`` runs at ``0.5 lr (1 + cos(pi s / S))``.

    ``start_step`` resumes the schedule on a fresh optimizer (each mining round: a new Adam, the same global
    schedule); call ``.step()`` after each ``optimizer.step()``. Raises ``ValueError`` unless
    ``0 <= start_step <= total_steps``.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup

    if not 0 <= start_step <= total_steps:
        raise ValueError(f"start_step {start_step} outside the schedule's [0, {total_steps}] steps")
    for group in optimizer.param_groups:  # a scheduler resumed at step > 0 reads its base LR from here
        group.setdefault("initial_lr", group["lr"])
    return get_cosine_schedule_with_warmup(optimizer, 0, total_steps, last_epoch=start_step - 1)


def fit(
    model: nn.Module,
    data: DataLoader | tuple[Tensor, ...] | Tensor,
    cfg: TrainConfig | Tensor,
    *legacy_cfg: TrainConfig,
    accelerator: Accelerator | None = None,
    first_epoch: int = 0,
    last_epoch: int | None = None,
    total_epochs: int | None = None,
    num_classes: int | None = None,
    class_counts: Sequence[float] | Tensor | None = None,
    batch_transform: BatchAugment | None = None,
    desc: str = "train",
    show: bool = True,
) -> list[float]:
    """Train ``model`` in place for epochs ``[first_epoch, last_epoch)`` of a cosine schedule over ``total_epochs``;
    returns the mean loss per epoch (over all processes).

    ``data``: a DataLoader of batches ``(x [B, C, H, W], y [B])`` or ``(x, y, weights [B])``, or the in-memory
    tuple ``(images, labels)`` / ``(images, labels, weights)``, which becomes ``tensor_loader(..., cfg)`` with
    ``batch_transform`` defaulting to ``tensor_augment(cfg)`` and ``num_classes`` to ``labels.max() + 1``.
    Per batch: ``batch_transform(x, y, generator)`` (the data's own augmentation, if any), then the batch baseline
    ``cfg.augment`` names (Cutout, GridMask, CutMix: ``longtail.augment.batch_augment``), then the loss:
    ``cfg.loss`` on the base logits (``base_loss``; weighted per example when the batch has weights) plus, for
    an ``EpistemicClassifier``, the oracle loss on the head logits (unchanged by ``cfg.loss``), or the model's own
    ``head_loss`` (``HeadsOnly(wrapped, loss=HeadLoss(...))``: relaxed / annealed / bootstrap), called with the
    un-augmented batch's ``example_keys`` when it ``needs_keys`` and with the progress ``step / (S - 1)`` through
    the schedule's ``S`` steps. Adam with
    ``cfg.lr`` / ``cfg.weight_decay``, fresh each call, and the learning rate continuing ``cosine_schedule``
    over ``total_epochs`` (paper A.1).

    ``class_counts [C]``: examples per class in ``data`` (real + synthetic; ``source.class_counts(rows)`` for
    a source's ``train_loader``), the prior of "logit_adjusted" / "balanced_softmax"; "ce" ignores it. With a
    class-balanced sampler the batches are already balanced, so adding these losses corrects twice.

    Defaults: ``last_epoch = cfg.epochs``, ``total_epochs = last_epoch``. ``accelerator`` (``accelerate``) shards
    batches under ``accelerate launch``; without one an ``Accelerator()`` for the local device is made. The model
    trains on the accelerator's device and is left on the device it came on, in eval mode. Randomness: the global
    seed and the augmentation generator come from ``cfg.seed`` (and ``first_epoch``), so a seed repeats a run.
    The deprecated form ``fit(model, images, labels, cfg)`` means ``fit(model, (images, labels), cfg)``.

    Raises ``ValueError`` for an epoch range outside ``0 <= first_epoch <= last_epoch <= total_epochs``, CutMix
    without ``num_classes``, an unknown ``cfg.augment`` or ``cfg.loss``, ``cfg.tau < 0``, a loss that needs
    ``class_counts`` without them (naming the loss), or counts whose length is not the number of logits;
    ``TypeError`` for arguments of neither form.
    """
    from accelerate import Accelerator

    if isinstance(data, Tensor):  # the pre-merge form fit(model, images, labels, cfg)
        if not isinstance(cfg, Tensor) or len(legacy_cfg) != 1:
            raise TypeError("fit(model, images, labels, cfg) needs labels and a TrainConfig; prefer "
                            "fit(model, (images, labels), cfg)")
        warnings.warn("fit(model, images, labels, cfg) is deprecated: call fit(model, (images, labels), cfg)",
                      DeprecationWarning, stacklevel=2)
        data, cfg, legacy_cfg = (data, cfg), legacy_cfg[0], ()
    if legacy_cfg or not isinstance(cfg, TrainConfig):
        raise TypeError("call fit(model, loader_or_(images, labels), cfg: TrainConfig, ...)")
    if isinstance(data, tuple):
        num_classes = num_classes or int(data[1].max()) + 1
        batch_transform = batch_transform or tensor_augment(cfg)
        data = tensor_loader(data[0], data[1], cfg, data[2] if len(data) > 2 else None)
    last_epoch = cfg.epochs if last_epoch is None else last_epoch
    total_epochs = last_epoch if total_epochs is None else total_epochs
    if not 0 <= first_epoch <= last_epoch <= total_epochs:
        raise ValueError(f"epochs [{first_epoch}, {last_epoch}) do not lie in a schedule of {total_epochs} epochs")
    mix = batch_augment(cfg.augment, num_classes)
    offsets = logit_offsets(cfg.loss, class_counts, cfg.tau)
    if offsets is not None and num_classes is not None and len(offsets) != num_classes:
        raise ValueError(f"class_counts give {len(offsets)} classes but num_classes is {num_classes}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + first_epoch)  # rounds of one run draw anew
    acc = accelerator or Accelerator()
    offsets = offsets.to(acc.device) if offsets is not None else None  # once, not per batch
    home = next((p.device for p in model.parameters()), None)
    adam = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    net, opt, loader = acc.prepare(model, adam, data)
    steps = len(loader)
    sched = cosine_schedule(adam, total_epochs * steps, first_epoch * steps)
    head_loss = getattr(model, "head_loss", None)  # HeadsOnly's HeadLoss; None: the oracle loss
    step, last_step = first_epoch * steps, max(total_epochs * steps - 1, 1)
    history: list[float] = []
    net.train()
    for _ in tqdm(range(first_epoch, last_epoch), desc=desc, disable=not (show and acc.is_main_process), leave=False):
        total = torch.zeros((), device=acc.device)
        count = torch.zeros((), device=acc.device)
        for batch in loader:
            x, y = batch[0], batch[1]
            keys = example_keys(x) if head_loss is not None and head_loss.needs_keys else None  # before augmenting
            if batch_transform is not None:
                x, y = batch_transform(x, y, gen)
            if mix is not None:
                x, y = mix(x, y, gen)
            out = as_output(net(x))
            ce = base_loss(out.logits, y, offsets)
            loss = (ce * batch[2]).sum() / batch[2].sum() if len(batch) > 2 else ce.mean()
            if out.head_logits is not None:
                loss = loss + (oracle_loss(out.head_logits, y) if head_loss is None
                               else head_loss(out.head_logits, y, keys=keys, progress=step / last_step))
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            sched.step()
            step += 1
            total += loss.detach() * len(x)
            count += len(x)
        history.append(float(acc.reduce(total, "sum") / acc.reduce(count, "sum").clamp_min(1)))
    model.eval()
    acc.wait_for_everyone()
    if home is not None and next(model.parameters()).device != home:
        model.to(home)
    return history


def fit_loader(model: nn.Module, loader: DataLoader, cfg: TrainConfig, **kwargs: Any) -> list[float]:
    """Deprecated alias of ``fit(model, loader, cfg, **kwargs)`` (same loop; ``desc`` defaults to "fine-tune")."""
    warnings.warn("fit_loader is deprecated: call fit(model, loader, cfg, ...)", DeprecationWarning, stacklevel=2)
    kwargs.setdefault("desc", "fine-tune")
    return fit(model, loader, cfg, **kwargs)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512) -> ClassifierOutput:
    """Base logits ``[N, C]`` (and head logits ``[N, K, C]``) for a tensor dataset, in eval mode, on the model's
    device; the outputs come back on ``images``' device. The logits are the model's own, whatever
    ``TrainConfig.loss`` trained it (the loss offsets are training-only)."""
    model.eval()
    device = next((p.device for p in model.parameters()), images.device)
    outs = [as_output(model(x.to(device))) for x in images.split(batch_size)]
    heads = [o.head_logits for o in outs]
    return ClassifierOutput(
        logits=torch.cat([o.logits for o in outs]).to(images.device),
        head_logits=torch.cat(heads).to(images.device) if all(h is not None for h in heads) else None,
    )


def make_classifier(num_classes: int = 10, width: int = 32, num_heads: int = 5, seed: int = 0) -> EpistemicClassifier:
    """The embedded default's classifier: ``SmallCNN`` plus an Epistemic Head of ``num_heads``."""
    torch.manual_seed(seed)
    return EpistemicClassifier(SmallCNN(1, num_classes, width), num_heads=num_heads, seed=seed)


@torch.no_grad()
def predict_loader(model: nn.Module, loader: torch.utils.data.DataLoader, accelerator: Accelerator | None = None
                   ) -> tuple[ClassifierOutput, Tensor]:
    """Logits (and head logits) plus labels over a DataLoader, gathered from every process."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator()
    model, loader = acc.prepare(model, loader)
    model.eval()
    # oneDNN's convolutions run ~1.7x faster on channels-last batches (benchmarks/eval_layout.py); the caller's
    # model gets its layout back, so later forward passes elsewhere stay bit-identical to before
    fast = acc.device.type == "cpu"
    if fast:
        model.to(memory_format=torch.channels_last)
    logits, heads, labels = [], [], []
    try:
        for x, y in loader:
            if fast and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            out = as_output(model(x))
            logits.append(acc.gather_for_metrics(out.logits))
            heads.append(acc.gather_for_metrics(out.head_logits) if out.head_logits is not None else None)
            labels.append(acc.gather_for_metrics(y))
    finally:
        if fast:
            model.to(memory_format=torch.contiguous_format)
    head_logits = torch.cat(heads).cpu() if heads and all(h is not None for h in heads) else None
    return ClassifierOutput(logits=torch.cat(logits).cpu(), head_logits=head_logits), torch.cat(labels).cpu()
