"""The iterative mining loop (paper Figure 3, A.1): generate with the current classifier, fine-tune, repeat.

Round r: allocate the round's synthetic images over classes, generate them with the classifier as it is
*now* (frozen) into one synthetic store (ImageFolder + manifest, ``<run>/synthetic``), fine-tune on real data
plus every synthetic image so far, evaluate. Each round leaves ``round_<r>/classifier.safetensors`` and
``round_<r>/metrics.json``. A re-run resumes at the last complete unit: finished rounds are loaded, and an
interrupted generation continues where it stopped (the store skips images it already holds). A round whose
checkpoint or metrics cannot be read (a damaged file) is redone from the last good round, with a warning;
so are the rounds after it, which were built on it (``check_rounds`` reports this without running).

The loop is generic: the caller supplies how to synthesize (any generator), how to fine-tune (in-memory
tensors for the embedded default, a DataLoader over ImageFolders for user data) and how to evaluate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .data.store import SyntheticStore
from .files import WeightsError, read_json, read_state_dict, write_json
from .generate import even_counts

logger = logging.getLogger(__name__)
CHECKPOINT, METRICS = "classifier.safetensors", "metrics.json"

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


def read_metrics(path: Path) -> tuple[dict | None, str | None]:
    """A round's metrics and None, or None and why they cannot be used (missing, unreadable, not an object)."""
    if not path.is_file():
        return None, f"{path.name} missing"
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        return None, f"{path.name} unreadable ({type(err).__name__}: {err})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a {type(data).__name__}, not the round's metrics"
    return data, None


def read_round(round_dir: Path) -> tuple[dict | None, dict | None, str | None]:
    """A finished round's (metrics, state dict, None), or (None, None, why it must be redone)."""
    ckpt = round_dir / CHECKPOINT
    if not ckpt.is_file():
        return None, None, f"{CHECKPOINT} missing"
    try:
        state = read_state_dict(ckpt, "round checkpoint")
    except (WeightsError, OSError) as err:  # a WeightsError names the file again; its cause is what matters
        cause = err.__cause__ or err
        first_line = (str(cause).strip().splitlines() or [""])[0]
        return None, None, f"{CHECKPOINT} unreadable ({type(cause).__name__}: {first_line})"
    metrics, why = read_metrics(round_dir / METRICS)
    return (metrics, state, None) if why is None else (None, None, why)


def _redo(r: int, last: int) -> str:
    """``"round 2"``, ``"rounds 2 and 3"``, ``"rounds 2-5"``."""
    return f"round {r}" if last <= r else f"rounds {r} and {last}" if last == r + 1 else f"rounds {r}-{last}"


def check_rounds(run_dir: str | Path) -> list[str]:
    """What a re-run of ``mine`` in ``run_dir`` redoes because a file is damaged or a round half-written:
    one line per such round (the first; those after it follow), empty when every started round is intact."""
    run_dir = Path(run_dir)
    problems = []
    _, why = read_metrics(run_dir / "round_0" / METRICS)
    if (run_dir / "round_0" / METRICS).is_file() and why:
        problems.append(f"{run_dir / 'round_0'}: {why}; a re-run evaluates the starting classifier again")
    numbers = sorted(int(m.group(1)) for d in run_dir.glob("round_*")
                     if (m := re.fullmatch(r"round_(\d+)", d.name)) and int(m.group(1)) > 0 and d.is_dir())
    for r in numbers:
        round_dir = run_dir / f"round_{r}"
        if not any((round_dir / name).is_file() for name in (CHECKPOINT, METRICS)):
            continue  # not started: a re-run simply does it
        *_, why = read_round(round_dir)
        if why:
            problems.append(f"{round_dir}: {why}; a re-run redoes {_redo(r, numbers[-1])} from round {r - 1}")
            break
    return problems


def made_in(store: SyntheticStore, r: int) -> int:
    """How many images of round ``r`` the store holds."""
    return sum(1 for row in store.rows() if row.get("round") and int(row["round"]) == r)


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
    first = run_dir / "round_0" / METRICS
    start, why = read_metrics(first)
    if start is None:
        if first.is_file() and is_main:
            logger.warning("%s: %s; evaluating the starting classifier again", first.parent, why)
        start = {"round": 0, "synthetic": 0, **evaluate(model)}
        if is_main:
            write_json(first, start)
    sync()
    history = [read_metrics(first)[0] or start]  # as written (JSON: NaN -> null), and as the main process wrote it
    store = SyntheticStore(run_dir / "synthetic")
    resuming = True  # rounds are loaded while each is intact; from the first that is not, every round is redone
    for r in range(1, cfg.rounds + 1):
        round_dir = run_dir / f"round_{r}"
        round_dir.mkdir(parents=True, exist_ok=True)
        ckpt, metrics_path = round_dir / CHECKPOINT, round_dir / METRICS
        counts = allocate(cfg.images_per_round, real_counts, cfg.allocation)
        if resuming:
            metrics, state, why = read_round(round_dir)
            if why is None:
                if synthesize is not None:  # images the store dropped (damaged rows, files gone) are made again
                    missing = sum(counts) - made_in(store, r)
                    sync()  # every process has counted before any writes
                    if missing > 0:
                        if is_main:
                            logger.warning("%s: round %d lacks %d synthetic image(s); making them again with the "
                                           "classifier of round %d", store.root, r, missing, r - 1)
                        synthesize(r, model, counts, store)
                        store = SyntheticStore(store.root)
                model.load_state_dict(state)
                history.append(metrics)
                continue
            resuming = False
            if is_main and (ckpt.is_file() or metrics_path.is_file()):
                logger.warning("%s: %s; redoing %s from round %d", round_dir, why, _redo(r, cfg.rounds), r - 1)
        if synthesize is not None:
            synthesize(r, model, counts, store)
            store = SyntheticStore(store.root)  # re-read: the synthesizer may have written through its own handle
            made = made_in(store, r)
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
