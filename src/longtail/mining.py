"""The iterative mining loop (paper Figure 3, A.1): generate with the current classifier, fine-tune, repeat.

Round r: allocate the round's synthetic images over classes, generate them with the classifier as it is
*now* (frozen) into one synthetic store (ImageFolder + manifest, ``<run>/synthetic``), fine-tune on real data
plus every synthetic image so far, evaluate. Each round leaves ``round_<r>/classifier.safetensors`` and
``round_<r>/metrics.json``. A re-run resumes at the last complete unit: finished rounds are loaded, and an
interrupted generation continues where it stopped (the store skips images it already holds).

The loop is generic: the caller supplies how to synthesize (any generator), how to fine-tune (in-memory
tensors for the embedded default, a DataLoader over ImageFolders for user data) and how to evaluate.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .data.store import SyntheticStore
from .files import read_state_dict, write_json
from .generate import even_counts

# synthesize(round, model, counts per class, store): write the round's images into the store (resumably)
Synthesize = Callable[[int, nn.Module, list[int], SyntheticStore], None]
# finetune(model, synthetic manifest rows so far, round) -> per-epoch losses
Finetune = Callable[[nn.Module, list[dict[str, str]], int], list[float]]


@dataclass
class MiningConfig:
    """Schedule and volume: ``rounds`` generations of ``images_per_round`` each, fine-tuning after each."""

    rounds: int = 3
    images_per_round: int = 200
    allocation: str = "even"  # even | frequency | inverse (relative to the real training counts)


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
    """A model's state dict as safetensors, written to a temporary name and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def load_state(model: nn.Module, path: Path) -> None:
    """Load a state dict written by ``save_state`` into ``model``."""
    model.load_state_dict(read_state_dict(path, "round checkpoint"))


def rows_up_to(store: SyntheticStore, r: int) -> list[dict[str, str]]:
    """Manifest rows of rounds ``1..r``."""
    return [row for row in store.rows() if row.get("round") and int(row["round"]) <= r]


def mine(
    model: nn.Module,
    synthesize: Synthesize | None,
    finetune: Finetune,
    evaluate: Callable[[nn.Module], dict],
    cfg: MiningConfig,
    real_counts: Sequence[int],
    run_dir: str | Path,
    is_main: bool = True,
    barrier: Callable[[], None] | None = None,
) -> list[dict]:
    """Run (or resume) the loop; returns per-round metrics (round 0 = the starting classifier).

    ``synthesize=None`` is the real-only control: fine-tuned on the same schedule without synthetic data.
    Under several processes, every process runs the loop (sharded generation, data-parallel fine-tuning,
    gathered evaluation) but only ``is_main`` writes checkpoints and metrics; ``barrier`` synchronises them.
    """
    sync = barrier or (lambda: None)
    run_dir = Path(run_dir)
    (run_dir / "round_0").mkdir(parents=True, exist_ok=True)
    first = run_dir / "round_0" / "metrics.json"
    if not first.is_file():
        row = {"round": 0, "synthetic": 0, **evaluate(model)}
        if is_main:
            write_json(first, row)
    sync()
    history = [json.loads(first.read_text())]
    store = SyntheticStore(run_dir / "synthetic")
    for r in range(1, cfg.rounds + 1):
        round_dir = run_dir / f"round_{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        ckpt, metrics_path = round_dir / "classifier.safetensors", round_dir / "metrics.json"
        if ckpt.is_file() and metrics_path.is_file():
            load_state(model, ckpt)
            history.append(json.loads(metrics_path.read_text()))
            continue
        counts = allocate(cfg.images_per_round, real_counts, cfg.allocation)
        if synthesize is not None:
            synthesize(r, model, counts, store)
            store = SyntheticStore(store.root)  # re-read: the synthesizer may have written through its own handle
            made = sum(1 for row in store.rows() if row.get("round") and int(row["round"]) == r)
            if made != sum(counts):
                raise RuntimeError(f"round {r}: expected {sum(counts)} synthetic images in {store.root}, found {made}")
        rows = rows_up_to(store, r) if synthesize is not None else []
        losses = finetune(model, rows, r)
        row = {"round": r, "synthetic": len(rows), "train_loss": losses[-1] if losses else None, **evaluate(model)}
        if is_main:
            save_state(model, ckpt)
            write_json(metrics_path, row)
        sync()
        history.append(row)
    return history
