"""The iterative mining loop (paper Figure 3, A.1): generate with the current classifier, fine-tune, repeat.

Round r: allocate the round's synthetic images over classes, generate them with the classifier as it is
*now* (frozen), append them to the training set, fine-tune on real + all synthetic so far, evaluate.
Every round leaves ``round_<r>/`` with its synthetic images (safetensors), the classifier (safetensors) and
``metrics.json``; all synthetic images also go to one ImageFolder store with a manifest, ``synthetic/``.
A re-run resumes after the last complete unit (a round's images, a round's fine-tuning).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .data.store import SyntheticStore, to_uint8
from .generate import Generated, even_counts, records
from .train import TrainConfig, fit

Synthesize = Callable[[int, nn.Module, list[int]], Generated | None]


@dataclass
class MiningConfig:
    """Schedule and volume: ``rounds`` generations, ``images_per_round`` each, fine-tuning between them."""

    rounds: int = 3
    images_per_round: int = 200
    allocation: str = "even"  # even | frequency | inverse (relative to the real training counts)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=4, lr=5e-4))
    synthetic_loss_weight: float = 1.0


def allocate(total: int, real_counts: Sequence[int], mode: str = "even") -> list[int]:
    """Split ``total`` synthetic images over classes: evenly, by real frequency, or by inverse frequency."""
    if mode == "even":
        return even_counts(total, len(real_counts))
    if mode not in ("frequency", "inverse"):
        raise ValueError(f"allocation must be 'even', 'frequency' or 'inverse', got {mode!r}")
    w = torch.tensor(real_counts, dtype=torch.float64)
    w = w if mode == "frequency" else 1.0 / w.clamp_min(1)
    raw = w / w.sum() * total
    counts = raw.floor().long()
    for i in torch.argsort(raw - counts, descending=True)[: total - int(counts.sum())]:
        counts[i] += 1  # largest remainders first, so the counts sum to total
    return counts.tolist()


def save_state(model: nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def load_state(model: nn.Module, path: Path) -> None:
    model.load_state_dict(load_file(str(path)))


def _round_synthetic(
    r: int, round_dir: Path, store: SyntheticStore, model: nn.Module, counts: list[int], synthesize: Synthesize,
    class_names: Sequence[str], meta: dict,
) -> tuple[Tensor, Tensor] | None:
    """Load round r's synthetic images (uint8 ``[N, H, W]``, labels) or make them, add them to ``store``
    (PNG + manifest rows) and cache them as ``round_dir/synthetic.safetensors``."""
    cache = round_dir / "synthetic.safetensors"
    if cache.is_file():
        data = load_file(str(cache))
        return data["images"], data["labels"]
    gen = synthesize(r, model, counts)
    if gen is None:
        return None
    images = to_uint8(gen.images)
    store.add(images, records(gen, class_names, {"round": r, **meta}, prefix=f"r{r}_"))
    tensors = {"images": torch.from_numpy(images).contiguous(), "labels": gen.labels.contiguous()}
    tmp = cache.with_name(cache.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(cache)
    return tensors["images"], tensors["labels"]


def mine(
    model: nn.Module,
    real_images: Tensor,
    real_labels: Tensor,
    synthesize: Synthesize,
    cfg: MiningConfig,
    run_dir: str | Path,
    evaluate: Callable[[nn.Module], dict],
    class_names: Sequence[str],
    to_input: Callable[[Tensor], Tensor],
    meta: dict | None = None,
    show: bool = True,
) -> list[dict]:
    """Run (or resume) the loop; returns per-round metrics (round 0 = the starting classifier).

    ``real_images [N, C, H, W]`` are in the classifier's input range; ``to_input`` maps stored uint8 synthetic
    images ``[M, H, W]`` to that range. ``synthesize(round, model, counts)`` returns ``Generated`` or ``None``
    (no synthetic data: the real-only control, fine-tuned on the same schedule).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    real_counts = torch.bincount(real_labels, minlength=len(class_names)).tolist()
    history: list[dict] = []
    first = run_dir / "round_0" / "metrics.json"
    if first.is_file():
        history.append(json.loads(first.read_text()))
    else:
        history.append({"round": 0, "synthetic": 0, **evaluate(model)})
        first.parent.mkdir(parents=True, exist_ok=True)
        first.write_text(json.dumps(history[0], indent=2))
    store = SyntheticStore(run_dir / "synthetic")
    syn_x: list[Tensor] = []
    syn_y: list[Tensor] = []
    for r in range(1, cfg.rounds + 1):
        round_dir = run_dir / f"round_{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        ckpt, metrics_path = round_dir / "classifier.safetensors", round_dir / "metrics.json"
        counts = allocate(cfg.images_per_round, real_counts, cfg.allocation)
        made = _round_synthetic(r, round_dir, store, model, counts, synthesize, class_names, meta or {})
        if made is not None:
            syn_x.append(made[0])
            syn_y.append(made[1])
        if ckpt.is_file() and metrics_path.is_file():
            load_state(model, ckpt)
            history.append(json.loads(metrics_path.read_text()))
            continue
        x, y = real_images, real_labels
        weights = None
        if syn_x:
            sx, sy = to_input(torch.cat(syn_x)), torch.cat(syn_y)
            x, y = torch.cat([x, sx]), torch.cat([y, sy])
            weights = torch.cat([torch.ones(len(real_labels)), torch.full((len(sy),), cfg.synthetic_loss_weight)])
        ft = replace(cfg.finetune, seed=cfg.finetune.seed * 1000 + r)
        losses = fit(model, x, y, ft, weights=weights, desc=f"fine-tune r{r}", show=show)
        save_state(model, ckpt)
        row = {"round": r, "synthetic": int(sum(len(s) for s in syn_y)), "train_loss": losses[-1] if losses else None,
               **evaluate(model)}
        tmp = metrics_path.with_name("metrics.json.tmp")
        tmp.write_text(json.dumps(row, indent=2))
        tmp.replace(metrics_path)
        history.append(row)
    return history
